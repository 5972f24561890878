"""Code reward: run the completion's program against the task's tests in the sandbox; score = fraction passed.

The program is the last fenced ```python block of the answer (any fenced block if none is tagged python,
the whole answer if there is no block). Tests (`task_field(prompt, "tests")`) are a list mixing two kinds:
- stdin/stdout pairs `{"input": str, "output": str}`: the program runs as `__main__` with that stdin, once per
  pair; it passes when its stdout equals the expected output up to whitespace (same tokens);
- assert-style statements (strings): the program is executed once as module `solution` (so a
  `if __name__ == "__main__":` block does not run), then each statement runs in its namespace.
  A driver prints a verdict line per statement tagged with a random nonce the program is not given (it
  would have to dig it out of the driver's frame), so a program that prints fake results or exits early
  (`sys.exit(0)`, `os._exit(0)`) passes nothing. A statement that hangs ends the run at the timeout;
  the statements before it keep their verdicts.

`code_reward` (RL) skips the sandbox for a program that does not compile (it would fail every test) and
remembers the verdicts of the last few thousand (program, tests) pairs; `run_tests` (eval) always runs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from stepflash.errors import UserError
from stepflash.tasks.rewards import strip_reasoning, task_field
from stepflash.tasks.sandbox import SandboxLimits, run_python

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)

_DRIVER = '''\
import os


def _run_tests():
    nonce = globals().pop("__sandbox_secret__").decode()
    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "solution"}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException:
        return
    for i, test in enumerate(TESTS):
        try:
            exec(compile(test, "test_%d" % i, "exec"), namespace)
            ok = 1
        except BaseException:
            ok = 0
        # os.write, not print: the program may have replaced or closed sys.stdout
        os.write(1, ("\\n%s %d %d\\n" % (nonce, i, ok)).encode())


TESTS = __TESTS__
_run_tests()
'''


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


def _same_output(actual: str, expected: str) -> bool:
    return actual.split() == expected.split()


def _run_io_test(code: str, test: Mapping, limits: SandboxLimits) -> bool:
    result = run_python(code, stdin=str(test.get("input", "")), limits=limits, entry="solution.py")
    _raise_if_broken(result)
    return result.ok and _same_output(result.stdout, str(test.get("output", "")))


def _run_assert_tests(code: str, tests: list[str], limits: SandboxLimits) -> list[bool]:
    nonce = secrets.token_hex(16)
    driver = _DRIVER.replace("__TESTS__", repr(tests))
    # One process for all statements: the timeout covers them all.
    all_limits = dataclasses.replace(limits, timeout_s=limits.timeout_s * len(tests), cpu_s=None)
    result = run_python({"solution.py": code, "driver.py": driver}, limits=all_limits, entry="driver.py",
                        secret=nonce.encode())
    _raise_if_broken(result)
    passed = [False] * len(tests)
    for m in re.finditer(rf"{nonce} (\d+) ([01])", result.stdout):
        i = int(m.group(1))
        if i < len(tests):
            passed[i] = m.group(2) == "1"
    return passed


def _raise_if_broken(result) -> None:
    if result.setup_failed:
        raise RuntimeError(f"the code sandbox could not start: {result.stderr.strip()}")


def run_tests(code: str, tests: Sequence[str | Mapping], limits: SandboxLimits | None = None) -> list[bool]:
    """Pass/fail of each test (order kept). limits.timeout_s is per test."""
    limits = limits or SandboxLimits()
    for i, t in enumerate(tests):
        if not isinstance(t, (str, Mapping)):
            raise UserError(f"test {i} must be an assert statement (str) or an {{'input', 'output'}} dict, "
                            f"got {type(t).__name__}")
    verdicts = {i: _run_io_test(code, t, limits) for i, t in enumerate(tests) if isinstance(t, Mapping)}
    asserts = [(i, t) for i, t in enumerate(tests) if isinstance(t, str)]
    if asserts:
        for (i, _), ok in zip(asserts, _run_assert_tests(code, [t for _, t in asserts], limits)):
            verdicts[i] = ok
    return [verdicts[i] for i in range(len(tests))]


def compiles(code: str) -> bool:
    """Does the program parse? Compiling runs nothing, and a program that does not parse fails every test in
    the sandbox too (a crash fails io tests, a failed import fails asserts), so RL skips the subprocess."""
    try:
        compile(code, "solution.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False
    return True


_VERDICTS: OrderedDict[tuple, tuple[bool, ...]] = OrderedDict()  # (code, tests, timeout) -> verdicts, LRU
_VERDICTS_MAX = 4096


def _cached_run(code: str, tests: list, timeout: float) -> tuple[bool, ...]:
    """run_tests, remembered per (program, tests): RL samples of a sharpening policy repeat programs a lot,
    and each sandbox run costs a process start."""
    key = (code, json.dumps(tests, sort_keys=True), timeout)
    if key in _VERDICTS:
        _VERDICTS.move_to_end(key)
        return _VERDICTS[key]
    verdicts = tuple(run_tests(code, tests, SandboxLimits(timeout_s=timeout)) if compiles(code)
                     else [False] * len(tests))
    _VERDICTS[key] = verdicts
    if len(_VERDICTS) > _VERDICTS_MAX:
        _VERDICTS.popitem(last=False)
    return verdicts


def code_reward(prompt: Any, completion: str) -> float:
    """Fraction of the task's tests the completion's program passes (0.0 to 1.0)."""
    tests = task_field(prompt, "tests")
    if not tests:
        raise UserError("a code task needs a non-empty list of 'tests'")
    if isinstance(tests, (str, Mapping)):
        tests = [tests]
    for i, t in enumerate(tests):  # checked before the cache so a bad task fails on every call
        if not isinstance(t, (str, Mapping)):
            raise UserError(f"test {i} must be an assert statement (str) or an {{'input', 'output'}} dict, "
                            f"got {type(t).__name__}")
    timeout = float(task_field(prompt, "timeout_s", SandboxLimits.timeout_s))
    passed = _cached_run(extract_code(completion), list(tests), timeout)
    return sum(passed) / len(passed)
