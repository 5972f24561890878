"""Procedurally generated, verifiable RL tasks: nothing to download, deterministic from a seed.

Four families, each a function `(n, seed=0, split="train", **options) -> list[Task]`:
- `arithmetic_tasks`: multi-digit expressions ("Compute 4821 * 37 + 512."), answer checked by the math reward;
- `countdown_tasks`: reach a target with given numbers using + - * / (a solution is known to exist: the
  target is built from the numbers), checked by the countdown reward (ast, no eval);
- `code_tasks`: small function-writing and stdin/stdout problems with tests run in the sandbox;
- `tool_tasks`: one request against a small simulated environment (the eval harness's kv and bank envs)
  that needs exactly one tool call; the task carries the tool schemas offered to the model (`meta["tools"]`,
  rendered into the system turn by the chat template) and the expected call, checked by the tool_call reward.

Held-out split: every task has a canonical key (its expression, numbers + target, or template +
parameters); a stable hash of the key puts one task in ten in "test", the rest in "train". A generator keeps
drawing until it has n distinct tasks of the requested split, so the splits never overlap, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from stepflash.errors import UserError
from stepflash.tasks.rewards import REWARDS
from stepflash.tasks.rewards.countdown import safe_eval

SPLITS = ("train", "test")
HELD_OUT_EVERY = 10  # one task key in ten is held out


@dataclass
class Task:
    prompt: str  # the user turn
    answer: str  # a reference answer (for code: a reference solution)
    reward_name: str  # key of REWARDS
    meta: dict = field(default_factory=dict)  # family-specific: numbers/target, template, ...
    tests: list = field(default_factory=list)  # code tasks: assert strings or {"input", "output"} dicts
    key: str = ""  # canonical identity (deduplication and the split)

    def reward(self, completion: str) -> float:
        return REWARDS[self.reward_name](self, completion)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        return cls(**d)


def split_of(key: str) -> str:
    """"test" for one key in HELD_OUT_EVERY (stable across runs and machines), else "train"."""
    return "test" if int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % HELD_OUT_EVERY == 0 else "train"


def _collect(n: int, seed: int, split: str, family: str, draw: Callable[[random.Random], Task | None]) -> list[Task]:
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise UserError(f"number of tasks must be >= 0, got {n}")
    rng = random.Random(f"{family}:{seed}")
    tasks, seen, misses = [], set(), 0
    while len(tasks) < n and misses < 2_000 + 100 * n:  # a small option space runs dry: stop and say so
        task = draw(rng)
        if task is None or task.key in seen or split_of(task.key) != split:
            misses += 1
            continue
        seen.add(task.key)
        tasks.append(task)
        misses = 0
    if len(tasks) == n:
        return tasks
    raise UserError(f"only {len(tasks)} distinct {family} tasks of split {split!r} found for n={n}; "
                    "widen the options (more digits, terms or numbers)")


def _number(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)


def arithmetic_tasks(n: int, seed: int = 0, split: str = "train", digits: tuple[int, int] = (2, 4),
                     ops: str = "+-*", terms: tuple[int, int] = (2, 3)) -> list[Task]:
    """Expressions of `terms` integers of `digits` digits joined by operators from `ops` (any of "+-*/";
    with "/" the answer may be a fraction, written like 7/3)."""
    if not ops or set(ops) - set("+-*/"):
        raise UserError(f"ops must be a non-empty subset of '+-*/', got {ops!r}")
    if not (1 <= digits[0] <= digits[1] and 2 <= terms[0] <= terms[1]):
        raise UserError(f"need 1 <= digits[0] <= digits[1] and 2 <= terms[0] <= terms[1], got {digits}, {terms}")

    def draw(rng: random.Random) -> Task | None:
        parts = [str(_number(rng, digits))]
        for _ in range(rng.randint(*terms) - 1):
            parts += [rng.choice(ops), str(_number(rng, digits))]
        expression = " ".join(parts)
        try:
            value, _ = safe_eval(expression)
        except ValueError:  # division by zero
            return None
        answer = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
        prompt = f"Compute {expression}. Give the exact value and put the final answer in \\boxed{{}}."
        return Task(prompt, answer, "arithmetic", {"expression": expression}, key=f"arith:{expression}")

    return _collect(n, seed, split, "arithmetic", draw)


def _reachable(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction]:
    """Combine a random subset of `numbers` (at least two) into one expression; returns it and its value."""
    pool = [(str(x), Fraction(x)) for x in rng.sample(numbers, rng.randint(2, len(numbers)))]
    while len(pool) > 1:
        (a, va), (b, vb) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
        op = rng.choice("+-*/")
        if op == "-" and va < vb:
            (a, va), (b, vb) = (b, vb), (a, va)  # keep intermediate values positive
        if op == "/" and (vb == 0 or (va / vb).denominator != 1):
            op = "+"  # keep intermediate values integers
        value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else va}[op]
        pool.append((f"({a} {op} {b})", value))
    expression, value = pool[0]
    return expression[1:-1], value  # drop the outer parentheses


def countdown_tasks(n: int, seed: int = 0, split: str = "train", num_numbers: int = 4, max_number: int = 50,
                    target_range: tuple[int, int] = (10, 500)) -> list[Task]:
    """`num_numbers` numbers in 1..max_number and a target in target_range reachable with some of them."""
    if num_numbers < 2 or max_number < 2:
        raise UserError(f"countdown needs num_numbers >= 2 and max_number >= 2, got {num_numbers}, {max_number}")

    def draw(rng: random.Random) -> Task | None:
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        expression, value = _reachable(rng, numbers)
        if value.denominator != 1 or not target_range[0] <= value <= target_range[1]:
            return None
        target = int(value)
        prompt = (f"Using the numbers {numbers}, write an arithmetic expression that equals {target}. You may use "
                  "+, -, *, / and parentheses, and each number at most once. Put the expression in \\boxed{}.")
        meta = {"numbers": numbers, "target": target}
        return Task(prompt, expression, "countdown", meta, key=f"countdown:{sorted(numbers)}:{target}")

    return _collect(n, seed, split, "countdown", draw)


# Code templates: (statement, reference solution, test inputs) built from random parameters.
_NAMES = ["solve", "compute", "transform", "answer", "process"]


def _code_scale_sum(rng: random.Random, name: str):
    k = rng.randint(2, 9)
    ref = f"def {name}(xs):\n    return {k} * sum(xs)\n"
    cases = [[rng.randint(-20, 20) for _ in range(rng.randint(0, 6))] for _ in range(4)]
    tests = [f"assert {name}({xs!r}) == {k * sum(xs)}" for xs in cases]
    return (f"Write a Python function `{name}(xs)` that returns {k} times the sum of the integers in the list xs.",
            ref, tests, f"scale_sum:{name}:{k}")


def _code_remove_char(rng: random.Random, name: str):
    c = rng.choice("aeiourst")
    ref = f"def {name}(s):\n    return s.replace({c!r}, '')\n"
    words = ["banana", "street", "toast", "sunrise", "", "aeiou", "rust", "missisippi", "tattoo"]
    tests = [f"assert {name}({w!r}) == {w.replace(c, '')!r}" for w in rng.sample(words, 4)]
    return (f"Write a Python function `{name}(s)` that returns the string s with every {c!r} removed.",
            ref, tests, f"remove_char:{name}:{c}")


def _code_count_multiples(rng: random.Random, name: str):
    k = rng.randint(2, 7)
    ref = f"def {name}(n):\n    return n // {k}\n"
    tests = [f"assert {name}({m}) == {m // k}" for m in rng.sample(range(0, 200), 4)]
    return (f"Write a Python function `{name}(n)` that returns how many of the integers 1..n are divisible "
            f"by {k}.", ref, tests, f"count_multiples:{name}:{k}")


def _code_add_const(rng: random.Random, name: str):
    k = rng.randint(2, 99)
    ref = f"def {name}(x):\n    return x + {k}\n"
    tests = [f"assert {name}({x}) == {x + k}" for x in rng.sample(range(-50, 100), 3)]
    return f"Write a Python function `{name}(x)` that returns x plus {k}.", ref, tests, f"add_const:{name}:{k}"


def _code_io_linear(rng: random.Random, name: str):
    a, b = rng.randint(2, 9), rng.randint(-9, 9)
    ref = f"x, y = map(int, input().split())\nprint({a} * x + y + {b})\n"
    pairs = [(rng.randint(-50, 50), rng.randint(-50, 50)) for _ in range(3)]
    tests = [{"input": f"{x} {y}\n", "output": f"{a * x + y + b}\n"} for x, y in pairs]
    return (f"Write a Python program that reads two integers x and y from one line of standard input and "
            f"prints {a}*x + y + ({b}).", ref, tests, f"io_linear:{a}:{b}")


_CODE_TEMPLATES = {"scale_sum": _code_scale_sum, "remove_char": _code_remove_char,
                   "count_multiples": _code_count_multiples, "io_linear": _code_io_linear,
                   "add_const": _code_add_const}
DEFAULT_CODE_TEMPLATES = ("scale_sum", "remove_char", "count_multiples", "io_linear")


def code_tasks(n: int, seed: int = 0, split: str = "train",
               templates: tuple[str, ...] = DEFAULT_CODE_TEMPLATES) -> list[Task]:
    """Small programming tasks with assert or stdin/stdout tests (the reference solution passes them all).
    `templates` picks the kinds (add_const, the easiest, is off by default); meta["statement"] is the
    problem without the answer-format sentence."""
    unknown = [t for t in templates if t not in _CODE_TEMPLATES]
    if not templates or unknown:
        raise UserError(f"code templates must be a non-empty subset of {', '.join(_CODE_TEMPLATES)}, got {templates}")
    makers = [_CODE_TEMPLATES[t] for t in templates]

    def draw(rng: random.Random) -> Task:
        statement, ref, tests, key = rng.choice(makers)(rng, rng.choice(_NAMES))
        prompt = statement + " Answer with the code in a ```python block."
        meta = {"template": key.split(":")[0], "statement": statement}
        return Task(prompt, ref, "code", meta, tests=tests, key=f"code:{key}")

    return _collect(n, seed, split, "code", draw)


# Tool templates: one request that needs exactly one call against the kv or bank env of the eval harness. Keys,
# values and account ids are digit strings ("k27", "417", "3021"): digits are single tokens that every domain
# trains, so a small model can learn to copy them into the call (it did not learn to copy rarer words), and
# they are quoted so they tokenize as they do in the call's parameter.
TOOL_SYSTEM = "Use the tools to carry out the request, then say what happened in one sentence."


def _key(rng: random.Random) -> str:
    return f"k{rng.randint(10, 99)}"


def _value(rng: random.Random) -> str:
    return str(rng.randint(100, 999))


def _kv_store(rng: random.Random, n: int) -> dict:
    store = {}
    while len(store) < n:
        store[_key(rng)] = _value(rng)
    return store


def _tool_kv_get(rng):
    store = _kv_store(rng, 3)
    key = rng.choice(sorted(store))
    return ("kv", {"store": store}, f"What is stored under the key '{key}'?", ("kv_get", {"key": key}),
            {"answer": store[key]}, f"The value of '{key}' is {store[key]}.")


def _tool_kv_set(rng):
    store = _kv_store(rng, 2)
    key, value = rng.choice([*store, _key(rng)]), _value(rng)  # overwrite a key or add one
    if store.get(key) == value:
        return None
    return ("kv", {"store": store}, f"Set the key '{key}' to '{value}'.", ("kv_set", {"key": key, "value": value}),
            {"state": {"store": {key: value}}}, f"Done: '{key}' is now {value}.")


def _tool_kv_delete(rng):
    store = _kv_store(rng, 3)
    key = rng.choice(sorted(store))
    return ("kv", {"store": store}, f"Delete the key '{key}'.", ("kv_delete", {"key": key}),
            {"state": {"store": {key: None}}}, f"Deleted '{key}'.")


def _bank(rng: random.Random) -> dict:
    accounts = {}
    while len(accounts) < 3:
        accounts[str(rng.randint(1000, 9999))] = {"balance": rng.randint(100, 500), "frozen": False}
    return accounts


def _tool_balance(rng):
    accounts = _bank(rng)
    name = rng.choice(sorted(accounts))
    balance = accounts[name]["balance"]
    return ("bank", {"accounts": accounts}, f"What is the balance of account '{name}'?", ("get_balance", {"account": name}),
            {"answer": str(balance)}, f"The balance of account {name} is {balance}.")


def _tool_transfer(rng):
    accounts = _bank(rng)
    source, target = rng.sample(sorted(accounts), 2)
    amount = rng.randint(1, 99)
    goal = {"accounts": {source: {"balance": accounts[source]["balance"] - amount},
                         target: {"balance": accounts[target]["balance"] + amount}}}
    return ("bank", {"accounts": accounts}, f"Send {amount} from account '{source}' to account '{target}'.",
            ("transfer", {"source": source, "target": target, "amount": amount}), {"state": goal},
            f"Sent {amount} from account {source} to account {target}.")


def _tool_freeze(rng):
    accounts = _bank(rng)
    name = rng.choice(sorted(accounts))
    return ("bank", {"accounts": accounts}, f"Freeze account '{name}'.", ("freeze_account", {"account": name}),
            {"state": {"accounts": {name: {"frozen": True}}}}, f"Account {name} is frozen.")


_TOOL_TEMPLATES = [_tool_kv_get, _tool_kv_set, _tool_kv_delete, _tool_balance, _tool_transfer, _tool_freeze]


def _brief_schema(tool: dict) -> dict:
    """The env's tool schema without the per-parameter descriptions (their names and types say as much), which
    would double the prompt of a small model; the function's own description stays."""
    fn = tool["function"]
    props = {k: {"type": v["type"]} for k, v in fn["parameters"]["properties"].items()}
    return {"type": "function", "function": {**fn, "parameters": {**fn["parameters"], "properties": props}}}


