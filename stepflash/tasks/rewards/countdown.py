"""Countdown reward: "reach TARGET with these numbers using + - * /", checked without eval.

The answer (last `\\boxed{...}`, else the last "Answer: ..." line, else the last line that looks like an
arithmetic expression) is parsed with `ast` in eval mode; only integer literals, + - * / and parentheses are
accepted (no unary minus, no powers, no names, no calls). It is evaluated exactly with fractions. Reward 1.0
when every number used is one of the given numbers, each at most as often as it is given, and the value
equals the target; 0.0 otherwise (including division by zero and anything unparsable).
"""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from stepflash.errors import UserError
from stepflash.tasks.rewards import strip_reasoning, task_field
from stepflash.tasks.rewards.math_verifier import _ANSWER_LINE, _boxed_contents

MAX_EXPRESSION_CHARS = 200
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_EXPRESSION_LINE = re.compile(r"[\d\s()+\-*/×÷=.]+")


class ExpressionError(ValueError):
    """An answer that is not a plain arithmetic expression over integers."""


def safe_eval(expression: str) -> tuple[Fraction, list[int]]:
    """Value of `expression` (+ - * / and parentheses over integer literals) and the literals it uses."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError("expression too long")
    try:
        tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")
    except (SyntaxError, ValueError) as e:
        raise ExpressionError(str(e))
    used: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ExpressionError("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise ExpressionError(f"{type(node).__name__} is not allowed")

    return walk(tree.body), used


def extract_expression(completion: str) -> str | None:
    text = strip_reasoning(completion)
    boxed = _boxed_contents(text)
    if boxed:
        candidate = boxed[-1]
    else:
        lines = _ANSWER_LINE.findall(text)
        exprs = [ln for ln in text.splitlines() if _EXPRESSION_LINE.fullmatch(ln.strip() or "x")]
        candidate = lines[-1] if lines else (exprs[-1] if exprs else None)
    if candidate is None:
        return None
    candidate = candidate.strip().strip("$").rstrip(".").strip()
    return candidate.split("=")[0].strip() or None  # "3 * 4 + 2 = 14" -> the left side


def countdown_reward(prompt: Any, completion: str) -> float:
    """1.0 for an expression that uses the given numbers (each at most once) and equals the target."""
    numbers, target = task_field(prompt, "numbers"), task_field(prompt, "target")
    if numbers is None or target is None:
        raise UserError("a countdown task needs 'numbers' and 'target'")
    expression = extract_expression(completion)
    if expression is None:
        return 0.0
    try:
        value, used = safe_eval(expression)
    except ExpressionError:
        return 0.0
    if Counter(used) - Counter(int(n) for n in numbers):  # some number used more often than given
        return 0.0
    return 1.0 if value == int(target) else 0.0
