"""Code items: the prompt the model sees and the verdict on its completion.

Grading is the RL code reward's (`stepflash.tasks.rewards.code_verifier`): the last fenced python block is
run in the sandbox against the item's tests, stdin/stdout pairs ({"input", "output"}, compared token by
token) and assert statements (LiveCodeBench style), each test under `timeout_s` (item field, default 2 s).
An item is solved when every test passes; the score is the fraction passed. A program that hangs, crashes
or prints the wrong thing fails the tests it touches; a sandbox that cannot start raises (not a verdict).
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
    passed = run_tests(code, tests, limits)
    n_ok = sum(passed)
    details = {"tests_passed": passed}
    if n_ok == len(tests):
        return Verdict(True, 1.0, code, f"correct: all {len(tests)} tests passed", details)
    failed = [i for i, ok in enumerate(passed) if not ok]
    return Verdict(False, n_ok / len(tests), code,
                   f"tests failed: {n_ok}/{len(tests)} passed (failed: {', '.join(map(str, failed))})", details)
