"""Procedural tasks: deterministic from a seed, disjoint held-out split, and verifiable (the reference answer
earns reward 1, a wrong one 0)."""

import ast
import json
import re
from collections import Counter
from fractions import Fraction

import pytest

from stepflash.errors import UserError
from stepflash.tasks.tool_env import ENVS
from stepflash.tasks.generators import (TASKS, Task, arithmetic_tasks, code_tasks, countdown_tasks, make_tasks, split_of,
                                tool_tasks)


def _py_value(expression: str) -> Fraction:
    """Independent reference: Python's own arithmetic on the (trusted, generated) expression, exactly."""
    return eval(re.sub(r"\d+", lambda m: f"Fraction({m.group()})", expression), {"Fraction": Fraction})


@pytest.mark.parametrize("family", ["arithmetic", "countdown", "code", "tool"])
def test_deterministic_from_seed(family):
    a = [t.to_dict() for t in make_tasks(family, 5, seed=3)]
    b = [t.to_dict() for t in make_tasks(family, 5, seed=3)]
    c = [t.to_dict() for t in make_tasks(family, 5, seed=4)]
    assert a == b
    assert a != c
    assert len({t["key"] for t in a}) == 5  # distinct tasks


@pytest.mark.parametrize("family", ["arithmetic", "countdown", "code", "tool"])
def test_held_out_split_is_disjoint_and_stable(family):
    train = make_tasks(family, 40, seed=0, split="train")
    test = make_tasks(family, 8, seed=0, split="test")
    assert {t.key for t in train}.isdisjoint({t.key for t in test})
    assert all(split_of(t.key) == "train" for t in train) and all(split_of(t.key) == "test" for t in test)
    # a different seed draws other tasks, but never moves one across the split
    assert all(split_of(t.key) == "test" for t in make_tasks(family, 8, seed=9, split="test"))


def test_arithmetic_answers_are_correct_and_verified():
    tasks = arithmetic_tasks(20, seed=1, digits=(1, 5), ops="+-*/", terms=(2, 4))
    for t in tasks:
        expected = _py_value(t.meta["expression"])
        assert Fraction(t.answer) == expected
        assert t.meta["expression"] in t.prompt
        assert t.reward(f"The result is \\boxed{{{t.answer}}}.") == 1.0
        assert t.reward(f"\\boxed{{{expected + 1}}}") == 0.0


def test_arithmetic_options_are_respected():
    for t in arithmetic_tasks(10, seed=2, digits=(3, 3), ops="*", terms=(3, 3)):
        parts = t.meta["expression"].split()
        assert parts[1::2] == ["*", "*"] and all(len(p) == 3 for p in parts[::2])


def test_countdown_targets_are_reachable_and_verified():
    for t in countdown_tasks(20, seed=1, num_numbers=5, max_number=30, target_range=(20, 300)):
        numbers, target = t.meta["numbers"], t.meta["target"]
        assert len(numbers) == 5 and all(1 <= n <= 30 for n in numbers) and 20 <= target <= 300
        # the reference uses each given number at most once and evaluates to the target
        used = Counter(n.value for n in ast.walk(ast.parse(t.answer, mode="eval")) if isinstance(n, ast.Constant))
        assert not used - Counter(numbers)
        assert _py_value(t.answer) == target
        assert t.reward(f"\\boxed{{{t.answer}}}") == 1.0
        assert t.reward(f"\\boxed{{{t.answer} + {numbers[0]} - {numbers[0]}}}") == 0.0  # reuses a number
        assert t.reward(f"\\boxed{{{target}}}") == (1.0 if target in numbers else 0.0)


def test_code_reference_solutions_pass_and_wrong_ones_fail():
    kinds = {type(t.tests[0]).__name__ for t in code_tasks(30, seed=5)}
    assert kinds == {"str", "dict"}  # assert-style and stdin/stdout tasks both occur
    for t in code_tasks(4, seed=5):
        assert t.tests and t.reward_name == "code"
        assert t.reward(f"```python\n{t.answer}```") == 1.0
        assert t.reward("```python\nprint('no idea')\n```") == 0.0


def test_task_round_trip_and_registry():
    t = countdown_tasks(1, seed=0)[0]
    assert Task.from_dict(t.to_dict()) == t
    assert set(TASKS) == {"arithmetic", "countdown", "code", "tool"}
    with pytest.raises(UserError, match="unknown task family"):
        make_tasks("sudoku", 1)
    with pytest.raises(UserError, match="split"):
        make_tasks("arithmetic", 1, split="validation")
    with pytest.raises(UserError, match="ops"):
        arithmetic_tasks(1, ops="^")
    with pytest.raises(UserError, match="distinct"):
        arithmetic_tasks(30, digits=(1, 1), ops="+", terms=(2, 2), split="test")  # ~10 of the 100 are held out


def test_code_templates_option():
    tasks = code_tasks(12, seed=1, templates=("add_const",))
    assert {t.meta["template"] for t in tasks} == {"add_const"}
    for t in tasks[:3]:
        k = int(t.answer.split("+ ")[1])
        assert t.meta["statement"] in t.prompt and f"plus {k}" in t.meta["statement"]
        assert t.reward(f"```python\n{t.answer}```") == 1.0
        assert t.reward(f"```python\n{t.answer.replace(f'+ {k}', f'+ {k + 1}')}```") == 0.0
    with pytest.raises(UserError, match="templates"):
        code_tasks(1, templates=("sorting",))


def _reference_reply(call: dict) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in call["arguments"].items())
    return f"ok\n</think>\n<tool_call>\n<function={call['name']}>\n{params}</function>\n</tool_call>"


def test_tool_tasks_are_consistent_with_their_env():
    """The expected call offered, scored 1 by the reward, and running it in the env (independent of the
    task's own bookkeeping) reaches the goal the eval item will check."""
    from stepflash.tasks.tool_env import answer_mentions, state_mismatch

    tasks = tool_tasks(60, seed=2, distractors=1)
    assert {t.meta["call"]["name"] for t in tasks} == {"kv_get", "kv_set", "kv_delete", "get_balance", "transfer",
                                                        "freeze_account"}
    for t in tasks:
        m = t.meta
        offered = [s["function"]["name"] for s in m["tools"]]
        assert m["call"]["name"] in offered and len(offered) == 2 and len(set(offered)) == 2
        env = ENVS[m["env"]](m["init"])
        result = json.loads(env.call(m["call"]["name"], m["call"]["arguments"]))
        assert "error" not in result
        if "state" in m["goal"]:
            assert state_mismatch(m["goal"]["state"], env.state) is None
            assert state_mismatch(m["goal"]["state"], ENVS[m["env"]](m["init"]).state) is not None  # the call matters
        if "answer" in m["goal"]:
            assert m["goal"]["answer"] in json.dumps(result) and answer_mentions(m["final"], m["goal"]["answer"])
        assert t.reward(_reference_reply(m["call"])) == 1.0
    assert tool_tasks(5, seed=2, distractors=0)[0].meta["tools"].__len__() == 1
