"""Code items: the prompt the model sees and the verdict on its completion.

Grading is the RL code reward's (`stepflash.tasks.rewards.code_verifier`): the last fenced python block is
run in the sandbox against the item's tests, stdin/stdout pairs ({"input", "output"}, compared token by
token) and assert statements (LiveCodeBench style), each test under `timeout_s` (item field, default 2 s).
An item is solved when every test passes; the score is the fraction passed. Every test gets a verdict
(passed, wrong answer, runtime error, timeout, memory limit, output limit, sandbox failure), kept in the
record as `test_verdicts`; the item's reason starts with the first failed test's verdict, so that the
failure histogram of results.json counts them. A machine that cannot confine programs raises a UserError
before any program runs (`--unsafe-no-sandbox` to run them anyway).
"""

from __future__ import annotations

from stepflash.evaluation.scoring import Verdict
from stepflash.tasks.rewards.code_verifier import extract_code, run_tests
from stepflash.tasks.sandbox import SandboxLimits

IO_INSTRUCTION = ("Write a complete Python 3 program that reads the input from standard input and writes the "
                  "answer to standard output. Put the program in one ```python code block.")
FUNCTION_INSTRUCTION = "Write the Python 3 code in one ```python code block."


def code_messages(item: dict) -> list[dict]:
    """Chat messages for a code item; the instruction depends on the kind of tests it has."""
    io = any(isinstance(t, dict) for t in item["tests"])
    instruction = IO_INSTRUCTION if io else FUNCTION_INSTRUCTION
    messages = [{"role": "system", "content": item["system"]}] if item.get("system") else []
    return messages + [{"role": "user", "content": f"{item['prompt']}\n\n{instruction}"}]


def score_code(item: dict, completion: str) -> Verdict:
    tests = item["tests"]
    code = extract_code(completion)
    if not code.strip():
        return Verdict(False, 0.0, code, "no code: the completion holds no program")
    limits = SandboxLimits(timeout_s=float(item.get("timeout_s", SandboxLimits.timeout_s)))
    verdicts = run_tests(code, tests, limits)
    n_ok = sum(v.passed for v in verdicts)
    details = {"tests_passed": [v.passed for v in verdicts], "test_verdicts": [str(v) for v in verdicts]}
    if n_ok == len(tests):
        return Verdict(True, 1.0, code, f"correct: all {len(tests)} tests passed", details)
    first = next(i for i, v in enumerate(verdicts) if not v.passed)
    why = f"; test {first}: {verdicts[first].detail}" if verdicts[first].detail else f"; test {first}"
    return Verdict(False, n_ok / len(tests), code,
                   f"{verdicts[first].status}: {n_ok}/{len(tests)} tests passed{why}", details)
