"""Assert tests split between sandbox and parent (code_checks.py) decide exactly as Python's own `assert` does.

The reference is Python itself: every (solution, test) pair below is also run in this process with plain
`exec`, and the split verdict must equal it, for a right and a subtly wrong solution. The test styles follow
MBPP (`assert f(x) == y`, google-research/mbpp), HumanEval (`abs(f(x) - y) < 1e-6`, math.isclose,
openai/human-eval) and LeetCode-style class solutions and in-place mutation (LiveCodeBench functional tests)."""

import ast
import math
import time

import pytest

from stepflash.errors import UserError
from stepflash.tasks.rewards import code_driver
from stepflash.tasks.rewards.code_checks import Opaque, check_values, decode_value, split_test
from stepflash.tasks.rewards.code_verifier import _parse_results, run_tests
from stepflash.tasks.sandbox import SandboxLimits

RIGHT = """
import math
from collections import namedtuple
P = namedtuple('P', 'x y')
def add(a, b): return a + b
def gen(n): return (i * i for i in range(n))
def half(x): return x / 2
def pair(a): return P(a, a + 1)
def sort_in_place(xs): xs.sort()
def words(s): return s.split()
def none(): return None
def nan(): return float('nan')
def big(): return 10 ** 5000
def obj(): return object()
def mapping(): return {'a': [1, 2], 'b': (3,)}
def fset(): return frozenset({1, 2})
def raw(): return b'\\x00ab'
class Solution:
    def twice(self, x): return 2 * x
"""
WRONG = RIGHT.replace("return a + b", "return a - b if a != b else a + b").replace("i * i for", "i for") \
    .replace("x / 2", "x // 2").replace("P(a, a + 1)", "(a, a + 2)").replace("xs.sort()", "pass") \
    .replace("s.split()", "s.split(' ', 1)").replace("return None", "return 0").replace("float('nan')", "0.0") \
    .replace("10 ** 5000", "10 ** 4999").replace("[1, 2]", "[2, 1]").replace("2 * x", "x + 2")
TESTS = [
    "assert add(1, 2) == 3", "assert add(1, 2) != 4", "assert 0 <= add(1, 2) < 4", "assert add(2, 2) == 4",
    "assert list(gen(4)) == [0, 1, 4, 9]", "assert sum(gen(3)) == 5", "assert half(3) == 1.5",
    "assert abs(half(1) - 0.5) < 1e-9", "assert math.isclose(half(1), 0.5, rel_tol=1e-9)", "assert pair(1) == (1, 2)",
    "assert pair(1).y == 2", "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",
    "assert words('a b c') == ['a', 'b', 'c']", "assert none() is None", "assert math.isnan(nan())",
    "assert big() == 10 ** 5000", "assert obj() is not None", "assert mapping() == {'a': [1, 2], 'b': (3,)}",
    "assert fset() == {1, 2}", "assert raw() == b'\\x00ab'", "s = Solution()\nassert s.twice(4) == 8",
    "assert isinstance(add(1, 2), int)", "assert sorted(words('b a')) == ['a', 'b']", "assert add('a', 'b') == 'ab'",
    "assert [add(i, 1) for i in range(3)] == [1, 2, 3]", "assert add(*[1, 2]) == 3", "assert add(1, 2) == 3, 'msg'",
    "assert (add(1, 1), add(2, 3)) == (2, 5)", "assert add(2, 3) in (5, 6)", "assert add(0.1, 0.2) == 0.30000000000000004",
    "assert add(1, 2) == 3 and add(2, 3) == 5", "assert round(half(1), 1) == 0.5", "assert len(words('a b c')) == 3",
    "assert not add(0, 0)", "expected = [7, 7]\nassert [add(3, 4), add(5, 2)] == expected",
    "n = 10\nassert add(n, 1) == 11", "assert add(1, 2) > 2 if True else False", "assert add(-1, 1) == 0",
]


def python_verdicts(solution: str) -> list[bool]:
    """What plain Python says, test after test in the solution's namespace (as the driver runs them)."""
    namespace = {"__name__": "solution"}
    exec(solution, namespace)
    out = []
    for test in TESTS:
        try:
            exec(test, namespace)
            out.append(True)
        except Exception:  # a failed assert, or a test that raises (the wrong solution's tuple has no .y)
            out.append(False)
    return out


