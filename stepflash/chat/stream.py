"""Parser events as OpenAI streaming deltas, the way vLLM streams them.

A tool call first appears as `{"index", "id", "type": "function", "function": {"name", "arguments": ""}}`,
then as `{"index", "function": {"arguments": piece}}` deltas whose pieces join into the call's
arguments JSON. Reasoning goes out as `reasoning_content`, text as `content`; the parser never ends
either in the first half of a tag, and `server.textstream.TextStream` never splits a UTF-8 character.
"""

from __future__ import annotations

from typing import Any


def openai_deltas(events: list[tuple[str, Any]]) -> list[dict]:
    """`ChatStreamParser` events -> the `delta` objects of chat.completion.chunk messages."""
    deltas = []
    for kind, value in events:
        if kind == "reasoning":
            deltas.append({"reasoning_content": value})
        elif kind == "content":
            deltas.append({"content": value})
        elif kind == "tool_call_start":
            deltas.append({"tool_calls": [{"index": value["index"], "id": value["id"], "type": "function",
                                           "function": {"name": value["name"], "arguments": ""}}]})
        elif kind == "tool_call_arguments":
            deltas.append({"tool_calls": [{"index": value["index"], "function": {"arguments": value["arguments"]}}]})
    return deltas


def finish_reason(engine_reason: str | None, num_calls: int) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when a reply that stopped by itself made calls."""
    return "tool_calls" if num_calls and engine_reason == "stop" else engine_reason
