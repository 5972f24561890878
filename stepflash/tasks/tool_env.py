"""Small simulated tool environments (tau2-bench style) and the goal check of a tool item.

An environment is a state (plain JSON data) plus tools that read and change it. The model calls tools
by name with JSON arguments; each call returns a JSON string, errors included ({"error": "..."}), so a
bad call is feedback for the model, never an exception. Three environments:
- "kv": a key-value store (kv_get, kv_set, kv_delete, kv_list);
- "bank": accounts with balances and a frozen flag (get_balance, transfer, freeze_account);
- "airline": flights with seats and bookings (search_flights, get_booking, book_flight, cancel_booking).

A tool item: {"task": user request, "env": name, "goal": {...}, "tools": [schemas] (default: all of the
env's), "init": {initial state} (default: the env's), "max_turns": int}. The goal has "state" and/or
"answer": "state" is a nested subset the final state must match (a null value: that key must be absent);
"answer" is text the final reply must contain as a whole word (case-insensitive).
"""

from __future__ import annotations

import copy
import json
import re

from stepflash.errors import UserError


def _fn(name: str, description: str, params: dict[str, tuple[str, str]], required: list[str] | None = None) -> dict:
    """An OpenAI tool schema; params: {name: (json type, description)}."""
    props = {k: {"type": t, "description": d} for k, (t, d) in params.items()}
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": props,
                       "required": list(params) if required is None else required}}}