@pytest.mark.parametrize("solution", [RIGHT, WRONG], ids=["right", "wrong"])
def test_split_verdicts_equal_pythons_assert(solution):
    expected = python_verdicts(solution)
    got = [v.passed for v in run_tests(solution, TESTS, SandboxLimits(timeout_s=2.0))]
    assert got == expected, [(t, e) for t, g, e in zip(TESTS, got, expected) if g != e]
    if solution is WRONG:
        assert 5 < sum(expected) < len(TESTS) - 5  # the wrong solution fails many tests, not all


@pytest.mark.parametrize("test,secret", [
    ("assert add(1, 2) == 123456789", "123456789"),
    ("assert add(1, 2) != 987654321", "987654321"),
    ("expected = [777, 778]\nassert sorted(f(1)) == expected", "777"),
    ("assert abs(f(2) - 3.14159) < 1e-6", "3.14159"),
    ("assert not is_prime(1)", "not"),
    ("assert math.isclose(f(1), 2.71828)", "2.71828"),
])
def test_expected_values_never_enter_the_sandbox(test, secret):
    assert secret not in repr(split_test(test).steps)


def test_what_the_sandbox_gets():
    assert split_test("assert add(1, 2) == 3").steps == [("probe", ["add(1, 2)"])]
    assert split_test("assert not is_prime(1)").steps == [("probe", ["is_prime(1)"])]
    assert split_test("assert sum(gen(3)) == 5").steps == [("probe", ["sum(gen(3))"])]
    assert split_test("nums = [3, 1]\nassert f(nums) == 4").steps == [("exec", "nums = [3, 1]"), ("probe", ["f(nums)"])]
    check, _ = split_test("x = 2\nassert f(1) == x * 3").checks[0]
    assert ast.unparse(check) == "_p0 == 2 * 3"


@pytest.mark.parametrize("test", [
    "def check(candidate):\n    assert candidate(1) == 2\ncheck(f)",
    "for i in range(3):\n    assert f(i) == i",
    "if True:\n    assert f(1)",
])
def test_nested_asserts_are_refused(test):
    with pytest.raises(UserError, match="top-level `assert EXPR`"):
        split_test(test, 7)


@pytest.mark.parametrize("value", [
    None, True, 0, -5, 10 ** 400, 1.5, float("inf"), -0.0, 1 + 2j, "héllo\n\udc80", b"\x00\xff", bytearray(b"ab"),
    [1, [2, (3, {4})]], (), {"a": {1: [None]}}, frozenset({1, 2}), {1.5: "x", (1, 2): b""},
])
def test_values_round_trip_exactly(value):
    wire = ast.literal_eval(repr(code_driver.encode(value)))
    back = decode_value(wire)
    assert back == value and type(back) is type(value)


def test_other_values_are_opaque_and_malformed_ones_refused():
    v = decode_value(ast.literal_eval(repr(code_driver.encode(object()))))
    assert isinstance(v, Opaque) and v != v.__class__("object", True) and bool(v)
    for bad in [("i", 3), ("x", "1"), ("l", (1,)), ("d", [[1]]), ("?", "t"), 3, "s", ("set", [("l", [])])]:
        with pytest.raises((ValueError, TypeError)):
            decode_value(bad)
    with pytest.raises(ValueError):
        code_driver.encode(eval("[" * 120 + "]" * 120))


def test_the_parent_refuses_to_build_huge_values():
    """A check like `'x' * f() == 'xxx'` with f() = 10**12 must fail fast instead of exhausting this process."""
    start = time.monotonic()
    for source, value in (("'x' * _p0 == 'xxx'", 10 ** 12), ("[0] * _p0 == []", 10 ** 12), ("2 ** _p0 == 4", 10 ** 9),
                          ("1 << _p0 == 2", 10 ** 12)):
        ok, why = check_values(ast.parse(source, mode="eval"), [value])
        assert not ok and why == "the result is too large to check"
    assert time.monotonic() - start < 1.0
    assert check_values(ast.parse("'x' * _p0 == 'xxx'", mode="eval"), [3]) == (True, "")
    assert check_values(ast.parse("_p0 > 3", mode="eval"), [None])[1].startswith("checking the result raised TypeError")
    assert check_values(ast.parse("math.isclose(_p0, 0.1)", mode="eval"), [0.1 + 1e-12]) == (True, "")
    assert not math.isnan(0.0)


def test_result_lines_the_program_garbles_are_ignored():
    raw = b"garbage\n" + b"(" * 5000 + b"\n(0, 'values', [[1]])\n(0, 'values', [[2]])\n(5, 'values', [])\n(1, 'error', 3)\n"
    assert _parse_results(raw, 2) == {0: ("values", [[1]])}
