"""The reply parser beyond the peers' cases (tests/test_chat_peers.py): schema typing, calls inside the
reasoning, what stays text, streamed string arguments, and streaming through real incremental decoding:
no delta holds half a tag or half a UTF-8 character, and every split parses like the whole."""

import json
import random

import pytest

from stepflash.chat import (ChatStreamParser, coerce_value, collect, openai_deltas, parse_chat_output, render_chat)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "ratio": {"type": "number"}, "opts": {"type": "object"}, "hours": {"type": "array"},
        "zip": {"type": "string"}, "note": {"type": ["null", "string"]}}}}}
TOOLS = [WEATHER, {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}]
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
ACTIVE_TAGS = {"reasoning": ["</think>", "<tool_call>"], "content": ["<tool_call>", "<function="]}  # with tools


def calls_of(reply):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.tool_calls]


def test_reasoning_then_content_trims_one_newline_each_side():
    r = parse_chat_output("Let me think.\n</think>\n\nThe answer is 4.\n")
    assert (r.reasoning_content, r.content, r.tool_calls) == ("Let me think.", "\nThe answer is 4.\n", [])
    assert parse_chat_output("still thinking\n").reasoning_content == "still thinking"  # cut off: all reasoning
    assert parse_chat_output("Hi there", reasoning=False).content == "Hi there"
    r = parse_chat_output("<think>\n<think>hm</think>Yes", reasoning=True)  # a repeated <think> is dropped
    assert (r.reasoning_content, r.content) == ("\nhm", "Yes")


def test_tool_calls_with_schema_typed_arguments():
    text = ("plan</think>\n\nSure." + CALL.replace("<parameter=days>", "<parameter=metric>\nTrue\n</parameter>\n"
            "<parameter=ratio>\n0.5\n</parameter>\n<parameter=opts>\n{'a': [1, 2]}\n</parameter>\n"
            "<parameter=hours>\n[1, 2]\n</parameter>\n<parameter=zip>\n02139\n</parameter>\n<parameter=note>\nNone\n"
            "</parameter>\n<parameter=extra>\n7\n</parameter>\n<parameter=days>") + "\n<tool_call>\n<function=noop>\n"
            "</function>\n</tool_call>")
    r = parse_chat_output(text, TOOLS)
    assert (r.reasoning_content, r.content) == ("plan", "\nSure.")
    assert calls_of(r) == [("get_weather", {"city": "San Francisco", "metric": True, "ratio": 0.5, "opts": {"a": [1, 2]},
                                            "hours": [1, 2], "zip": "02139", "note": None, "extra": 7, "days": 3}),
                           ("noop", {})]
    assert r.tool_calls[0]["type"] == "function" and r.tool_calls[0]["id"] != r.tool_calls[1]["id"]


@pytest.mark.parametrize("text, schema, expected", [
    ("12", {"type": "integer"}, 12), ("1.5", {"type": "integer"}, "1.5"), ("-3", {"type": "number"}, -3),
    ("2e3", {"type": "number"}, 2000.0), ("3.14", {"type": "float"}, 3.14), ("7", {"type": "int64"}, 7),
    ("nan", {"type": "number"}, "nan"), ("true", {"type": "number"}, "true"), ("FALSE", {"type": "boolean"}, False),
    ("True", {"type": "bool"}, True), ("yes", {"type": "boolean"}, "yes"), ("[1]", {"type": "object"}, "[1]"),
    ("{1, 2}", {"type": "object"}, "{1, 2}"), ("(1, 2)", {"type": "array"}, "(1, 2)"), ("12", {"type": "string"}, "12"),
    (" a b ", {"type": "string"}, " a b "), ("null", {"type": "string"}, "null"), ("None", {"type": "integer"}, None),
    ("null", {"type": ["integer", "null"]}, None), ("3", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, 3),
    ("x", {"enum": ["x", "y"]}, "x"), ("hello", None, "hello"), ('{"k": 1}', None, {"k": 1}),
    ("[1, 2]", {"type": "list"}, [1, 2]), ("{'a': None}", {"type": "dict"}, {"a": None}),
])
def test_coerce_value(text, schema, expected):
    assert coerce_value(text, schema) == expected


@pytest.mark.parametrize("block", [
    "<tool_call>\n<function=>\n</function>\n</tool_call>",  # no name
    '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',  # JSON, not this format
    "<tool_call>\n<function=get_weather>\nstray text\n</function>\n</tool_call>",  # text where parameters go
    "<tool_call>\n<function=launch_missiles>\n</function>\n</tool_call>",  # not one of the tools
    "use <tool_call> tags like this",
])
def test_malformed_tool_calls_stay_content(block):
    r = parse_chat_output("t</think>" + block, TOOLS)
    assert r.tool_calls == [] and r.content == block


