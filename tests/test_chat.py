"""The chat template: byte-identical to the official Step 3.5 Flash template over the fixture conversations
(tests/data/chat_template_fixtures.json, rendered once with the official template; see make_chat_fixtures.py
for its source and sha256), identical again when transformers renders the template a saved tokenizer
carries, and a 6-turn agent loop whose prompts the parser's output rebuilds exactly."""

import json
import os

import pytest

from stepflash.chat import (DEFAULT_CHAT_TEMPLATE, ChatFormatError, ChatTemplate, chat_template_source, opens_reasoning,
                            parse_chat_output, render_chat)

FIXTURES = json.load(open(os.path.join(os.path.dirname(__file__), "data", "chat_template_fixtures.json"),
                          encoding="utf-8"))
CASES = FIXTURES["cases"]
LOOP = FIXTURES["agent_loop"]


def test_fixtures_come_from_the_official_template():
    assert FIXTURES["sha256"].startswith("b18b99df")  # SPEC section 8
    assert len(CASES) >= 20 and len(LOOP["prompts"]) == 6


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_builtin_template_renders_the_official_bytes(case):
    got = ChatTemplate().render(case["messages"], case["tools"], case["add_generation_prompt"])
    assert got == case["expected"]


def test_compact_variant_differs_only_in_the_tools_preamble():
    """Negative control: the recipe's compact template must NOT match the fixtures that have tools."""
    compact = ChatTemplate(chat_template_source(tool_instructions=False))
    for case in CASES:
        got = compact.render(case["messages"], case["tools"], case["add_generation_prompt"])
        assert (got == case["expected"]) == (not case["tools"]), case["name"]
        if case["tools"]:
            assert "<IMPORTANT>" not in got and "\n</tools><|im_end|>\n" in got


def _server_preprocess(messages):
    """What vLLM does before templating: tool-call arguments sent as JSON strings become objects."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               if isinstance(c["function"]["arguments"], str) else c for c in m["tool_calls"]]
        out.append(m)
    return out


def test_saved_tokenizer_renders_identically_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    from stepflash.tokenizer import train_tokenizer

    train_tokenizer(["Paris weather sunny " * 50], vocab_size=300, out_path=str(tmp_path))
    cfg = json.load(open(tmp_path / "tokenizer_config.json"))
    assert cfg["chat_template"] == DEFAULT_CHAT_TEMPLATE and cfg["bos_token"] == "<|bos|>"
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = ChatTemplate.from_checkpoint(str(tmp_path))
    for case in CASES:
        theirs = hf.apply_chat_template(_server_preprocess(case["messages"]), tools=case["tools"], tokenize=False,
                                        add_generation_prompt=case["add_generation_prompt"])
        assert theirs == case["expected"] == ours.render(case["messages"], case["tools"],
                                                          case["add_generation_prompt"]), case["name"]


def test_agent_loop_with_interleaved_thinking():
    """A client that sends back each turn's reasoning_content and tool_calls (as parsed from the raw reply)
    gets, every turn, the prompt the official template builds, and each prompt extends the one before by
    exactly the model's own reply: the format's interleaved thinking, and a prefix cache hit."""
    messages = [{"role": "system", "content": LOOP["system"]}, {"role": "user", "content": LOOP["user"]}]
    for turn, (step, want) in enumerate(zip(LOOP["turns"], LOOP["prompts"])):
        prompt = render_chat(messages, LOOP["tools"])
        assert prompt == want, f"turn {turn}"
        reply = parse_chat_output(step["raw"], LOOP["tools"], reasoning=opens_reasoning(prompt))
        msg = {"role": "assistant", "content": reply.content, "reasoning_content": reply.reasoning_content}
        if reply.tool_calls:
            msg["tool_calls"] = reply.tool_calls  # arguments as the JSON strings the API returns
        assert len(reply.tool_calls) == len(step["tool_results"])
        messages += [msg] + [{"role": "tool", "tool_call_id": c["id"], "content": r}
                             for c, r in zip(reply.tool_calls, step["tool_results"])]
        if turn + 1 < len(LOOP["prompts"]):
            assert LOOP["prompts"][turn + 1].startswith(prompt + step["raw"] + "<|im_end|>\n")
    assert reply.content and not reply.tool_calls  # the last turn answers
    final = render_chat(messages, LOOP["tools"], add_generation_prompt=False)
    assert final == LOOP["prompts"][-1] + LOOP["turns"][-1]["raw"] + "<|im_end|>\n"


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


def test_reasoning_alias_and_no_stripping():
    """vLLM's newer `reasoning` field is read as reasoning_content; history whitespace is kept."""
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning": " r ", "content": "\n a \n"}]
    assert render_chat(msgs, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\n r \n</think>\n\n a \n<|im_end|>\n")


def test_checkpoint_template_is_used_and_sandboxed(tmp_path):
    template = "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}{% if add_generation_prompt %}{{ bos_token }}>{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    tpl = ChatTemplate.from_checkpoint(str(tmp_path))
    assert not tpl.is_default
    assert tpl.render([{"role": "user", "content": "hi"}]) == "[user:hi]<s>>"
    builtin = ChatTemplate.from_checkpoint(str(tmp_path), builtin=True)  # the built-in one, the checkpoint's BOS
    assert builtin.is_default and builtin.render([{"role": "user", "content": "hi"}]).startswith("<s><|im_start|>")
    assert ChatTemplate.from_checkpoint(str(tmp_path / "missing")).is_default
    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatFormatError):
        evil.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatFormatError, match="does not compile"):
        ChatTemplate("{% for %}")
    assert opens_reasoning(render_chat([{"role": "user", "content": "x"}]))
    assert not opens_reasoning(tpl.render([{"role": "user", "content": "x"}]))
