"""Assert-style tests checked in the trusted parent: the sandbox computes values, the parent decides.

A test such as `assert two_sum([2, 7], 9) == (0, 1)` is split (`split_test`) into
- probes: the smallest expressions the parent cannot evaluate itself, here `two_sum([2, 7], 9)`; only
  these go into the sandbox, where the test driver (`code_driver.py`) evaluates them in the solution's
  namespace and writes back their values (plain data: numbers, strings, bytes, lists, tuples, sets, dicts;
  anything else as an opaque stand-in);
- a check: the rest of the assert, `_p0 == (0, 1)`, evaluated here (`check_values`) over the decoded values.
The expected values never enter the sandbox, so a program that takes over the driver (it can: it runs in the
same interpreter) can only claim what its calls returned, which is what a solution does anyway; it cannot
claim "passed".

What counts as evaluable here: constants, containers, arithmetic, comparisons, `and`/`or`/`not`, `x if c else y`,
subscripts, calls of pure builtins (abs, len, sorted, min, max, sum, round, set, list, ...) and of math.isclose
& co. Anything else (a call of the solution, a method call, a comprehension) is a probe. A builtin applied to
probes alone (`sorted(f(x))`, `sum(f(x))`, `list(f(x))`) moves into the probe: it holds no expected value,
and a generator result, which only exists in the sandbox, still compares. Top-level statements that are
not asserts (`s = Solution()`) run in the sandbox before the asserts that follow them; a top-level
`NAME = <evaluable expression>` stays here (and is substituted where a probe uses NAME) unless the
sandbox's code reads NAME (an input it may mutate, `sort_in_place(xs)`). An assert nested in a function, loop or block cannot be split and is
refused (`UserError`). Probes are evaluated eagerly, so `assert x > 0 and f(1 / x)` raises where Python
would short-circuit.
"""

from __future__ import annotations

import ast
import copy
import functools
import math
import operator
from collections import Counter
from dataclasses import dataclass, field

from stepflash.errors import UserError

PURE = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "sorted": sorted, "dict": dict,
        "len": len, "str": str, "int": int, "float": float, "bool": bool, "abs": abs, "min": min, "max": max,
        "sum": sum, "round": round, "all": all, "any": any, "repr": repr, "isinstance": isinstance, "type": type, "reversed": reversed, "divmod": divmod,
        "complex": complex}  # not bytes, range, ...: bytes(10**12) from a program's value would exhaust the parent
MATH = {"isclose", "isnan", "isinf", "isfinite", "fabs", "floor", "ceil", "sqrt", "pi", "e", "inf", "nan", "gcd"}
_MAX_LEN = 10 ** 7  # elements a check may build (a value is the program's: it must not exhaust the parent)
_MAX_INT_BITS = 1 << 20
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitOr: operator.or_,
           ast.BitXor: operator.xor, ast.BitAnd: operator.and_}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
            ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_PROBE = "_p"  # placeholder names: _p0, _p1, ... (index into the assert's probes)


@dataclass
class SplitTest:
    steps: list = field(default_factory=list)  # for the sandbox: ("exec", source) | ("probe", [source, ...])
    checks: list = field(default_factory=list)  # per "probe" step: (check AST over _p<k>, the assert's text)

    @property
    def probe_counts(self) -> list[int]:
        """Values the sandbox must send back, per assert."""
        return [len(body) for kind, body in self.steps if kind == "probe"]