def test_tool_xml_is_content_without_tools():
    assert parse_chat_output("t</think>" + CALL).content == CALL


@pytest.mark.parametrize("text, reasoning", [
    ("I will look it up.\n" + CALL, "I will look it up."),  # no </think>: the call ends the reasoning
    (CALL, None),
])
def test_tool_call_inside_reasoning_becomes_a_call(text, reasoning):
    r = parse_chat_output(text, TOOLS)
    assert (r.reasoning_content, r.content) == (reasoning, None)
    assert calls_of(r) == [("get_weather", {"city": "San Francisco", "days": 3})]
    assert parse_chat_output("plan <tool_call> maybe", TOOLS).reasoning_content == "plan <tool_call> maybe"


def test_rendered_tool_calls_parse_back():
    args = {"city": "Rome", "days": 5, "metric": False, "hours": [1, 2], "opts": {"x": "y"}, "note": None}
    msg = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                             "arguments": json.dumps(args)}}]}
    out = render_chat([{"role": "user", "content": "q"}, msg], add_generation_prompt=False)
    reply = out.split("<|im_start|>assistant\n<think>\n", 1)[1].removesuffix("<|im_end|>\n")
    assert calls_of(parse_chat_output(reply, TOOLS)) == [("get_weather", args)]


def test_tool_tag_used_as_text_is_released_without_waiting():
    p = ChatStreamParser(TOOLS)
    assert collect(p.feed("t</think>Write <tool_call> then")).content == "Write <tool_call> then"
    assert collect(p.feed(" more")).content == " more"  # not held until the end of the reply


def test_string_arguments_stream_as_they_are_written():
    p = ChatStreamParser(TOOLS, reasoning=False)
    head = p.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Fr")
    assert openai_deltas(head)[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in openai_deltas(head)[1:]) == '{"city": "San Fr'
    more = openai_deltas(p.feed("ancisco\n"))  # the newline is held: it may be the one before </parameter>
    assert more == [{"tool_calls": [{"index": 0, "function": {"arguments": "ancisco"}}]}]


STREAM_CASES = [
    "Let me think.\n</think>\n\nThe answer is 4.",
    "plan </think>\nSure.\n" + CALL + "\n" + CALL + "\nDone.",
    "x</think>" + CALL[:-3],
    "x</think>a <tool_call>{bad}</tool_call> b </thin",
    "<think>hm</think>Yes <tool_call",
    "\n\n  </think>\n\n  ",
    "思考中…\n</think>\n東京は晴れ ✓" + CALL.replace("San Francisco", "東京\n"),
    "a < b and c <<function=get_weather> <think x",
]


def _strip_ids(reply):
    return reply.reasoning_content, reply.content, [(c["function"]["name"], c["function"]["arguments"])
                                                   for c in reply.tool_calls]


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


def _split_tags(kind: str, deltas: list[str]) -> list[str]:
    """Tags (as they appear in the joined text) that straddle the boundary between two deltas."""
    joined, cuts, at = "".join(deltas), set(), 0
    for d in deltas:
        at += len(d)
        cuts.add(at)
    return [tag for tag in ACTIVE_TAGS[kind] for i in range(len(joined)) if joined.startswith(tag, i)
            and any(i < c < i + len(tag) for c in cuts)]


def test_streamed_tokens_never_split_a_tag_or_a_character():
    """Token by token through the server's incremental decoder (byte-level BPE, so CJK characters span
    tokens; the tags are NOT special tokens here, so they arrive in pieces too): no reasoning/content delta
    holds U+FFFD or half a tag, and the deltas join to the one-shot parse. Negative control: decoding
    tokens one by one does produce U+FFFD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from stepflash.server.textstream import TextStream

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["plain ascii text only " * 20], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    rng = random.Random(0)
    for text in STREAM_CASES:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        if any(ord(c) > 127 for c in text):
            assert any("\ufffd" in tok.decode([i]) for i in ids)  # the hazard is real
        stream, parser, events = TextStream(tok), ChatStreamParser(TOOLS), []
        i = 0
        while i < len(ids):
            step = rng.randint(1, 4)  # MTP: several tokens per step
            events.append(parser.feed(stream.push(ids[i:i + step])))
            i += step
        events.append(parser.feed(stream.finish()) + parser.finish())
        for kind in ACTIVE_TAGS:
            deltas = [v for piece in events for k, v in piece if k == kind]
            assert not any("\ufffd" in d for d in deltas) and not _split_tags(kind, deltas), (text, deltas)
        assert _strip_ids(collect([e for piece in events for e in piece])) == _strip_ids(parse_chat_output(text, TOOLS))
