"""The Step 3.5 chat format: rendering conversations to a prompt (`template`), reading replies back
(`parser`, over the tool-call XML in `toolcall` and the schema typing in `schema`), and streaming them
as OpenAI deltas (`stream`). docs/chat_format.md describes the format and the peer test suites passed."""

from stepflash.chat.parser import ChatStreamParser, ParsedReply, collect, parse_chat_output
from stepflash.chat.schema import coerce_value, tool_schemas
from stepflash.chat.stream import finish_reason, openai_deltas
from stepflash.chat.template import (DEFAULT_CHAT_TEMPLATE, THINK_END, THINK_START,
                                     ChatFormatError, ChatTemplate, chat_template_source,
                                     normalize_messages, opens_reasoning, render_chat, resolve_chat_template)
from stepflash.chat.toolcall import CALL_END, CALL_START

__all__ = ["CALL_END", "CALL_START", "DEFAULT_CHAT_TEMPLATE", "THINK_END", "THINK_START",
           "ChatFormatError", "ChatStreamParser", "ChatTemplate", "ParsedReply", "chat_template_source", "coerce_value",
           "collect", "finish_reason", "normalize_messages", "opens_reasoning", "openai_deltas", "parse_chat_output",
           "render_chat", "resolve_chat_template", "tool_schemas"]