def tool_tasks(n: int, seed: int = 0, split: str = "train", distractors: int = 1) -> list[Task]:
    """Single-call tool requests. The model is offered the needed tool and `distractors` other tools of the same
    env (`_brief_schema`), in random order; meta holds the env, its initial state, the goal (eval harness format), the expected
    call and a reference final reply. `answer` is the expected call as JSON."""
    from stepflash.tasks.tool_env import ENVS

    if distractors < 0:
        raise UserError(f"distractors must be >= 0, got {distractors}")

    def draw(rng: random.Random) -> Task | None:
        made = rng.choice(_TOOL_TEMPLATES)(rng)
        if made is None:
            return None
        env, init, request, (name, arguments), goal, final = made
        schemas = {t["function"]["name"]: _brief_schema(t) for t in ENVS[env].TOOLS}
        others = [t for t in schemas if t != name]
        offered = [name] + rng.sample(others, min(distractors, len(others)))
        rng.shuffle(offered)
        call = {"name": name, "arguments": arguments}
        meta = {"env": env, "init": init, "goal": goal, "call": call, "final": final, "system": TOOL_SYSTEM,
                "tools": [schemas[t] for t in offered]}
        key = "tool:" + json.dumps([request, init, offered], sort_keys=True)
        return Task(request, json.dumps(call, sort_keys=True), "tool_call", meta, key=key)

    return _collect(n, seed, split, "tool", draw)


TASKS: dict[str, Callable[..., list[Task]]] = {
    "arithmetic": arithmetic_tasks,
    "countdown": countdown_tasks,
    "code": code_tasks,
    "tool": tool_tasks,
}


def make_tasks(family: str, n: int, seed: int = 0, split: str = "train", **options) -> list[Task]:
    if family not in TASKS:
        raise UserError(f"unknown task family {family!r}; known: {', '.join(TASKS)}")
    return TASKS[family](n, seed=seed, split=split, **options)