class ToolEnv:
    """Base: subclasses define DEFAULT_STATE, TOOLS (schemas) and one `tool_<name>(state, **args)` each."""

    name = ""
    DEFAULT_STATE: dict = {}
    TOOLS: list[dict] = []

    def __init__(self, state: dict | None = None):
        self.state = copy.deepcopy(self.DEFAULT_STATE if state is None else state)
        self.schemas = {t["function"]["name"]: t["function"]["parameters"] for t in self.TOOLS}

    def call(self, name: str, arguments: dict | str) -> str:
        """Run one tool call; the result (or the error) as a JSON string."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                return _error("arguments are not valid JSON")
        if name not in self.schemas:
            return _error(f"unknown tool {name!r}")
        if not isinstance(arguments, dict):
            return _error("arguments must be a JSON object")
        schema = self.schemas[name]
        missing = [k for k in schema.get("required", []) if k not in arguments]
        unknown = [k for k in arguments if k not in schema["properties"]]
        if missing or unknown:
            return _error(f"{name}: missing {missing}, unknown {unknown}" if missing and unknown else
                          f"{name}: missing argument(s) {', '.join(missing)}" if missing else
                          f"{name}: unknown argument(s) {', '.join(unknown)}")
        try:
            result = getattr(self, f"tool_{name}")(**arguments)
        except ToolError as e:
            return _error(str(e))
        return json.dumps(result, ensure_ascii=False, sort_keys=True)


class ToolError(Exception):
    """A tool refusing a call (unknown id, not enough money, ...): reported to the model as an error."""


def _error(message: str) -> str:
    return json.dumps({"error": message})


class KVEnv(ToolEnv):
    name = "kv"
    DEFAULT_STATE = {"store": {"color": "blue", "size": "10", "owner": "dana"}}
    TOOLS = [
        _fn("kv_get", "Read the value stored under a key.", {"key": ("string", "the key")}),
        _fn("kv_set", "Store a value under a key (overwrites).", {"key": ("string", "the key"),
                                                                 "value": ("string", "the value")}),
        _fn("kv_delete", "Delete a key.", {"key": ("string", "the key")}),
        _fn("kv_list", "List the keys, optionally only those starting with a prefix.",
            {"prefix": ("string", "key prefix")}, required=[]),
    ]

    def tool_kv_get(self, key):
        if key not in self.state["store"]:
            raise ToolError(f"no key {key!r}")
        return {"key": key, "value": self.state["store"][key]}

    def tool_kv_set(self, key, value):
        self.state["store"][str(key)] = str(value)
        return {"ok": True}

    def tool_kv_delete(self, key):
        if self.state["store"].pop(key, None) is None:
            raise ToolError(f"no key {key!r}")
        return {"ok": True}

    def tool_kv_list(self, prefix=""):
        return {"keys": sorted(k for k in self.state["store"] if k.startswith(str(prefix)))}


class BankEnv(ToolEnv):
    name = "bank"
    DEFAULT_STATE = {"accounts": {"alice": {"balance": 120, "frozen": False},
                                  "bob": {"balance": 45, "frozen": False},
                                  "carol": {"balance": 300, "frozen": True}}}
    TOOLS = [
        _fn("get_balance", "The balance of an account.", {"account": ("string", "account name")}),
        _fn("transfer", "Move money between two accounts.", {
            "source": ("string", "account to take from"), "target": ("string", "account to pay into"),
            "amount": ("integer", "whole amount, > 0")}),
        _fn("freeze_account", "Freeze an account: no money may leave or enter it.",
            {"account": ("string", "account name")}),
    ]

    def _account(self, name):
        if name not in self.state["accounts"]:
            raise ToolError(f"no account {name!r}")
        return self.state["accounts"][name]

    def tool_get_balance(self, account):
        return {"account": account, "balance": self._account(account)["balance"]}

    def tool_transfer(self, source, target, amount):
        src, dst = self._account(source), self._account(target)
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise ToolError("amount must be a positive whole number")
        if source == target:
            raise ToolError("source and target are the same account")
        if src["frozen"] or dst["frozen"]:
            raise ToolError(f"account {source if src['frozen'] else target!r} is frozen")
        if src["balance"] < amount:
            raise ToolError(f"insufficient funds: {source!r} has {src['balance']}")
        src["balance"] -= amount
        dst["balance"] += amount
        return {"ok": True, "source_balance": src["balance"], "target_balance": dst["balance"]}

    def tool_freeze_account(self, account):
        self._account(account)["frozen"] = True
        return {"ok": True}


class AirlineEnv(ToolEnv):
    name = "airline"
    DEFAULT_STATE = {
        "flights": {
            "SA100": {"origin": "SFO", "destination": "JFK", "date": "2025-05-01", "seats": 2, "price": 320},
            "SA101": {"origin": "SFO", "destination": "JFK", "date": "2025-05-02", "seats": 0, "price": 280},
            "SA200": {"origin": "JFK", "destination": "LHR", "date": "2025-05-03", "seats": 5, "price": 610},
            "SA300": {"origin": "SEA", "destination": "SFO", "date": "2025-05-01", "seats": 1, "price": 150},
        },
        "bookings": {"BK1": {"flight": "SA200", "passenger": "Ann Lee"}},
        "next_booking": 2,
    }
    TOOLS = [
        _fn("search_flights", "Flights between two airports on a date (YYYY-MM-DD), with seats left and price.", {
            "origin": ("string", "IATA code"), "destination": ("string", "IATA code"),
            "date": ("string", "YYYY-MM-DD")}),
        _fn("get_booking", "Look up a booking by id.", {"booking_id": ("string", "e.g. BK1")}),
        _fn("book_flight", "Book one seat on a flight for a passenger.", {
            "flight": ("string", "flight number"), "passenger": ("string", "full name")}),
        _fn("cancel_booking", "Cancel a booking and free its seat.", {"booking_id": ("string", "e.g. BK1")}),
    ]

    def tool_search_flights(self, origin, destination, date):
        found = [{"flight": f, **info} for f, info in sorted(self.state["flights"].items())
                 if (info["origin"], info["destination"], info["date"]) == (origin, destination, date)]
        return {"flights": found}

    def _booking(self, booking_id):
        if booking_id not in self.state["bookings"]:
            raise ToolError(f"no booking {booking_id!r}")
        return self.state["bookings"][booking_id]

    def tool_get_booking(self, booking_id):
        return {"booking_id": booking_id, **self._booking(booking_id)}

    def tool_book_flight(self, flight, passenger):
        info = self.state["flights"].get(flight)
        if info is None:
            raise ToolError(f"no flight {flight!r}")
        if info["seats"] <= 0:
            raise ToolError(f"flight {flight} is full")
        booking_id = f"BK{self.state['next_booking']}"
        self.state["next_booking"] += 1
        info["seats"] -= 1
        self.state["bookings"][booking_id] = {"flight": flight, "passenger": str(passenger)}
        return {"booking_id": booking_id, "flight": flight, "price": info["price"]}

    def tool_cancel_booking(self, booking_id):
        booking = self._booking(booking_id)
        self.state["flights"][booking["flight"]]["seats"] += 1
        del self.state["bookings"][booking_id]
        return {"ok": True}


ENVS: dict[str, type[ToolEnv]] = {cls.name: cls for cls in (KVEnv, BankEnv, AirlineEnv)}


def make_env(item: dict) -> ToolEnv:
    return ENVS[item["env"]](item.get("init"))


def item_tools(item: dict) -> list[dict]:
    """The tool schemas offered to the model: the item's, else all of its environment's."""
    return item.get("tools") or ENVS[item["env"]].TOOLS


def check_item(item: dict, where: str) -> None:
    """Raise a one-line UserError for a tool item that cannot run."""
    if item["env"] not in ENVS:
        raise UserError(f"{where}: unknown env {item['env']!r}; known: {', '.join(sorted(ENVS))}")
    goal = item["goal"]
    if not isinstance(goal, dict) or not ({"state", "answer"} & set(goal)):
        raise UserError(f"{where}: 'goal' must be an object with 'state' and/or 'answer'")
    known = {t["function"]["name"] for t in ENVS[item["env"]].TOOLS}
    for tool in item.get("tools") or []:
        name = (tool.get("function") or {}).get("name") if isinstance(tool, dict) else None
        if name not in known:
            raise UserError(f"{where}: tool {name!r} is not one of the {item['env']} env's ({', '.join(sorted(known))})")


def state_mismatch(expected, actual, path: str = "") -> str | None:
    """None when `expected` is a subset of `actual` (null = absent), else where and how they differ."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{path or 'state'}: expected an object, got {json.dumps(actual)}"
        for key, want in expected.items():
            where = f"{path}.{key}" if path else key
            if want is None:
                if actual.get(key) is not None:
                    return f"{where}: expected absent, got {json.dumps(actual[key])}"
            elif key not in actual:
                return f"{where}: expected {json.dumps(want)}, but it is absent"
            elif (diff := state_mismatch(want, actual[key], where)) is not None:
                return diff
        return None
    return None if expected == actual else f"{path}: expected {json.dumps(expected)}, got {json.dumps(actual)}"


def answer_mentions(answer: str | None, expected: str) -> bool:
    """Does the final reply contain `expected` as a whole word/number (case-insensitive)?"""
    pattern = r"(?<![\w.])" + re.escape(str(expected).strip()) + r"(?![\w]|\.\d)"
    return bool(answer) and re.search(pattern, answer, re.IGNORECASE) is not None
