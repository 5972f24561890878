"""The Step 3.5 chat format: rendering conversations to a prompt, parsing replies back.

Rendering. `ChatTemplate` renders OpenAI-style messages with a Jinja template in a sandboxed
environment: the checkpoint's own (`tokenizer_config.json` "chat_template", or `chat_template.jinja`)
when it has one, else `DEFAULT_CHAT_TEMPLATE`, which follows the public Step 3.5 Flash layout:
- turns are `<|im_start|>{role}\n{content}<|im_end|>\n`; `tools` go into the system turn as JSON lines
  inside `<tools>...</tools>`, after the caller's system prompt;
- an assistant turn is `<think>\n{reasoning}\n</think>\n{content}` then its tool calls as XML, one
  `<tool_call>` block each; reasoning is kept only for turns after the last user message (the current
  tool loop), older turns keep an empty think block;
- tool results: consecutive `tool` messages share one `<|im_start|>tool_response\n` turn, each wrapped in
  `<tool_response>...</tool_response>` (the release's convention, not Qwen's "user" turn);
- the generation prompt is `<|im_start|>assistant\n<think>\n`: thinking is always on.

Parsing. The model's reply starts inside the think block. `ChatStreamParser` turns the reply text,
fed in pieces of any size, into events: ("reasoning", text), ("content", text), ("tool_call", call).
Everything before `</think>` is reasoning; `<tool_call>` blocks after it become OpenAI tool calls whose
`arguments` JSON has values typed by the tool's JSON schema. A block that does not parse, or names a
function not in `tools`, is passed through as plain content. `parse_chat_output` is the same parser fed
the whole text at once, so streamed and non-streamed answers agree by construction.
"""

from __future__ import annotations

import ast
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
FUNCTION_START = "<function="

# Written with explicit `{{- ... }}` so the output does not depend on the template's own whitespace.
DEFAULT_CHAT_TEMPLATE = r"""
{%- set ns = namespace(system='', last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.system = messages[0].content -%}{%- endif -%}
{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if ns.system -%}{{- ns.system + '\n\n' -}}{%- endif -%}
  {{- '# Tools\n\nYou may call the functions described below (JSON Schema) to help with the request.\n<tools>' -}}
  {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
  {{- '\n</tools>\n\nTo call a function, reply with one block per call in exactly this form:\n' -}}
  {{- '<tool_call>\n<function=NAME>\n<parameter=ARGUMENT>\nVALUE\n</parameter>\n</function>\n</tool_call>\n' -}}
  {{- 'Write string values as they are and other values as JSON. Results come back in a tool_response turn.' -}}
  {{- '<|im_end|>\n' -}}
{%- elif ns.system -%}
  {{- '<|im_start|>system\n' + ns.system + '<|im_end|>\n' -}}
{%- endif -%}
{%- for m in messages -%}
  {%- if loop.first and m.role == 'system' -%}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>tool_response\n' -}}{%- endif -%}
    {{- '<tool_response>' + (m.content or '') + '</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- elif m.role == 'assistant' -%}
    {%- set reasoning = m.reasoning_content if (m.reasoning_content and loop.index0 > ns.last_user) else '' -%}
    {{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n' + (m.content or '') -}}
    {%- for call in m.tool_calls or [] -%}
      {%- if m.content or not loop.first -%}{{- '\n' -}}{%- endif -%}
      {{- '<tool_call>\n<function=' + call.function.name + '>\n' -}}
      {%- for key, value in (call.function.arguments or {}).items() -%}
        {{- '<parameter=' + key + '>\n' -}}
        {%- if value is string -%}{{- value -}}{%- else -%}{{- value | tojson -}}{%- endif -%}
        {{- '\n</parameter>\n' -}}
      {%- endfor -%}
      {{- '</function>\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\n' + (m.content or '') + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- endif -%}
"""


class ChatFormatError(ValueError):
    """A conversation the template cannot render (bad message, bad tool-call arguments, template error)."""


# ---- rendering ---------------------------------------------------------------------------------

