"""Parsing a Step 3.5 reply into reasoning, content and tool calls, in pieces of any size.

`ChatStreamParser.feed(text)` / `finish()` return events:
  ("reasoning", str), ("content", str)                  text, never ending in a possible tag's start;
  ("tool_call_start", {"index", "id", "name"})           once the call is certain (see `toolcall.call_head`);
  ("tool_call_arguments", {"index", "arguments"})        pieces of the arguments' JSON, in order;
  ("tool_call", {"id", "type", "function"})              the finished call (arguments = all pieces joined).
`parse_chat_output` is the same parser fed the whole reply, so streamed and one-shot answers agree by
construction (the tests check every two-way split and one character at a time).

The rules (docs/chat_format.md has an example of each and the peer cases they pass):
- Reasoning. With `reasoning=True` (the prompt opened `<think>`, as Step 3.5's always does) the reply
  starts inside the think block; a repeated `<think>` before any reasoning text is dropped. Without it,
  the first `<think>` in the content opens the block and text before it stays content. The block ends at
  `</think>`, or at a tool call (the model sometimes calls without closing its thoughts). As vLLM does,
  exactly one newline before `</think>` and one after it are trimmed; nothing else is.
- Content is kept verbatim, except that whitespace-only text right before a tool call is dropped (the
  layout between `</think>` and a call, or between calls); whitespace after the last call is kept.
- Tool calls (only when the request has tools) are read as `toolcall` describes, repairs included; a
  call to a function not in `tools` stays text. Arguments are typed by the tool's schema (`schema`);
  a parameter whose schema is a plain string is streamed as it is written.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from stepflash.chat import toolcall as tc
from stepflash.chat.schema import coerce_value, is_plain_string, properties, tool_schemas
from stepflash.chat.template import THINK_END, THINK_START


@dataclass
class _Call:
    """A tool call being read: where in its XML the parser is, and the arguments sent so far."""

    index: int
    id: str
    name: str
    props: dict
    args: dict = field(default_factory=dict)
    pieces: list = field(default_factory=list)  # the arguments' JSON, as sent
    phase: str = "body"  # body (between parameters) | value | after_function (seen </function>)
    param: str = ""
    raw: str = ""  # the current value's text that is already decided
    value_started: bool = False  # the value's first character was seen (a leading newline dropped)
    streamed: bool = False  # the current value is a plain string, sent as it comes

    def known(self, name: str) -> bool:
        return not self.props or name in self.props


class ChatStreamParser:
    """Incremental reply parser (see the module docstring)."""

    def __init__(self, tools: list[dict] | None = None, reasoning: bool = True):
        self.schemas = tool_schemas(tools) if tools else None  # None: no tool-call parsing
        self.state = "reasoning" if reasoning else "content"  # | "call"
        self.think_seen = reasoning  # a think block was opened: `<think>` in content is plain text
        self.reasoning_seen = False  # non-blank reasoning went out: `<think>` in reasoning is text
        self.after_think = False  # just after </think>: one newline to drop
        self.buf = ""
        self.pending_ws = ""  # blank content held back: dropped if a tool call follows
        self.segment_text = False  # content since the last call has non-blank text
        self.call: _Call | None = None
        self.num_calls = 0
        self.events: list = []

    # ---- driving --------------------------------------------------------------------------------
    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        return self._run(final=False)

    def finish(self) -> list[tuple[str, Any]]:
        return self._run(final=True)

    def _run(self, final: bool) -> list[tuple[str, Any]]:
        self.events = []
        step = {"reasoning": self._reasoning, "content": self._content, "call": self._in_call}
        while step[self.state](final):
            pass
        if final and self.pending_ws:
            self._emit("content", self.pending_ws)
            self.pending_ws = ""
        return self.events

    def _emit(self, kind: str, value: Any) -> None:
        last = self.events[-1] if self.events else None
        if kind in ("reasoning", "content"):
            if not value:
                return
            if last and last[0] == kind:
                self.events[-1] = (kind, last[1] + value)
                return
        elif kind == "tool_call_arguments" and last and last[0] == kind and last[1]["index"] == value["index"]:
            self.events[-1] = (kind, {**value, "arguments": last[1]["arguments"] + value["arguments"]})
            return
        self.events.append((kind, value))

    # ---- reasoning ------------------------------------------------------------------------------
    def _reason(self, text: str) -> None:
        self._emit("reasoning", text)
        self.reasoning_seen = self.reasoning_seen or bool(text.strip())

    def _reasoning(self, final: bool) -> bool:
        buf = self.buf
        if not self.reasoning_seen and buf.lstrip().startswith(THINK_START):  # a repeated open tag
            at = buf.index(THINK_START)
            self.buf = buf[:at] + buf[at + len(THINK_START):]
            return True
        end = buf.find(THINK_END)
        at = buf.find(tc.CALL_START) if self.schemas is not None else -1
        if end >= 0 and (at < 0 or end < at):
            self._reason(_drop_last_newline(buf[:end]))
            self.buf, self.state, self.after_think = buf[end + len(THINK_END):], "content", True
            return True
        if at >= 0:
            status, _, _ = tc.call_head(buf[at:], self.schemas, wrapped=True)
            if status == tc.OK:  # a call ends the reasoning even without </think>
                self._reason(_drop_last_newline(buf[:at]))
                self.buf, self.state = buf[at:], "content"
                return True
            if status == tc.NEED_MORE and not final:
                cut = at - 1 if buf[:at].endswith("\n") else at
                self._reason(buf[:cut])
                self.buf = buf[cut:]
                return False
            stop = at + len(tc.CALL_START)  # not a call: the tag is reasoning text
            self._reason(buf[:stop])
            self.buf = buf[stop:]
            return True
        if final:
            self._reason(_drop_last_newline(buf))
            self.buf = ""
            return False
        tags = [THINK_END] + ([tc.CALL_START] if self.schemas is not None else [])
        tags += [] if self.reasoning_seen else [THINK_START]
        cut = len(buf) - tc.held_suffix(buf, tags)
        cut -= 1 if buf[:cut].endswith("\n") else 0  # it may be the newline before </think>
        self._reason(buf[:cut])
        self.buf = buf[cut:]
        return False

    # ---- content --------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        """Content text; blank text is held while nothing but blanks came since the last call."""
        if not text:
            return
        if not self.segment_text:
            if not text.strip():
                self.pending_ws += text
                return
            text, self.pending_ws, self.segment_text = self.pending_ws + text, "", True
        self._emit("content", text)

    def _content(self, final: bool) -> bool:
        if self.after_think:
            if not self.buf and not final:
                return False
            self.buf = self.buf[1:] if self.buf.startswith("\n") else self.buf
            self.after_think = False
        buf = self.buf
        tags = ([] if self.think_seen else [THINK_START]) + \
               ([tc.CALL_START, tc.BARE_START] if self.schemas is not None else [])
        found = [(i, t) for i, t in ((buf.find(t), t) for t in tags) if i >= 0]
        if not found:
            cut = len(buf) if final else len(buf) - tc.held_suffix(buf, tags)
            self._say(buf[:cut])
            self.buf = buf[cut:]
            return False
        at, tag = min(found)
        if tag == THINK_START:
            self._say(buf[:at])
            self.buf, self.state, self.think_seen = buf[at + len(THINK_START):], "reasoning", True
            return True
        status, name, end = tc.call_head(buf[at:], self.schemas, wrapped=tag == tc.CALL_START)
        if status == tc.OK:
            self._say(buf[:at])
            self._start_call(name, buf[at + end:])
            return True
        if status == tc.NEED_MORE and not final:
            self._say(buf[:at])
            self.buf = buf[at:]
            return False
        self._say(buf[:at + len(tag)])  # not a call: the tag is text
        self.buf = buf[at + len(tag):]
        return True

    # ---- tool calls -----------------------------------------------------------------------------
    def _start_call(self, name: str, rest: str) -> None:
        if not self.segment_text:
            self.pending_ws = ""  # the blank layout before a call is not content
        self.call = _Call(self.num_calls, f"call_{uuid.uuid4().hex[:24]}", name, properties(self.schemas[name]))
        self.num_calls += 1
        self.buf, self.state = rest, "call"
        self._emit("tool_call_start", {"index": self.call.index, "id": self.call.id, "name": name})

    def _args(self, piece: str) -> None:
        self.call.pieces.append(piece)
        self._emit("tool_call_arguments", {"index": self.call.index, "arguments": piece})

    def _end_call(self) -> None:
        c = self.call
        self._args("}" if c.pieces else "{}")
        self._emit("tool_call", {"id": c.id, "type": "function",
                                 "function": {"name": c.name, "arguments": "".join(c.pieces)}})
        self.call, self.state, self.segment_text, self.pending_ws = None, "content", False, ""

    def _in_call(self, final: bool) -> bool:
        phase = self.call.phase
        if phase == "value":
            return self._value(final)
        at = tc.skip_space(self.buf, 0)
        rest = self.buf[at:]
        if rest.startswith(tc.CALL_END):
            self.buf = rest[len(tc.CALL_END):]
            self._end_call()
            return True
        if phase == "after_function":  # only whitespace and a </tool_call> may still belong to the call
            if (not rest or tc.is_partial(rest, tc.CALL_END)) and not final:
                return False
            if final and rest and tc.is_partial(rest, tc.CALL_END):
                self.buf = ""
            self._end_call()  # the call ended at </function>; what follows is content
            return True
        if rest.startswith(tc.FUNCTION_END):
            self.buf, self.call.phase = rest[len(tc.FUNCTION_END):], "after_function"
            return True
        status, name, end = tc.param_tag(self.buf, at, self.call.known)
        if status == tc.OK:
            self.buf = self.buf[end:]
            self._open_param(name)
            return True
        if not rest or status == tc.NEED_MORE or any(tc.is_partial(rest, t) for t in tc.CLOSING):
            if not final:
                return False
            self.buf = ""  # the reply ended inside the call's closing tags
        self._end_call()  # anything else ends the call; it is content
        return True

    def _open_param(self, name: str) -> None:
        c = self.call
        c.phase, c.param, c.raw, c.value_started = "value", name, "", False
        c.streamed = is_plain_string(c.props.get(name))
        key = ("{" if not c.pieces else ", ") + json.dumps(name, ensure_ascii=False) + ": "
        if c.streamed:
            self._args(key + '"')
        else:
            c.pieces.append(key)  # sent with the value, once it is typed

    def _value(self, final: bool) -> bool:
        c = self.call
        if not c.value_started:
            if not self.buf and not final:
                return False
            self.buf = self.buf[1:] if self.buf.startswith("\n") else self.buf
            c.value_started = True
        end, hold = tc.value_end(self.buf, 0, c.known)
        if end < 0 and not final:
            decided = self.buf[:hold]
            decided = decided[:-1] if decided.endswith("\n") else decided  # maybe the newline before the tag
            self._grow_value(decided)
            self.buf = self.buf[len(decided):]
            return False
        end = len(self.buf) if end < 0 else end
        self._grow_value(_drop_last_newline(self.buf[:end]))
        self._close_param()
        rest = self.buf[end:]
        for tag, phase in ((tc.PARAM_END, "body"), (tc.FUNCTION_END, "after_function")):
            if rest.startswith(tag):
                self.buf, c.phase = rest[len(tag):], phase
                return True
        if rest.startswith(tc.CALL_END) or not rest:
            self.buf = rest[len(tc.CALL_END):]
            self._end_call()
            return True
        self.buf, c.phase = rest, "body"  # the next <parameter=...> tag: the value had no </parameter>
        return True

    def _grow_value(self, text: str) -> None:
        if not text:
            return
        self.call.raw += text
        if self.call.streamed:
            self._args(json.dumps(text, ensure_ascii=False)[1:-1])

    def _close_param(self) -> None:
        c = self.call
        if c.streamed:
            c.args[c.param] = c.raw
            self._args('"')
            return
        value = coerce_value(c.raw, c.props.get(c.param))
        c.args[c.param] = value
        key = c.pieces.pop()
        self._args(key + json.dumps(value, ensure_ascii=False))


def _drop_last_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


@dataclass
class ParsedReply:
    reasoning_content: str | None
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)


def collect(events: list[tuple[str, Any]], reply: ParsedReply | None = None) -> ParsedReply:
    """Fold parser events into a reply (reasoning/content None when there is none)."""
    reply = reply or ParsedReply(None, None)
    for kind, value in events:
        if kind == "tool_call":
            reply.tool_calls.append(value)
        elif kind == "reasoning":
            reply.reasoning_content = (reply.reasoning_content or "") + value
        elif kind == "content":
            reply.content = (reply.content or "") + value
    return reply


def parse_chat_output(text: str, tools: list[dict] | None = None, reasoning: bool = True) -> ParsedReply:
    """A whole reply -> reasoning_content, content and tool_calls."""
    parser = ChatStreamParser(tools, reasoning)
    return collect(parser.feed(text) + parser.finish())
