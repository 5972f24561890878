"""Rendering OpenAI-style conversations into Step 3.5 Flash prompts.

The built-in template is stepflash's own Jinja source, written from the release's format and checked
byte for byte against the official template (the release's tokenizer_config.json; public copy: llama.cpp
`models/templates/stepfun-ai-Step-3.5-Flash.jinja`, sha256 b18b99df...) over the conversations in
`tests/data/chat_template_fixtures.json`. It is the one template: `ChatTemplate()` renders it, and
`stepflash.tokenizer` writes it into every saved tokenizer_config.json, so transformers'
`apply_chat_template` and vLLM render what `stepflash serve` renders. The pieces below are joined into
one Jinja string; each comment names the quirk of the official output that the piece reproduces.

`ChatTemplate` renders any Jinja chat template (a checkpoint's own one too) in the same sandbox
transformers uses, after `normalize_messages` has done what OpenAI servers do before templating:
tool-call arguments sent as JSON strings become objects, `developer` becomes `system`, `reasoning`
(vLLM's newer name) fills `reasoning_content`, and text parts become plain text. Nothing is stripped:
whitespace in the history is part of what the model saw.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"

# Content may be a string, None, one {"type": "text"} part, or a list of parts; text parts carry
# "text" (OpenAI) or "value". Parts are joined with nothing between them. An image part becomes the
# release's `<im_patch>` placeholder (stepflash serves text only: `normalize_messages` rejects images).
_TEXT_MACRO = r"""
{%- macro text(c) -%}
  {%- if c is string -%}{{- c -}}
  {%- elif c is mapping -%}{{- c['value'] if 'value' in c else c['text'] -}}
  {%- elif c is iterable -%}
    {%- for part in c -%}
      {%- if part.type == 'text' -%}{{- part['value'] if 'value' in part else part['text'] -}}
      {%- elif part.type == 'image' -%}{{- '<im_patch>' -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
"""

# The prompt starts with the BOS token. With tools, ONE system turn holds the first system message
# (followed by a blank line, even when it is empty), then the tools, one JSON object a line, written
# with json.dumps defaults (", " and ": ", keys in the caller's order, non-ASCII kept).
# `developer` is read as `system` here too (OpenAI's newer name; the official template would drop it).
_SYSTEM_TURN = r"""
{{- bos_token -}}
{%- set has_system = messages[0].role in ['system', 'developer'] -%}
{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if has_system -%}{{- text(messages[0].content) + '\n\n' -}}{%- endif -%}
  {{- TOOLS_INTRO -}}
  {%- for tool in tools -%}{{- '\n' + (tool | tojson(ensure_ascii=False)) -}}{%- endfor -%}
  {{- TOOLS_OUTRO + '<|im_end|>\n' -}}
{%- elif has_system -%}
  {{- '<|im_start|>system\n' + text(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
"""

# The release's wording of the tools preamble (the text the model was trained on; it is data, not
# choice): an intro before <tools>, and after </tools> the exact call format plus an <IMPORTANT>
# reminder. Jinja string literals, so `\n` is a newline.
_TOOLS_INTRO = "'# Tools\\n\\nYou have access to the following functions in JSONSchema format:\\n\\n<tools>'"
_TOOLS_OUTRO = (
    "'\\n</tools>\\n\\nIf you choose to call a function ONLY reply in the following format with NO suffix:\\n\\n"
    "<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>\\nvalue_1\\n</parameter>\\n"
    "<parameter=example_parameter_2>\\nThis is the value for the second parameter\\nthat can span\\nmultiple lines\\n"
    "</parameter>\\n</function>\\n</tool_call>\\n\\n<IMPORTANT>\\nReminder:\\n"
    "- Function calls MUST follow the specified format: an inner <function=...>\\n...\\n</function> block must be "
    "nested within <tool_call>\\n...\\n</tool_call> XML tags\\n- Required parameters MUST be specified\\n</IMPORTANT>'")
# The compact variant (`tool_instructions=False`) keeps only the bare <tools> block.
_COMPACT_INTRO, _COMPACT_OUTRO = "'<tools>'", "'\\n</tools>'"

# Reasoning is shown only for assistant turns after the last real user query: the last user message,
# scanning back, whose text is not wholly wrapped in <tool_response>...</tool_response> (old-style tool
# results sent as user messages do not end the agent's current turn). With no such user message no
# turn shows reasoning (the index starts at the last message).
_LAST_QUERY = r"""
{%- set ns = namespace(last_query=messages | length - 1, found=false) -%}
{%- for m in messages | reverse -%}
  {%- set c = text(m.content) -%}
  {%- if not ns.found and m.role == 'user' and not (c.startswith('<tool_response>') and c.endswith('</tool_response>')) -%}
    {%- set ns.found = true -%}
    {%- set ns.last_query = messages | length - 1 - loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
"""

# User turns and every system turn after the first are plain turns; a later system message named
# "observation" becomes an `observation` turn. Roles other than these five render nothing.
_PLAIN_TURN = r"""
  {%- if role == 'user' or (role == 'system' and not loop.first) -%}
    {%- set shown = 'observation' if (role == 'system' and m.name == 'observation') else role -%}
    {{- '<|im_start|>' + shown + '\n' + content + '<|im_end|>\n' -}}
"""

# Assistant turns. Reasoning comes from `reasoning_content` when it is a string (the content is then
# used whole, even if it holds </think>); otherwise from content of the form `<think>R</think>C`:
# R is what precedes the first </think>, after the last <think>, minus newlines at its ends, and C is
# what follows the LAST </think>, minus leading newlines. A turn after the last query shows
# `<think>\n{R}\n</think>\n{C}`, with an empty think block when R is empty (the generation prompt
# opened one); a turn before it shows just its content (its reasoning is dropped). Tool calls follow the content directly, with no newline before, between or after the
# <tool_call> blocks. Argument values: objects and arrays as JSON, anything else as Python's str()
# writes it (True, None, 1.5), strings unquoted; each between a newline after <parameter=...> and one
# before </parameter>.
_ASSISTANT_TURN = r"""
  {%- elif role == 'assistant' -%}
    {%- if m.reasoning_content is string -%}
      {%- set reasoning = text(m.reasoning_content) -%}
    {%- elif '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
    {%- else -%}
      {%- set reasoning = '' -%}
    {%- endif -%}
    {%- if loop.index0 > ns.last_query -%}
      {{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n' + content -}}
    {%- else -%}
      {{- '<|im_start|>assistant\n' + content -}}
    {%- endif -%}
    {%- for call in m.tool_calls or [] -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {{- '<tool_call>\n<function=' + fn.name + '>\n' -}}
      {%- if fn.arguments is defined -%}
        {%- for key, value in fn.arguments | items -%}
          {{- '<parameter=' + key + '>\n' -}}
          {%- if value is mapping or (value is sequence and value is not string) -%}
            {{- value | tojson(ensure_ascii=False) -}}
          {%- else -%}
            {{- value | string -}}
          {%- endif -%}
          {{- '\n</parameter>\n' -}}
        {%- endfor -%}
      {%- endif -%}
      {{- '</function>\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
"""

# Consecutive tool results share one `tool_response` turn (not Qwen's "user"), each wrapped in
# <tool_response>...</tool_response> with nothing between them. Thinking is always on: the
# generation prompt opens the think block.
_TOOL_TURN_AND_PROMPT = r"""
  {%- elif role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>tool_response\n' -}}{%- endif -%}
    {{- '<tool_response>' + content + '</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- endif -%}
"""

_LOOP_HEAD = r"""
{%- for m in messages -%}
  {%- set role = 'system' if m.role == 'developer' else m.role -%}
  {%- set content = text(m.content) -%}
"""


def chat_template_source(tool_instructions: bool = True) -> str:
    """The built-in Step 3.5 template as Jinja source. `tool_instructions=False` gives the compact
    variant (the bare <tools> block, no preamble) that the CPU recipe's 512-token demo model uses."""
    intro, outro = (_TOOLS_INTRO, _TOOLS_OUTRO) if tool_instructions else (_COMPACT_INTRO, _COMPACT_OUTRO)
    system = _SYSTEM_TURN.replace("TOOLS_INTRO", intro).replace("TOOLS_OUTRO", outro)
    parts = ("{#- stepflash's Step 3.5 Flash chat template; comments in stepflash/chat/template.py -#}",
             _TEXT_MACRO, system, _LAST_QUERY, _LOOP_HEAD, _PLAIN_TURN, _ASSISTANT_TURN, _TOOL_TURN_AND_PROMPT)
    return "".join(part.strip() for part in parts) + "\n"


DEFAULT_CHAT_TEMPLATE = chat_template_source()


class ChatFormatError(ValueError):
    """A conversation the template cannot render (bad message, bad tool-call arguments, template error)."""


# ---- normalisation --------------------------------------------------------------------------------

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
    """OpenAI messages -> the plain dicts chat templates expect (see the module docstring)."""
    if not messages:
        raise ChatFormatError("messages: at least one message is needed")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages.{i}"
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ChatFormatError(f"{where}.role: unknown role {role!r}")
        m = {"role": "system" if role == "developer" else role, "content": _text_of(msg.get("content"), where)}
        if role == "assistant":
            reasoning = msg.get("reasoning_content")
            reasoning = msg.get("reasoning") if reasoning is None else reasoning
            if reasoning is not None:  # absent: the template looks for <think>...</think> in the content
                m["reasoning_content"] = _text_of(reasoning, f"{where}.reasoning_content")
            m["tool_calls"] = [_normalize_call(c, f"{where}.tool_calls.{j}")
                               for j, c in enumerate(msg.get("tool_calls") or [])]
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


# ---- the renderer ---------------------------------------------------------------------------------

def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # As transformers does: Jinja's own tojson HTML-escapes <, > and & and sorts keys.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    raise ChatFormatError(f"chat template: {message}")


def _special_tokens(config: dict) -> dict:
    """bos/eos strings of a tokenizer_config.json; a token it sets to null renders as nothing (as in
    transformers)."""
    out = {}
    for key in ("bos_token", "eos_token"):
        if key in config:
            tok = config[key]
            tok = tok.get("content") if isinstance(tok, dict) else tok
            out[key] = tok if isinstance(tok, str) else ""
    return out


class ChatTemplate:
    """A compiled chat template plus the special-token strings templates may reference."""

    def __init__(self, source: str | None = None, bos_token: str = "<|bos|>", eos_token: str = "<|im_end|>"):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source or DEFAULT_CHAT_TEMPLATE
        self.is_default = source is None
        # The environment transformers' apply_chat_template uses, so a template renders the same in both.
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
    def from_checkpoint(cls, path: str, builtin: bool = False) -> "ChatTemplate":
        """The checkpoint's template if it ships one (and `builtin` is False), else the built-in one;
        either way with the checkpoint's bos/eos token strings."""
        source, config = None, {}
        config_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            source = config.get("chat_template")
            if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in source}
                source = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(path, "chat_template.jinja")
        if not source and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                source = f.read()
        return cls(None if builtin else source or None, **_special_tokens(config))

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **extra) -> str:
        from jinja2 import TemplateError

        msgs = normalize_messages(messages)
        try:
            return self._template.render(messages=msgs, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                         **self.special, **extra)
        except TemplateError as e:
            raise ChatFormatError(f"chat template failed: {e}") from None


def resolve_chat_template(choice: str, checkpoint: str) -> ChatTemplate:
    """A `--chat-template` flag: "auto" (the checkpoint's template, else the built-in one), "builtin", or a
    Jinja file. Bad choices raise UserError (one line)."""
    from stepflash.errors import UserError

    if choice not in ("auto", "builtin") and not os.path.isfile(choice):
        raise UserError(f"--chat-template {choice!r} is not 'auto', 'builtin' or an existing file")
    try:
        if choice in ("auto", "builtin"):
            return ChatTemplate.from_checkpoint(checkpoint, builtin=choice == "builtin")
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
