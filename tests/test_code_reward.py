"""The code reward and `run_tests`: right, wrong and broken programs get the verdict that says why; programs
that try to forge a verdict score 0; hostile programs score 0 and leave nothing on the host.

Forgery is tested against the strongest cheat we could write: a program that searches everything it can
reach (the driver's frames and globals, every object the garbage collector knows, the files beside it) for
the expected values and returns them. A positive control shows that the same cheat wins when a test does
leak its expected value into the sandbox, so the zero elsewhere is not an accident of the cheat."""

import os
import uuid

import pytest

from stepflash.errors import UserError
from stepflash.tasks.rewards import REWARDS
from stepflash.tasks.rewards.code_verifier import (PASSED, VERDICTS, TestVerdict, extract_code, run_tests,
                                                   take_verdict_counts)
from stepflash.tasks.sandbox import SandboxLimits

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15", "assert add(0, 0) == 0"]
IO_TESTS = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6"}]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = SandboxLimits(timeout_s=5.0)


def _code(body: str) -> str:
    return f"<think>easy</think>Here it is:\n```python\n{body}\n```\nDone."


def reward(tests, body: str, timeout: float = 5.0) -> float:
    return REWARDS["code"]({"tests": tests, "timeout_s": timeout}, _code(body))


def statuses(verdicts: list[TestVerdict]) -> list[str]:
    return [v.status for v in verdicts]


def test_extract_code():
    assert extract_code(_code("x = 1")) == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    assert extract_code("```text\nnot code\n```\n```python\nz = 3\n```") == "z = 3\n"
    assert extract_code("print(1)") == "print(1)"


def test_right_partial_and_wrong_programs():
    assert reward(ADD_TESTS, "def add(a, b):\n    return a + b") == 1.0
    assert reward(ADD_TESTS, "def add(a, b):\n    return abs(a) + b") == 0.75
    assert reward(ADD_TESTS, "def add(a, b):\n    return a * b") == 0.25  # only 0 * 0 == 0 + 0


def test_stdin_stdout_tests_and_both_kinds_together():
    assert reward(IO_TESTS, "a, b = map(int, input().split())\nprint(a + b)") == 1.0
    assert reward(IO_TESTS, "a, b = map(int, input().split())\nprint(a + abs(b))") == 0.5
    # Assert tests import the program as a module: its __main__ block (reading stdin) does not run.
    both = "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(*map(int, input().split())))"
    v = run_tests(both, IO_TESTS + ["assert add(2, 2) == 4", "assert add(2, 2) == 5"], FAST)
    assert statuses(v) == [PASSED, PASSED, PASSED, "wrong answer"] and v[3].detail == "assert add(2, 2) == 5: got 4"


def test_each_verdict_says_why():
    def one(code, tests=ADD_TESTS[:1], limits=FAST):
        return run_tests(code, tests, limits)[0]

    assert one("def add(a, b):\n    return a - b") == TestVerdict("wrong answer", "assert add(1, 2) == 3: got -1")
    assert one("def add(a, b):\n    return 1 / 0") == TestVerdict("runtime error", "ZeroDivisionError: division by zero")
    assert one("def add(a, b):\n    while True:\n        pass", limits=SandboxLimits(timeout_s=0.5)).status == "timeout"
    assert one("def add(a, b):\n    return bytearray(2 * 1024 ** 3)") == TestVerdict("memory limit", "MemoryError")
    assert one("def add(a, b):\n    return 'x' * (4 << 20)").status == "output limit"
    io = [{"input": "1\n", "output": "1\n"}]
    assert one("print(int(input()) + 1)", io) == TestVerdict("wrong answer", "expected '1', got '2'")
    assert one("import sys\nsys.exit('bad input')", io) == TestVerdict("runtime error", "bad input")
    assert one("x = bytearray(2 * 1024 ** 3)", io).status == "memory limit"
    assert one("while True:\n    print('y' * 999)", io).status == "output limit"
    assert one("import time\ntime.sleep(9)", io, SandboxLimits(timeout_s=0.5)).status == "timeout"