def _text_of(content: Any, where: str) -> str:
    """OpenAI content (string, None, or a list of text parts) -> plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatFormatError(f"{where}: only text content parts are supported, got {kind!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatFormatError(f"{where}: content must be a string or a list of text parts")


def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> the plain dicts templates expect: text content, `developer` as `system`,
    reasoning split out of an assistant's `...</think>` content, tool-call arguments as dicts."""
    out = []
    for i, msg in enumerate(messages):
        where = f"messages.{i}"
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ChatFormatError(f"{where}.role: unknown role {role!r}")
        m = {"role": "system" if role == "developer" else role, "content": _text_of(msg.get("content"), where)}
        if role == "assistant":
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            if reasoning is None and THINK_END in m["content"]:
                reasoning, m["content"] = m["content"].split(THINK_END, 1)
                reasoning = reasoning.replace(THINK_START, "", 1)
            m["reasoning_content"] = (reasoning or "").strip()
            m["content"] = m["content"].strip()
            m["tool_calls"] = [_normalize_call(c, f"{where}.tool_calls.{j}") for j, c in
                               enumerate(msg.get("tool_calls") or [])]
        for key in ("name", "tool_call_id"):
            if msg.get(key) is not None:
                m[key] = msg[key]
        out.append(m)
    return out


def _normalize_call(call: dict, where: str) -> dict:
    fn = call.get("function") or {}
    name, args = fn.get("name"), fn.get("arguments")
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where}.function.name: missing")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ChatFormatError(f"{where}.function.arguments: not valid JSON") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ChatFormatError(f"{where}.function.arguments: must be a JSON object")
    return {"id": call.get("id"), "type": "function", "function": {"name": name, "arguments": args}}


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    # Jinja's built-in tojson HTML-escapes <, > and &, which would change the prompt.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _raise(message):
    raise ChatFormatError(f"chat template: {message}")


class ChatTemplate:
    """A compiled chat template plus the special-token strings templates may reference."""

    def __init__(self, source: str | None = None, bos_token: str = "<|bos|>", eos_token: str = "<|im_end|>"):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source or DEFAULT_CHAT_TEMPLATE
        self.is_default = source is None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as e:
            raise ChatFormatError(f"chat template does not compile: {e}") from None
        self.special = {"bos_token": bos_token, "eos_token": eos_token}

    @classmethod
    def from_checkpoint(cls, path: str) -> "ChatTemplate":
        """The checkpoint's template if it ships one, else the built-in Step 3.5 template."""
        source, special = None, {}
        config_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                cfg = json.load(f)
            source = cfg.get("chat_template")
            if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in source}
                source = named.get("default") or next(iter(named.values()), None)
            for key in ("bos_token", "eos_token"):
                tok = cfg.get(key)
                tok = tok.get("content") if isinstance(tok, dict) else tok
                if isinstance(tok, str):
                    special[key] = tok
        jinja_path = os.path.join(path, "chat_template.jinja")
        if not source and os.path.isfile(jinja_path):
            with open(jinja_path) as f:
                source = f.read()
        return cls(source or None, **special)

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **extra) -> str:
        from jinja2 import TemplateError

        msgs = normalize_messages(messages)
        try:
            return self._template.render(messages=msgs, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                         **self.special, **extra)
        except TemplateError as e:
            raise ChatFormatError(f"chat template failed: {e}") from None


def resolve_chat_template(choice: str, checkpoint: str) -> "ChatTemplate":
    """A `--chat-template` flag: "auto" (the checkpoint's template, else the built-in one), "builtin", or a
    Jinja file. Bad choices raise UserError (one line)."""
    from stepflash.errors import UserError

    if choice not in ("auto", "builtin") and not os.path.isfile(choice):
        raise UserError(f"--chat-template {choice!r} is not 'auto', 'builtin' or an existing file")
    try:
        if choice == "auto":
            return ChatTemplate.from_checkpoint(checkpoint)
        if choice == "builtin":
            return ChatTemplate()
        with open(choice, encoding="utf-8") as f:
            return ChatTemplate(f.read())
    except (ChatFormatError, ValueError) as e:  # includes a tokenizer_config.json that is not JSON
        raise UserError(f"chat template: {e}") from None


