"""Typing tool-call arguments by the tool's JSON schema.

The model writes every argument value as text between `<parameter=NAME>` and `</parameter>`; the
tool's schema says what it should become. Types are read leniently, as vLLM reads them: "float",
"int64", "bool", "dict", "list" and friends count as their JSON Schema types; `anyOf`/`oneOf` and type
lists are tried in order. A value that does not fit its type is kept as the text (a wrong value is the
tool's to reject, not ours to drop). A parameter with no schema gets JSON when its text parses as JSON.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

_INTEGER = re.compile(r"[-+]?\d+")
_NULLS = ("null", "None")


def tool_schemas(tools: list[dict] | None) -> dict[str, dict]:
    """OpenAI `tools` -> {function name: its parameters JSON schema}."""
    schemas = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            schemas[fn["name"]] = params if isinstance(params, dict) else {}
    return schemas


def properties(schema: dict) -> dict:
    """A function schema's parameter schemas ({} when it lists none)."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    return props if isinstance(props, dict) else {}


def _canonical(kind: str) -> str | None:
    """A schema type name as written by tool authors -> its JSON Schema type (None: unknown)."""
    k = kind.strip().lower()
    if k in ("string", "str", "text", "varchar", "char", "enum"):
        return "string"
    if k.startswith(("int", "uint", "long", "short", "unsigned")):
        return "integer"
    if k.startswith(("num", "float", "double", "decimal")):
        return "number"
    if k in ("boolean", "bool", "binary"):
        return "boolean"
    if k.startswith(("object", "dict", "map")):
        return "object"
    if k.startswith(("array", "arr", "list", "sequence", "tuple")):
        return "array"
    if k in ("null", "none"):
        return "null"
    return None


def schema_types(schema: Any) -> list[str]:
    """The JSON types a parameter schema allows, in the order written (enum of strings: "string")."""
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    names = [kind] if isinstance(kind, str) else [t for t in kind or [] if isinstance(t, str)]
    types = [t for t in (_canonical(n) for n in names) if t]
    for alt in (schema.get("anyOf") or []) + (schema.get("oneOf") or []):
        types += schema_types(alt)
    if not types and isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]):
        types = ["string"]
    return list(dict.fromkeys(types))


def is_plain_string(schema: Any) -> bool:
    """True when the value can only be a string: it is then streamed as it is written."""
    return schema_types(schema) == ["string"]


def _container(text: str, kind: type):
    """JSON first, then a Python literal (values written with str() look like `{'a': True}`)."""
    for load in (json.loads, ast.literal_eval):
        try:
            value = load(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, kind):
            return value
    raise ValueError


def _number(text: str) -> int | float:
    if _INTEGER.fullmatch(text):
        return int(text)
    value = float(text)
    if not math.isfinite(value):  # JSON has no NaN or Infinity
        raise ValueError
    return value


def _convert(text: str, kind: str) -> Any:
    if kind == "integer" and _INTEGER.fullmatch(text):
        return int(text)
    if kind == "number":
        return _number(text)
    if kind == "boolean" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if kind == "object":
        return _container(text, dict)
    if kind == "array":
        return _container(text, list)
    raise ValueError


def coerce_value(text: str, schema: Any) -> Any:
    """A parameter's text -> a value of the type its JSON schema asks for (see the module docstring)."""
    types = schema_types(schema)
    s = text.strip()
    if not types:
        try:
            return json.loads(s)
        except ValueError:
            return text
    if s in _NULLS and ("null" in types or "string" not in types):
        return None  # the template writes None as "None"; vLLM reads "null" as null for any type
    for kind in types:
        if kind not in ("string", "null"):
            try:
                return _convert(s, kind)
            except (ValueError, OverflowError):
                continue
    return text