class _Splitter:
    def __init__(self, env: dict[str, ast.expr]):
        self.env = env  # names bound to evaluable expressions (kept here)
        self.probes: list[str] = []
        self.sandbox_names: set[str] = set()  # names the sandbox's code reads

    def to_sandbox(self, node: ast.AST) -> str:
        """Source of `node` for the sandbox, with the names bound here replaced by their expressions."""
        env = self.env
        self.sandbox_names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}

        class Sub(ast.NodeTransformer):
            def visit_Name(self, n):
                return copy.deepcopy(env[n.id]) if isinstance(n.ctx, ast.Load) and n.id in env else n
        return ast.unparse(ast.fix_missing_locations(Sub().visit(copy.deepcopy(node))))

    def probe(self, node: ast.expr) -> ast.Name:
        self.probes.append(self.to_sandbox(node))
        return ast.Name(f"{_PROBE}{len(self.probes) - 1}", ast.Load())

    def split(self, node: ast.expr) -> ast.expr:
        """`node` with every subtree this parent cannot evaluate replaced by a probe placeholder."""
        s = self.split
        if isinstance(node, ast.Constant):
            return node
        if isinstance(node, ast.Name):
            if node.id in self.env:
                return copy.deepcopy(self.env[node.id])
            return node if node.id in PURE else self.probe(node)
        if isinstance(node, (ast.Tuple, ast.List)) and not any(isinstance(e, ast.Starred) for e in node.elts):
            return type(node)([s(e) for e in node.elts], ast.Load())
        if isinstance(node, ast.Set) and not any(isinstance(e, ast.Starred) for e in node.elts):
            return ast.Set([s(e) for e in node.elts])
        if isinstance(node, ast.Dict) and None not in node.keys:
            return ast.Dict([s(k) for k in node.keys], [s(v) for v in node.values])
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return ast.UnaryOp(node.op, s(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return ast.BinOp(s(node.left), node.op, s(node.right))
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(node.op, [s(v) for v in node.values])
        if isinstance(node, ast.Compare):
            return ast.Compare(s(node.left), node.ops, [s(c) for c in node.comparators])
        if isinstance(node, ast.IfExp):
            return ast.IfExp(s(node.test), s(node.body), s(node.orelse))
        if isinstance(node, ast.Subscript):
            return ast.Subscript(s(node.value), s(node.slice), ast.Load())
        if isinstance(node, ast.Slice):
            return ast.Slice(*(None if p is None else s(p) for p in (node.lower, node.upper, node.step)))
        if _is_math(node):
            return node
        if isinstance(node, ast.Call) and self.evaluable_function(node.func) \
                and not any(isinstance(a, ast.Starred) for a in node.args) and all(k.arg for k in node.keywords):
            return self.split_call(node)
        return self.probe(node)

    def evaluable_function(self, func: ast.expr) -> bool:
        return _is_math(func) or (isinstance(func, ast.Name) and func.id in PURE and func.id not in self.env)

    def split_call(self, node: ast.Call) -> ast.expr:
        first = len(self.probes)
        args = [self.split(a) for a in node.args]
        builtin = isinstance(node.func, ast.Name) and not node.keywords
        if builtin and args and all(_is_probe(a) for a in args) and len(self.probes) - first == len(args):
            del self.probes[first:]  # a builtin of probes only (sum(f(x))): no expected value in it, and
            return self.probe(node)  # the sandbox can apply it to what only lives there (a generator)
        return ast.Call(node.func, args, [ast.keyword(k.arg, self.split(k.value)) for k in node.keywords])


def _is_math(node) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math" \
        and node.attr in MATH


def _is_probe(node) -> bool:
    return isinstance(node, ast.Name) and node.id.startswith(_PROBE) and node.id[len(_PROBE):].isdigit()


@functools.lru_cache(maxsize=4096)
def split_test(source: str, index: int = 0) -> SplitTest:
    """Split one test (see the module docstring); `index` only names the test in errors. The result is
    shared (cached): do not change it."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise UserError(f"code test {index} is not valid Python: {e.msg} (line {e.lineno})") from e
    for stmt in tree.body:
        if not isinstance(stmt, ast.Assert) and any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
            raise UserError(f"code test {index}: an assert inside a {type(stmt).__name__.lower()} statement cannot be "
                            "checked outside the sandbox; write each check as a top-level `assert EXPR`")
    stores = Counter(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load))
    kept = {name for s in tree.body if (name := _assigned_name(s)) and stores[name] == 1}
    while True:  # a name the sandbox's code reads (an input, or mutated there) must live there
        out, sandbox_names = _split_statements(tree, kept)
        if not sandbox_names & kept:
            return out
        kept -= sandbox_names


def _split_statements(tree: ast.Module, kept: set[str]) -> tuple[SplitTest, set[str]]:
    env: dict[str, ast.expr] = {}
    out, sandbox_names = SplitTest(), set()
    for stmt in tree.body:
        splitter, name = _Splitter(env), _assigned_name(stmt)
        if isinstance(stmt, ast.Assert):
            check = splitter.split(stmt.test)
            out.steps.append(("probe", splitter.probes))
            out.checks.append((ast.fix_missing_locations(ast.Expression(check)), ast.unparse(stmt.test)))
            sandbox_names |= splitter.sandbox_names
            continue
        if name in kept:
            value = splitter.split(stmt.value)
            if not splitter.probes:  # evaluable here: it stays out of the sandbox
                env[name] = value
                continue
            splitter = _Splitter(env)
        out.steps.append(("exec", splitter.to_sandbox(stmt)))
        sandbox_names |= splitter.sandbox_names
    return out, sandbox_names


def _assigned_name(stmt: ast.stmt) -> str | None:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    return None


def check_values(check: ast.Expression, values: list) -> tuple[bool, str]:
    """(passed, why not) for one assert's check over its probes' decoded values."""
    try:
        ok = bool(_Evaluator(values).eval(check.body))
    except _TooBig:
        return False, "the result is too large to check"
    except Exception as e:  # the program's values may not fit the check (None > 3): the assert fails
        return False, f"checking the result raised {type(e).__name__}: {e}"[:200]
    if ok:
        return True, ""
    shown = ", ".join(_short(v) for v in values)
    return False, f"got {shown}" if values else "the check is false"


def _short(value, limit: int = 80) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr
        text = "<a very large int>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Opaque:
    """A value of a type the driver does not encode (a class instance, a generator): equal only to itself."""

    def __init__(self, type_name: str, truthy: bool):
        self.type_name, self.truthy = type_name, truthy

    def __bool__(self) -> bool:
        return self.truthy

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


_CONTAINERS = {"l": list, "t": tuple, "set": set, "fs": frozenset}


def decode_value(obj):
    """The value `code_driver.encode` sent (see its docstring). ValueError for anything malformed: the
    encoding comes from a process the program controls."""
    if obj is None or obj is True or obj is False:
        return obj
    if not isinstance(obj, tuple) or not obj or not isinstance(obj[0], str):
        raise ValueError("malformed value")
    tag, rest = obj[0], obj[1:]
    if tag == "i" and len(rest) == 1 and isinstance(rest[0], str):
        return int(rest[0], 16)
    if tag == "f" and len(rest) == 1 and isinstance(rest[0], str):
        return float.fromhex(rest[0])
    if tag == "c" and len(rest) == 2 and all(isinstance(r, str) for r in rest):
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag == "s" and len(rest) == 1 and isinstance(rest[0], str):
        return rest[0]
    if tag in ("b", "ba") and len(rest) == 1 and isinstance(rest[0], str):
        return (bytes if tag == "b" else bytearray).fromhex(rest[0])
    if tag in _CONTAINERS and len(rest) == 1 and isinstance(rest[0], list):
        return _CONTAINERS[tag](decode_value(v) for v in rest[0])
    if tag == "d" and len(rest) == 1 and isinstance(rest[0], list) \
            and all(isinstance(kv, list) and len(kv) == 2 for kv in rest[0]):
        return {decode_value(k): decode_value(v) for k, v in rest[0]}
    if tag == "?" and len(rest) == 2 and isinstance(rest[0], str) and isinstance(rest[1], bool):
        return Opaque(rest[0][:100], rest[1])
    raise ValueError("malformed value")


class _TooBig(Exception):
    pass


class _Evaluator:
    def __init__(self, values: list):
        self.values = values

    def eval(self, node: ast.expr):
        e = self.eval
        if isinstance(node, ast.Constant):
            return node.value
        if _is_probe(node):
            return self.values[int(node.id[len(_PROBE):])]
        if isinstance(node, ast.Name):
            return PURE[node.id]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](e(x) for x in node.elts)
        if isinstance(node, ast.Dict):
            return {e(k): e(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](e(node.operand))
        if isinstance(node, ast.BinOp):
            left, right = e(node.left), e(node.right)
            _guard(type(node.op), left, right)
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.BoolOp):
            result = e(node.values[0])
            for v in node.values[1:]:
                if isinstance(node.op, ast.And) != bool(result):
                    return result
                result = e(v)
            return result
        if isinstance(node, ast.Compare):
            left = e(node.left)
            for op, comp in zip(node.ops, node.comparators):
                right = e(comp)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return e(node.body) if e(node.test) else e(node.orelse)
        if isinstance(node, ast.Subscript):
            return e(node.value)[e(node.slice)]
        if isinstance(node, ast.Slice):
            return slice(*(None if p is None else e(p) for p in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.Attribute):
            return getattr(math, node.attr)
        if isinstance(node, ast.Call):
            return e(node.func)(*(e(a) for a in node.args), **{k.arg: e(k.value) for k in node.keywords})
        raise AssertionError(f"not evaluable here: {ast.dump(node)}")  # split_test only leaves the nodes above


def _guard(op: type, left, right) -> None:
    """Refuse arithmetic whose result would be huge (`'x' * f()` with f() = 10**12)."""
    sized = (str, bytes, bytearray, list, tuple)
    if op is ast.Mult:
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(n, int) and len(seq) * n > _MAX_LEN:
                raise _TooBig
    if op is ast.Pow and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
            and right * left.bit_length() > _MAX_INT_BITS:
        raise _TooBig
    if op is ast.LShift and isinstance(left, int) and isinstance(right, int) and right > _MAX_INT_BITS:
        raise _TooBig
