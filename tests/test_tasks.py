"""Procedural tasks: deterministic from a seed, disjoint held-out split, and verifiable (the reference answer
earns reward 1, a wrong one 0)."""

import ast
import re
from collections import Counter
from fractions import Fraction

import pytest

from stepflash.errors import UserError
from stepflash.rl.tasks import (TASKS, Task, arithmetic_tasks, code_tasks, countdown_tasks, make_tasks, split_of)


def _py_value(expression: str) -> Fraction:
    """Independent reference: Python's own arithmetic on the (trusted, generated) expression, exactly."""
    return eval(re.sub(r"\d+", lambda m: f"Fraction({m.group()})", expression), {"Fraction": Fraction})


@pytest.mark.parametrize("family", ["arithmetic", "countdown", "code"])
def test_deterministic_from_seed(family):
    a = [t.to_dict() for t in make_tasks(family, 5, seed=3)]
    b = [t.to_dict() for t in make_tasks(family, 5, seed=3)]
    c = [t.to_dict() for t in make_tasks(family, 5, seed=4)]
    assert a == b
    assert a != c
    assert len({t["key"] for t in a}) == 5  # distinct tasks


@pytest.mark.parametrize("family", ["arithmetic", "countdown", "code"])
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
    assert set(TASKS) == {"arithmetic", "countdown", "code"}
    with pytest.raises(UserError, match="unknown task family"):
        make_tasks("sudoku", 1)
    with pytest.raises(UserError, match="split"):
        make_tasks("arithmetic", 1, split="validation")
    with pytest.raises(UserError, match="ops"):
        arithmetic_tasks(1, ops="^")
    with pytest.raises(UserError, match="distinct"):
        arithmetic_tasks(30, digits=(1, 1), ops="+", terms=(2, 2), split="test")  # ~10 of the 100 are held out