def render_chat(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
    """Render with the built-in Step 3.5 template."""
    return ChatTemplate().render(messages, tools, add_generation_prompt)


def opens_reasoning(prompt: str) -> bool:
    """True when the prompt leaves the model inside a think block (its reply starts with reasoning)."""
    return prompt.rstrip().endswith(THINK_START)


# ---- tool-call XML ------------------------------------------------------------------------------

_FUNCTION_RE = re.compile(r"\s*<function=([^<>\n]+)>(.*)</function>\s*", re.S)
_PARAM_RE = re.compile(r"\s*<parameter=([^<>\n]+)>(.*?)</parameter>", re.S)


def tool_schemas(tools: list[dict] | None) -> dict[str, dict]:
    """OpenAI `tools` -> {function name: its parameters JSON schema}."""
    schemas = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            schemas[fn["name"]] = fn.get("parameters") or {}
    return schemas


def _schema_types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    types = [kind] if isinstance(kind, str) else [t for t in kind or [] if isinstance(t, str)]
    for alt in schema.get("anyOf", []) + schema.get("oneOf", []):
        types += _schema_types(alt)
    return types


def _literal(text: str, kind: type | tuple[type, ...]):
    """JSON first, then a Python literal (templates that write values with str() give `True`, `{'a': 1}`)."""
    for load in (json.loads, ast.literal_eval):
        try:
            value = load(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, kind) and not isinstance(value, bool):
            return value
    raise ValueError


def coerce_value(text: str, schema: Any) -> Any:
    """A parameter's text -> a value of the type its JSON schema asks for; the text itself when it does
    not fit (a wrong value is the tool's to reject, not ours to drop). Unknown schema: JSON if it parses."""
    types = _schema_types(schema)
    s = text.strip()
    if not types:
        try:
            return json.loads(s)
        except ValueError:
            return text
    for kind in types:
        try:
            if kind == "integer" and re.fullmatch(r"[-+]?\d+", s):
                return int(s)
            if kind == "number":
                return _literal(s, (int, float))
            if kind == "boolean" and s.lower() in ("true", "false"):
                return s.lower() == "true"
            if kind == "null" and s in ("null", "None"):
                return None
            if kind in ("object", "array"):
                return _literal(s, dict if kind == "object" else list)
        except ValueError:
            continue
    return text


def parse_tool_call(block: str, schemas: dict[str, dict]) -> dict | None:
    """The text between `<tool_call>` and `</tool_call>` -> an OpenAI tool call, or None if malformed."""
    m = _FUNCTION_RE.fullmatch(block)
    if not m:
        return None
    name, body = m.group(1).strip(), m.group(2)
    if name not in schemas:
        return None
    properties = schemas[name].get("properties") or {}
    args, pos = {}, 0
    while (p := _PARAM_RE.match(body, pos)) is not None:
        raw = p.group(2)
        raw = raw[1:] if raw.startswith("\n") else raw
        raw = raw[:-1] if raw.endswith("\n") else raw
        key = p.group(1).strip()
        args[key] = coerce_value(raw, properties.get(key))
        pos = p.end()
    if body[pos:].strip():  # text that is not a parameter: not this format
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


# ---- reply parsing --------------------------------------------------------------------------------

def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may still become `tag`)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ChatStreamParser:
    """Incremental reply parser. `feed(text)` and `finish()` return lists of events:
    ("reasoning", str), ("content", str), ("tool_call", dict). Text that might be the start of a tag, and
    whitespace that might sit before one, is held back until the next piece decides it."""

    def __init__(self, tools: list[dict] | None = None, reasoning: bool = True):
        self.schemas = tool_schemas(tools) if tools else None  # None: no tool-call parsing
        self.state = "reasoning" if reasoning else "start"
        self.buf = ""
        self.lead = True  # at the start of a section: leading whitespace is dropped
        self.gap = ""  # whitespace seen before a tool call, restored if content resumes after it
        self.content_sent = False
        self.num_calls = 0

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        events: list[tuple[str, Any]] = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        while self._step(events, final=True):
            pass
        return events

    def _emit(self, events, kind: str, text: str) -> None:
        if self.lead:
            text = text.lstrip()
        if not text:
            return
        if kind == "content":
            if self.content_sent and self.gap:
                text = self.gap + text
            self.gap, self.content_sent = "", True
        self.lead = False
        if events and events[-1][0] == kind:
            events[-1] = (kind, events[-1][1] + text)
        else:
            events.append((kind, text))

    def _step(self, events, final: bool) -> bool:
        """Consume what can be decided now; True if the state changed and another pass may decide more."""
        if self.state == "start":  # no think block in the prompt: the reply may still open one
            head = self.buf.lstrip()
            if head.startswith(THINK_START):
                self.state, self.buf = "reasoning", head[len(THINK_START):]
                return True
            if final or not THINK_START.startswith(head) or len(head) >= len(THINK_START):
                self.state = "content"
                return True
            return False
        if self.state == "call":
            rest = self.buf[len(CALL_START):].lstrip()
            if rest and not (rest.startswith(FUNCTION_START) or FUNCTION_START.startswith(rest)):
                # Not followed by <function=...>: the tag is text; release it now instead of holding the rest.
                self.state, self.buf = "content", self.buf[len(CALL_START):]
                self._emit(events, "content", CALL_START)
                return True
            end = self.buf.find(CALL_END)
            if end < 0 and not final:
                return False
            block = self.buf[len(CALL_START):end if end >= 0 else None]
            call = parse_tool_call(block, self.schemas)
            raw = self.buf.rstrip() if end < 0 else self.buf[:end + len(CALL_END)]
            self.buf = "" if end < 0 else self.buf[end + len(CALL_END):]
            self.state = "content"
            if call is None:
                self._emit(events, "content", raw)
            else:
                self.num_calls += 1
                self.lead = True
                events.append(("tool_call", call))
            return True
        kind = self.state  # "reasoning" or "content"
        tag = THINK_END if kind == "reasoning" else (CALL_START if self.schemas is not None else None)
        at = self.buf.find(tag) if tag else -1
        if at >= 0:
            before = self.buf[:at]
            stripped = before.rstrip()
            self._emit(events, kind, stripped)
            if kind == "reasoning":
                self.state, self.buf, self.lead = "content", self.buf[at + len(THINK_END):], True
            else:
                self.gap = before[len(stripped):] if self.content_sent else ""
                self.state, self.buf = "call", self.buf[at:]
            return True
        if final:
            self._emit(events, kind, self.buf.rstrip())
            self.buf = ""
            return False
        cut = len(self.buf) - (_partial_suffix(self.buf, tag) if tag else 0)
        while cut > 0 and self.buf[cut - 1].isspace():
            cut -= 1
        self._emit(events, kind, self.buf[:cut])
        self.buf = self.buf[cut:]
        return False


@dataclass
class ParsedReply:
    reasoning_content: str | None
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)


def collect(events: list[tuple[str, Any]], reply: ParsedReply | None = None) -> ParsedReply:
    """Fold parser events into a reply (content None when there is none)."""
    reply = reply or ParsedReply(None, None)
    for kind, value in events:
        if kind == "tool_call":
            reply.tool_calls.append(value)
        elif kind == "reasoning":
            reply.reasoning_content = (reply.reasoning_content or "") + value
        else:
            reply.content = (reply.content or "") + value
    return reply


def parse_chat_output(text: str, tools: list[dict] | None = None, reasoning: bool = True) -> ParsedReply:
    """A whole reply -> reasoning_content, content and tool_calls."""
    parser = ChatStreamParser(tools, reasoning)
    return collect(parser.feed(text) + parser.finish())
