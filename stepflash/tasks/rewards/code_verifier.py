"""Code reward: run the completion's program against the task's tests in the sandbox; score = fraction passed.

The program is the last fenced ```python block of the answer (any fenced block if none is tagged python,
the whole answer if there is no block). Tests (`task_field(prompt, "tests")`) are a list mixing two kinds:
- stdin/stdout pairs `{"input": str, "output": str}`: the program runs as `__main__` with that stdin, once per
  pair; it passes when its stdout equals the expected output up to whitespace (same tokens);
- assert-style tests (strings): split by `code_checks.py` into the calls the sandbox evaluates and the check
  this process makes. One sandbox run executes the program as module `solution` (so an
  `if __name__ == "__main__":` block does not run) and then every test's calls in its namespace; the values
  come back on a channel of their own, and the comparison with the expected values (which never enter the
  sandbox) happens here. A program that prints fake results, exits early or takes over the driver gets no
  test it did not compute. The run's timeout is the per-test timeout times the number of tests; a test that
  hangs ends the run, the tests before it keep their verdicts.

Every test gets a `TestVerdict`: passed, wrong answer, runtime error (with the exception's last line), timeout,
memory limit, output limit or sandbox failure. `run_tests` (eval) returns them; `code_reward` (RL) skips the
sandbox for a program that does not compile (it would fail every test), remembers the verdicts of the last few
thousand (program, tests) pairs and counts the verdicts for the RL log (`take_verdict_counts`).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import signal
import warnings
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stepflash.errors import UserError
from stepflash.tasks.rewards import strip_reasoning, task_field
from stepflash.tasks.rewards.code_checks import check_values, decode_value, split_test
from stepflash.tasks.sandbox import SandboxLimits, SandboxResult, run_python

PASSED, WRONG, RUNTIME, TIMEOUT, MEMORY, OUTPUT, SANDBOX = (
    "passed", "wrong answer", "runtime error", "timeout", "memory limit", "output limit", "sandbox failure")
VERDICTS = (PASSED, WRONG, RUNTIME, TIMEOUT, MEMORY, OUTPUT, SANDBOX)
_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "code_driver.py"), encoding="utf-8") as _f:
    _DRIVER = _f.read()


@dataclass(frozen=True)
class TestVerdict:
    __test__ = False  # not a pytest class
    status: str  # one of VERDICTS
    detail: str = ""  # one line: the exception, what the program returned, why the sandbox failed

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def extract_code(completion: str) -> str:
    """The program in a completion (see the module docstring for which block wins)."""
    text = strip_reasoning(completion)
    blocks = _FENCE.findall(text)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return text


def _short(text: str, limit: int = 80) -> str:
    text = text.strip().replace("\n", "\\n")
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _process_verdict(result: SandboxResult) -> TestVerdict | None:
    """Why the run as a whole failed (None: it exited 0 within its limits)."""
    if not result.started:
        return TestVerdict(SANDBOX, result.setup_error or "")
    if result.timed_out or result.returncode == -signal.SIGXCPU:
        return TestVerdict(TIMEOUT)
    if result.output_limited:
        return TestVerdict(OUTPUT)
    if result.memory_limited:
        return TestVerdict(MEMORY)
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        if result.returncode < 0:
            return TestVerdict(RUNTIME, f"killed by {signal.Signals(-result.returncode).name}")
        return TestVerdict(RUNTIME, lines[-1][:200] if lines else f"exit status {result.returncode}")
    return None


def _run_io_test(code: str, test: Mapping, limits: SandboxLimits) -> TestVerdict:
    result = run_python(code, stdin=str(test.get("input", "")), limits=limits, entry="solution.py")
    failed = _process_verdict(result)
    if failed:
        return failed
    expected = str(test.get("output", ""))
    if result.stdout.split() == expected.split():
        return TestVerdict(PASSED)
    return TestVerdict(WRONG, f"expected {_short(expected)}, got {_short(result.stdout)}")


def _error_verdict(message: str) -> TestVerdict:
    return TestVerdict(MEMORY if message.startswith("MemoryError") else RUNTIME, message[:200])


def _parse_results(raw: bytes, n: int) -> dict[int, tuple[str, Any]]:
    """The driver's lines: test index (-1: the solution itself) -> ("values" | "error", payload). The first
    line for an index counts; lines that do not parse are ignored (the program could write anything)."""
    out = {}
    for line in raw.decode("utf-8", "replace").split("\n"):
        try:
            i, kind, payload = ast.literal_eval(line)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(i, int) and -1 <= i < n and i not in out and \
                ((kind == "error" and isinstance(payload, str)) or (kind == "values" and isinstance(payload, list))):
            out[i] = (kind, payload)
    return out


def _assert_verdict(split, kind: str, payload) -> TestVerdict:
    if kind == "error":
        return _error_verdict(payload)
    try:
        if [len(values) if isinstance(values, list) else -1 for values in payload] != split.probe_counts:
            raise ValueError
        decoded = [[decode_value(v) for v in values] for values in payload]
    except (ValueError, TypeError, RecursionError, MemoryError):
        return TestVerdict(WRONG, "the values sent back could not be read")
    for values, (check, text) in zip(decoded, split.checks):
        ok, why = check_values(check, values)
        if not ok:
            return TestVerdict(WRONG, f"assert {text[:80]}: {why}")
    return TestVerdict(PASSED)


def _run_assert_tests(code: str, tests: list[str], limits: SandboxLimits) -> list[TestVerdict]:
    splits = [split_test(t, i) for i, t in enumerate(tests)]
    spec = [s.steps for s in splits]
    driver = _DRIVER.replace("SPEC = None", f"SPEC = {spec!r}", 1)
    # One process for all tests: the timeout covers them all.
    all_limits = dataclasses.replace(limits, timeout_s=limits.timeout_s * len(tests), cpu_s=None)
    result = run_python({"solution.py": code, "driver.py": driver}, limits=all_limits, entry="driver.py")
    results = _parse_results(result.results, len(tests))
    if -1 in results:  # the program itself failed: every test fails the same way
        return [_error_verdict(results[-1][1])] * len(tests)
    unfinished = _process_verdict(result) or TestVerdict(RUNTIME, "the program ended before this test finished")
    return [_assert_verdict(s, *results[i]) if i in results else unfinished for i, s in enumerate(splits)]


def _check_tests(tests: Sequence) -> None:
    for i, t in enumerate(tests):
        if not isinstance(t, (str, Mapping)):
            raise UserError(f"test {i} must be an assert statement (str) or an {{'input', 'output'}} dict, "
                            f"got {type(t).__name__}")
        if isinstance(t, str):
            split_test(t, i)


def run_tests(code: str, tests: Sequence[str | Mapping], limits: SandboxLimits | None = None) -> list[TestVerdict]:
    """A verdict per test (order kept). limits.timeout_s is per test."""
    limits = limits or SandboxLimits()
    _check_tests(tests)
    verdicts = {i: _run_io_test(code, t, limits) for i, t in enumerate(tests) if isinstance(t, Mapping)}
    asserts = [(i, t) for i, t in enumerate(tests) if isinstance(t, str)]
    if asserts:
        for (i, _), v in zip(asserts, _run_assert_tests(code, [t for _, t in asserts], limits)):
            verdicts[i] = v
    return [verdicts[i] for i in range(len(tests))]


def compiles(code: str) -> bool:
    """Does the program parse? Compiling runs nothing, and a program that does not parse fails every test in
    the sandbox too (a crash fails io tests, a failed import fails asserts), so RL skips the subprocess."""
    try:
        compile(code, "solution.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False
    return True


_CACHE: OrderedDict[tuple, tuple[TestVerdict, ...]] = OrderedDict()  # (code, tests, timeout) -> verdicts, LRU
_CACHE_MAX = 4096
_counts: Counter = Counter()  # verdicts since the last take_verdict_counts()


def take_verdict_counts() -> dict[str, int]:
    """{verdict: tests} scored by code_reward since the last call (every verdict, zeros included), then reset."""
    out = {v: _counts[v] for v in VERDICTS}
    _counts.clear()
    return out


def _cached_run(code: str, tests: list, timeout: float) -> tuple[TestVerdict, ...]:
    """run_tests, remembered per (program, tests): RL samples of a sharpening policy repeat programs a lot,
    and each sandbox run costs a process start. A sandbox failure is not remembered (the next try may work)."""
    key = (code, json.dumps(tests, sort_keys=True), timeout)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    if not compiles(code):
        return (TestVerdict(RUNTIME, "SyntaxError: the program does not compile"),) * len(tests)
    verdicts = tuple(run_tests(code, tests, SandboxLimits(timeout_s=timeout)))
    failures = [v for v in verdicts if v.status == SANDBOX]
    if failures:
        warnings.warn(f"code reward: the sandbox failed to run a program ({failures[0].detail}); it scores 0")
        return verdicts
    _CACHE[key] = verdicts
    if len(_CACHE) > _CACHE_MAX:
        _CACHE.popitem(last=False)
    return verdicts


def code_reward(prompt: Any, completion: str) -> float:
    """Fraction of the task's tests the completion's program passes (0.0 to 1.0)."""
    tests = task_field(prompt, "tests")
    if not tests:
        raise UserError("a code task needs a non-empty list of 'tests'")
    if isinstance(tests, (str, Mapping)):
        tests = [tests]
    _check_tests(tests)  # before the cache, so that a bad task fails on every call
    timeout = float(task_field(prompt, "timeout_s", SandboxLimits.timeout_s))
    verdicts = _cached_run(extract_code(completion), list(tests), timeout)
    _counts.update(v.status for v in verdicts)
    return sum(v.passed for v in verdicts) / len(verdicts)