def test_a_sandbox_failure_is_a_verdict_not_a_crash(monkeypatch):
    from stepflash.tasks import sandbox

    plan = dict(sandbox.mount_plan(), binds=sandbox.mount_plan()["binds"] + ["/nonexistent-stepflash"])
    monkeypatch.setattr(sandbox, "mount_plan", lambda: plan)
    v = run_tests("def add(a, b):\n    return a + b", ADD_TESTS[:1] + IO_TESTS[:1], FAST)
    assert statuses(v) == ["sandbox failure"] * 2 and "nonexistent-stepflash" in v[0].detail


def test_infinite_loop_times_out_and_keeps_earlier_verdicts():
    code = "def add(a, b):\n    while a == 10:\n        pass\n    return a + b"
    assert statuses(run_tests(code, ADD_TESTS, SandboxLimits(timeout_s=1.0))) == [PASSED, PASSED, "timeout", "timeout"]


def test_rl_counts_the_verdicts(monkeypatch):
    take_verdict_counts()
    assert reward(ADD_TESTS, f"def add(a, b):\n    return abs(a) + b  # {uuid.uuid4().hex}") == 0.75
    assert reward(ADD_TESTS, "def add(a, b) return") == 0.0  # does not compile: no sandbox run, still counted
    counts = take_verdict_counts()
    assert list(counts) == list(VERDICTS)
    assert counts["passed"] == 3 and counts["wrong answer"] == 1 and counts["runtime error"] == 4
    assert sum(take_verdict_counts().values()) == 0


def test_unparsable_programs_skip_the_sandbox_and_verdicts_are_remembered(monkeypatch):
    from stepflash.tasks.rewards import code_verifier

    broken = "def add(a, b) return a + b"
    assert statuses(run_tests(broken, ADD_TESTS, FAST)) == ["runtime error"] * 4  # what the shortcut must equal
    calls = []
    real = code_verifier.run_tests
    monkeypatch.setattr(code_verifier, "run_tests", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    assert reward(ADD_TESTS, broken) == 0.0 and calls == []
    program = f"def add(a, b):\n    return a + b  # {uuid.uuid4().hex}"  # not in the cache yet
    assert reward(ADD_TESTS, program) == 1.0
    assert reward(ADD_TESTS, program) == 1.0
    assert len(calls) == 1
    assert reward(ADD_TESTS[:1], program) == 1.0  # other tests: a new run
    assert len(calls) == 2


def test_crash_scores_zero():
    assert reward(ADD_TESTS, "raise SystemError('crash')") == 0.0
    assert statuses(run_tests("raise SystemError('crash')", ADD_TESTS[:1], FAST)) == ["runtime error"]


# ---- forged verdicts --------------------------------------------------------------------------------

STEAL_NONCE = ("import os, sys\nf = sys._getframe(1)\nleaked = dict(f.f_locals, **f.f_globals)\n"
               "for i in range(10):\n    os.write(3, repr((i, 'values', [[True]])).encode() + b'\\n')\n"
               "    print(leaked.get('nonce', ''), i, 1)\nos._exit(0)")
FAKE_PASSES = ("import os\nfor i in range(4):\n    os.write(3, repr((i, 'values', [[True]])).encode() + b'\\n')\n"
               "    os.write(3, repr((i, 'passed')).encode() + b'\\n')\nos._exit(0)")
FAKE_CONSTANT = "import os\nfor i in range(4):\n    os.write(3, repr((i, 'values', [[('i', '0x3')]])).encode() + b'\\n')"
SEARCH_EVERYWHERE = '''
import gc, os, re, sys
PATTERN = re.compile(r"add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)")
texts = []
frame = sys._getframe()
while frame:
    texts += [repr(frame.f_locals), repr(frame.f_globals.get("SPEC"))]
    frame = frame.f_back
for o in gc.get_objects():
    if isinstance(o, (list, tuple, dict)):
        try:
            texts.append(repr(o)[:100000])
        except Exception:
            pass
for name in os.listdir("."):
    texts.append(open(name).read())
ANSWERS = {(int(a), int(b)): int(c) for t in texts for a, b, c in PATTERN.findall(t)}
def add(a, b):
    return ANSWERS.get((a, b))
'''


@pytest.mark.parametrize("cheat", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "print('0 1')\nprint('deadbeef 0 1')\nimport sys\nsys.exit(0)",
    STEAL_NONCE,
    FAKE_PASSES,
    SEARCH_EVERYWHERE,
])
def test_forging_programs_score_zero(cheat):
    assert reward(ADD_TESTS, cheat) == 0.0


