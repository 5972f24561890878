"""The chat format: rendering against hand-written prompts, parsing against hand-written replies, and the
streaming parser against the whole-text parse at every split point."""

import json
import random

import pytest

from stepflash.chat import (ChatFormatError, ChatStreamParser, ChatTemplate, coerce_value, collect, opens_reasoning,
                            parse_chat_output, render_chat)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "ratio": {"type": "number"}, "opts": {"type": "object"}, "hours": {"type": "array"},
        "zip": {"type": "string"}, "note": {"type": ["null", "string"]}}}}}
TOOLS = [WEATHER, {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}]

CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")


# ---- rendering -----------------------------------------------------------------------------------

def test_plain_conversation_renders_chatml_with_open_think():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": [{"type": "text", "text": "Again"}]}]
    assert render_chat(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\nHello!<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
    assert render_chat(msgs[:2], add_generation_prompt=False).endswith("Hi<|im_end|>\n")


def test_tools_tool_calls_and_grouped_tool_responses():
    msgs = [{"role": "developer", "content": "Sys."}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Checking.", "reasoning_content": "need data",
             "tool_calls": [{"id": "a", "type": "function", "function": {
                 "name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2, "opts": {"u": "C"}})}},
                 {"id": "b", "type": "function", "function": {"name": "noop", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "a", "content": "sunny"},
            {"role": "tool", "tool_call_id": "b", "content": "ok"}]
    out = render_chat(msgs, [WEATHER])
    assert out.startswith("<|im_start|>system\nSys.\n\n# Tools\n")
    assert "\n<tools>\n" + json.dumps(WEATHER) + "\n</tools>\n" in out
    assert out.count("<|im_start|>system") == 1
    expected_tail = (
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nneed data\n</think>\nChecking.\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n<parameter=opts>\n{\"u\": \"C\"}\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=noop>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>tool_response\n<tool_response>sunny</tool_response><tool_response>ok</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
    assert out.endswith(expected_tail)


def test_reasoning_kept_only_after_last_user_turn():
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>old thought</think>\n\na1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning_content": "new"}]
    out = render_chat(msgs, add_generation_prompt=False)
    assert "old thought" not in out
    assert "<|im_start|>assistant\n<think>\n\n</think>\na1<|im_end|>" in out
    assert "<|im_start|>assistant\n<think>\nnew\n</think>\na2<|im_end|>" in out


@pytest.mark.parametrize("msg, field", [
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "messages.0.tool_calls.0.function.arguments"),
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     "messages.0.tool_calls.0.function.arguments"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages.0"),
    ({"role": "robot", "content": "hi"}, "messages.0.role"),
])
def test_bad_messages_raise_naming_the_field(msg, field):
    with pytest.raises(ChatFormatError, match=field.replace(".", r"\.")):
        render_chat([msg])


def test_checkpoint_template_is_used_and_sandboxed(tmp_path):
    template = "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}{% if add_generation_prompt %}{{ bos_token }}>{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    tpl = ChatTemplate.from_checkpoint(str(tmp_path))
    assert not tpl.is_default
    assert tpl.render([{"role": "user", "content": "hi"}]) == "[user:hi]<s>>"
    assert ChatTemplate.from_checkpoint(str(tmp_path / "missing")).is_default
    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatFormatError):
        evil.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatFormatError, match="does not compile"):
        ChatTemplate("{% for %}")
    assert opens_reasoning(render_chat([{"role": "user", "content": "x"}]))
    assert not opens_reasoning(tpl.render([{"role": "user", "content": "x"}]))


# ---- parsing ------------------------------------------------------------------------------------

def test_reasoning_then_content():
    r = parse_chat_output("Let me think.\n</think>\n\nThe answer is 4.\n")
    assert (r.reasoning_content, r.content, r.tool_calls) == ("Let me think.", "The answer is 4.", [])
    # Cut off before </think>: all of it is reasoning.
    r = parse_chat_output("still thinking")
    assert (r.reasoning_content, r.content) == ("still thinking", None)
    # A prompt without an open think block: plain content, unless the reply opens one itself.
    assert parse_chat_output("Hi there", reasoning=False).content == "Hi there"
    r = parse_chat_output("<think>hm</think>Yes", reasoning=False)
    assert (r.reasoning_content, r.content) == ("hm", "Yes")


def test_tool_calls_with_schema_typed_arguments():
    text = ("plan</think>\n\nSure.\n" + CALL.replace("<parameter=days>", "<parameter=metric>\nTrue\n</parameter>\n"
            "<parameter=ratio>\n0.5\n</parameter>\n<parameter=opts>\n{'a': [1, 2]}\n</parameter>\n"
            "<parameter=hours>\n[1, 2]\n</parameter>\n<parameter=zip>\n02139\n</parameter>\n<parameter=note>\nnull\n"
            "</parameter>\n<parameter=extra>\n7\n</parameter>\n<parameter=days>") + "\n<tool_call>\n<function=noop>\n"
            "</function>\n</tool_call>")
    r = parse_chat_output(text, TOOLS)
    assert (r.reasoning_content, r.content) == ("plan", "Sure.")
    assert [c["function"]["name"] for c in r.tool_calls] == ["get_weather", "noop"]
    assert json.loads(r.tool_calls[0]["function"]["arguments"]) == {
        "city": "San Francisco", "metric": True, "ratio": 0.5, "opts": {"a": [1, 2]}, "hours": [1, 2],
        "zip": "02139", "note": None, "extra": 7, "days": 3}
    assert json.loads(r.tool_calls[1]["function"]["arguments"]) == {}
    assert r.tool_calls[0]["type"] == "function" and r.tool_calls[0]["id"] != r.tool_calls[1]["id"]
    assert parse_chat_output("x</think>" + CALL, TOOLS).content is None


@pytest.mark.parametrize("text, schema, expected", [
    ("12", {"type": "integer"}, 12), ("1.5", {"type": "integer"}, "1.5"), ("-3", {"type": "number"}, -3),
    ("2e3", {"type": "number"}, 2000.0), ("true", {"type": "number"}, "true"), ("FALSE", {"type": "boolean"}, False),
    ("yes", {"type": "boolean"}, "yes"), ("[1]", {"type": "object"}, "[1]"), ("12", {"type": "string"}, "12"),
    (" a b ", {"type": "string"}, " a b "), ("3", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, 3),
    ("hello", None, "hello"), ('{"k": 1}', None, {"k": 1}),
])
def test_coerce_value(text, schema, expected):
    assert coerce_value(text, schema) == expected


@pytest.mark.parametrize("block", [
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n",  # never closed, no </function>
    "<tool_call>\n<function=>\n</function>\n</tool_call>",  # no name
    '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',  # JSON, not this format
    "<tool_call>\n<function=get_weather>\nstray text\n</function>\n</tool_call>",  # text where parameters go
    "<tool_call>\n<function=launch_missiles>\n</function>\n</tool_call>",  # not one of the tools
    "use <tool_call> tags like this",
])
def test_malformed_tool_calls_stay_content(block):
    r = parse_chat_output("t</think>" + block, TOOLS)
    assert r.tool_calls == []
    assert r.content == block.strip()


def test_tool_xml_is_content_without_tools_and_tolerates_missing_close():
    assert parse_chat_output("t</think>" + CALL).content == CALL
    r = parse_chat_output("t</think>" + CALL[:-len("</tool_call>")], TOOLS)
    assert [c["function"]["name"] for c in r.tool_calls] == ["get_weather"] and r.content is None


def _strip_ids(reply):
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in reply.tool_calls]
    return reply.reasoning_content, reply.content, calls


STREAM_CASES = [
    "Let me think.\n</think>\n\nThe answer is 4.",
    "plan </think>\nSure.\n" + CALL + "\n" + CALL + "\nDone.",
    "x</think>" + CALL[:-3],
    "x</think>a <tool_call>{bad}</tool_call> b </thin",
    "<think>hm</think>Yes <tool_call",
    "\n\n  </think>\n\n  ",
]


@pytest.mark.parametrize("text", STREAM_CASES)
def test_stream_parser_agrees_with_whole_parse_at_every_split(text):
    for reasoning in (True, False):
        whole = _strip_ids(parse_chat_output(text, TOOLS, reasoning))
        for cut in range(len(text) + 1):
            p = ChatStreamParser(TOOLS, reasoning)
            events = p.feed(text[:cut]) + p.feed(text[cut:]) + p.finish()
            assert _strip_ids(collect(events)) == whole, (reasoning, cut)
        p = ChatStreamParser(TOOLS, reasoning)
        events = [e for ch in text for e in p.feed(ch)] + p.finish()
        assert _strip_ids(collect(events)) == whole


def test_stream_parser_random_chunks_and_no_tag_leaks():
    rng = random.Random(0)
    text = STREAM_CASES[1]
    whole = _strip_ids(parse_chat_output(text, TOOLS))
    for _ in range(200):
        p, events, i = ChatStreamParser(TOOLS), [], 0
        while i < len(text):
            j = i + rng.randint(1, 12)
            events += p.feed(text[i:j])
            i = j
        events += p.finish()
        assert _strip_ids(collect(events)) == whole
        assert not any(k != "tool_call" and "<" in v for k, v in events)


def test_rendered_tool_calls_parse_back():
    args = {"city": "Rome", "days": 5, "metric": False, "hours": [1, 2], "opts": {"x": "y"}}
    msg = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                             "arguments": json.dumps(args)}}]}
    out = render_chat([{"role": "user", "content": "q"}, msg], add_generation_prompt=False)
    reply = out.split("<|im_start|>assistant\n<think>\n", 1)[1].removesuffix("<|im_end|>\n")
    r = parse_chat_output(reply, TOOLS)
    assert json.loads(r.tool_calls[0]["function"]["arguments"]) == args


def test_tool_tag_used_as_text_is_released_without_waiting():
    p = ChatStreamParser(TOOLS)
    assert collect(p.feed("t</think>Write <tool_call> then")).content == "Write <tool_call> then"
    assert collect(p.feed(" more")).content == " more"  # not held until the end of the reply