def test_a_forger_can_only_claim_values_which_score_like_returning_them():
    """Writing values on the driver's channel is all a program can do; claiming add(...) == 3 everywhere
    scores what `return 3` scores."""
    assert reward(ADD_TESTS, FAKE_CONSTANT) == reward(ADD_TESTS, "def add(a, b):\n    return 3") == 0.25


def test_the_search_cheat_wins_where_a_test_leaks_its_answer():
    """Positive control: the same search passes a test whose setup statement (run in the sandbox) holds the
    expected text; the split keeps it from every plain assert."""
    leaky = ["print('add(1, 2) == 3')\nassert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    assert reward(leaky, SEARCH_EVERYWHERE) == 0.5


# ---- hostile programs through the reward -----------------------------------------------------------

@pytest.mark.parametrize("attack", [
    "import os\nwhile True:\n    os.fork()",
    "x = bytearray(16 * 1024 ** 3)",
    "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))",
    "import os\nos.kill(os.getppid(), 9)",
])
def test_fork_bomb_memory_hog_and_signals_score_zero(attack):
    assert reward(ADD_TESTS[:1], attack, timeout=2.0) == 0.0


def test_writes_stay_in_the_private_tmp():
    path = f"/tmp/stepflash-reward-escape-{uuid.uuid4().hex}"
    inside = f"open({path!r}, 'w').write('pwned')\ndef add(a, b):\n    return a + b"
    assert reward(ADD_TESTS, inside) == 1.0  # allowed: the sandbox's own /tmp ...
    assert not os.path.exists(path)  # ... which is not the host's
    project = os.path.join(REPO, f"escape-{uuid.uuid4().hex}")
    assert reward(ADD_TESTS, f"open({project!r}, 'w').write('pwned')\ndef add(a, b):\n    return a + b") == 0.0
    assert not os.path.exists(project)


def test_cannot_read_an_environment_secret(monkeypatch):
    monkeypatch.setenv("STEPFLASH_REWARD_SECRET", "hunter2")
    thief = "import os\nprint(os.environ.get('STEPFLASH_REWARD_SECRET'))"
    assert reward([{"input": "", "output": "hunter2"}], thief) == 0.0
    assert reward([{"input": "", "output": "None"}], thief) == 1.0


def test_task_without_tests_or_with_unsplittable_tests_is_a_user_error():
    with pytest.raises(UserError):
        REWARDS["code"]({"tests": []}, "print(1)")
    with pytest.raises(UserError, match="top-level `assert EXPR`"):
        REWARDS["code"]({"tests": ["def check(f):\n    assert f(1) == 2\ncheck(add)"]}, "print(1)")
    with pytest.raises(UserError, match="not valid Python"):
        REWARDS["code"]({"tests": ["assert add(1,"]}, "print(1)")


def test_rl_logs_the_verdicts_of_each_steps_rollouts(rl_ckpt, tmp_path, one_thread):
    from stepflash.rl.trainer import RLArgs, train_rl
    from stepflash.tasks.generators import code_tasks

    tasks = code_tasks(8, seed=0, templates=("add_const",))  # three assert tests each
    a = RLArgs(checkpoint=rl_ckpt, out=str(tmp_path), task="code", steps=1, prompts_per_step=2, samples_per_prompt=2,
               max_new_tokens=8, actor_minibatches=1, critic_minibatches=1, eval_every=0, save_every=0, max_batch_size=8)
    step = next(r for r in train_rl(a, tasks, tasks[:1], log=lambda s: None) if r["step"] == 1)
    counts = {k: v for k, v in step.items() if k.startswith("code_")}
    assert list(counts) == ["code_" + v.replace(" ", "_") for v in VERDICTS]
    assert sum(counts.values()) == 2 * 2 * 3  # one verdict per test of each rollout, none of the held-out eval's
