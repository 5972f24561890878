"""Grammar-constrained sampling: with random logits only the mask can make the output valid.

Outputs are checked by independent means: `json.loads` plus a small JSON Schema checker written here
(the subset the schemas below use), and the chat parser `stepflash.chat.parse_chat_output` for tool
calls. Every property test has a negative control (the same random walk without the mask is invalid).
Speculative decoding is simulated with random draft and target logits: drafts masked as they are
drafted, verified with the masks along the drafts, the rejected ones rolled back.
"""

import json

import llguidance
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stepflash.chat import parse_chat_output
from stepflash.errors import UserError
from stepflash.inference.structured import GrammarCompiler, bitmask_to_bool, masked_logits, masks_along_drafts
from stepflash.tokenizer import train_tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog. Weather in Paris: sunny, 23 degrees. {\"a\": 1, \"b\": [true, "
        "null]} " * 20, "héllo wörld 東京 ✓ " * 10]
TOK = train_tokenizer(TEXT, 300)
V = 304  # the model's vocabulary is padded past the tokenizer's: those ids must never be allowed
STOPS = [TOK.token_to_id("<|im_end|>"), TOK.token_to_id("<|eos|>")]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 9},
    "unit": {"type": "string", "enum": ["C", "F"]}}, "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string", "maxLength": 5}}, "required": ["zone"]}}}


def valid(value, schema) -> bool:
    """The JSON Schema subset used here: type, enum, properties, required, additionalProperties,
    minimum/maximum, minLength/maxLength, items, maxItems."""
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    t = schema.get("type")
    if t == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return False
    elif t is not None and not isinstance(value, kinds[t]):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", -float("inf")) or value > schema.get("maximum", float("inf")):
            return False
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1e18):
        return False
    if isinstance(value, list):
        return len(value) <= schema.get("maxItems", 1e18) and all(valid(v, schema.get("items", {})) for v in value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and any(k not in props for k in value):
            return False
        return all(valid(v, props[k]) for k, v in value.items() if k in props)
    return True


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(TOK, V, STOPS)


def walk(compiler, grammar, seed, masked=True, max_tokens=250):
    """Sample from random logits (with or without the grammar mask) until a stop id."""
    m = compiler.matcher(grammar)
    bits = torch.zeros(m.words, dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(max_tokens):
        logits = torch.randn(V, generator=g) * 3
        if masked:
            m.fill_mask(bits)
            logits = masked_logits(logits, bits)
        tok = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        out.append(tok)
        if tok in STOPS:
            break
        if masked:
            assert m.consume([tok]), m.error
    return out


def schema_ok(text, schema=SCHEMA) -> bool:
    try:
        return valid(json.loads(text), schema)
    except (TypeError, ValueError):
        return False


def reply_text(ids):
    return TOK.decode([t for t in ids if t not in STOPS], skip_special_tokens=False)


def test_json_schema_with_reasoning_is_valid_only_with_the_mask(compiler):
    grammar = compiler.json_schema(SCHEMA, reasoning=True, reasoning_max_chars=15)
    for seed in range(6):
        ids = walk(compiler, grammar, seed)
        assert ids[-1] in STOPS and all(t < TOK.get_vocab_size() for t in ids)
        reply = parse_chat_output(reply_text(ids))
        assert schema_ok(reply.content), reply.content
    unmasked = [parse_chat_output(reply_text(walk(compiler, grammar, s, masked=False))).content for s in range(6)]
    assert not any(schema_ok(c) for c in unmasked)  # negative control


def test_json_object_without_reasoning(compiler):
    grammar = compiler.json_object()
    for seed in range(4):
        assert isinstance(json.loads(reply_text(walk(compiler, grammar, seed))), dict)


@pytest.mark.parametrize("name, parallel", [(None, True), (None, False), ("get_time", True)])
def test_tool_calls_parse_and_validate(compiler, name, parallel):
    tools = [WEATHER, TIME]
    grammar = compiler.tool_calls(tools, name=name, parallel=parallel, reasoning=True, reasoning_max_chars=9)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    counts = []
    for seed in range(6):
        reply = parse_chat_output(reply_text(walk(compiler, grammar, seed, max_tokens=400)), tools)
        assert reply.tool_calls and not reply.content, reply
        counts.append(len(reply.tool_calls))
        for call in reply.tool_calls:
            fn = call["function"]
            assert name is None or fn["name"] == name
            assert valid(json.loads(fn["arguments"]), schemas[fn["name"]]), fn
    assert all(c == 1 for c in counts) if (name or not parallel) else max(counts) >= 1
    unmasked = parse_chat_output(reply_text(walk(compiler, grammar, 0, masked=False)), tools)
    assert not unmasked.tool_calls  # negative control


def test_invalid_requests_are_user_errors(compiler):
    with pytest.raises(UserError, match="not in tools"):
        compiler.tool_calls([WEATHER], name="nope")
    with pytest.raises(UserError, match="at least one tool"):
        compiler.tool_calls([])
    with pytest.raises(UserError, match="grammar is not valid"):
        compiler.json_schema({"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    with pytest.raises(UserError, match="parameter name"):
        compiler.tool_calls([{"function": {"name": "f", "parameters": {"properties": {"a>b": {}}}}}])


def test_after_the_body_only_stop_ids(compiler):
    m = compiler.matcher(compiler.tool_calls([TIME], name="get_time"))
    text = "<tool_call>\n<function=get_time>\n<parameter=zone>\nUTC\n</parameter>\n</function>\n</tool_call>"
    assert m.consume(TOK.encode(text).ids)
    bits = torch.zeros(m.words, dtype=torch.int32)
    m.fill_mask(bits)
    assert bitmask_to_bool(bits, V).nonzero().flatten().tolist() == sorted(STOPS) and m.is_stopped


def test_non_ascii_names_and_enum_values(compiler):
    tool = {"function": {"name": "wetter_ö", "parameters": {"type": "object", "properties": {
        "stadt": {"type": "string", "enum": ["東京", "Zürich \"Nord\""]}}, "required": ["stadt"]}}}
    m = compiler.matcher(compiler.tool_calls([tool], name="wetter_ö"))
    good = '<tool_call>\n<function=wetter_ö>\n<parameter=stadt>\nZürich "Nord"\n</parameter>\n</function>\n</tool_call>'
    ids = TOK.encode(good).ids
    assert m.validate(ids) == len(ids) and m.validate(TOK.encode(good.replace("Nord", "Süd")).ids) < len(ids)


def test_rollback_equals_a_fresh_matcher(compiler):
    grammar = compiler.json_schema(SCHEMA)
    ids = TOK.encode('{"name": "fox", "age": 23, "tags": ["a"], "ok": true}').ids
    m = compiler.matcher(grammar)
    assert m.consume(ids)
    a, b = torch.zeros(m.words, dtype=torch.int32), torch.zeros(m.words, dtype=torch.int32)
    consumed = len(ids)
    for keep in (len(ids) - 1, 7, 0):
        m.rollback(consumed - keep)
        consumed = keep
        fresh = compiler.matcher(grammar)
        assert fresh.consume(ids[:keep])
        m.fill_mask(a)
        fresh.fill_mask(b)
        assert torch.equal(a, b)
    assert m.validate(ids) == len(ids) and m.validate(TOK.encode("[1]").ids) == 0


def test_speculative_drafts_masked_verified_and_rolled_back(compiler):
    """MTP flow: draft K tokens through the mask, verify with masks along the drafts, accept a prefix
    (random here), roll back the rest, emit the final token from the verifier's masked distribution."""
    grammar = compiler.json_schema(SCHEMA, reasoning=True, reasoning_max_chars=12)
    K = 3
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        m = compiler.matcher(grammar)
        bits = torch.zeros(K + 1, m.words, dtype=torch.int32)
        out = []
        while not out or out[-1] not in STOPS:
            drafts = []
            for _ in range(K):  # the drafter: each draft sampled under the mask after the previous ones
                m.fill_mask(bits[0])
                if m.is_stopped:
                    break
                tok = int(torch.multinomial(torch.softmax(masked_logits(torch.randn(V, generator=g), bits[0]), -1), 1,
                                            generator=g))
                if tok in STOPS:
                    break
                assert m.consume([tok])
                drafts.append(tok)
            m.rollback(len(drafts))  # the verifier starts from the committed state
            before = torch.zeros(m.words, dtype=torch.int32)
            m.fill_mask(before)
            assert m.masks_along_drafts(drafts, bits) == len(drafts) + 1
            after = torch.zeros(m.words, dtype=torch.int32)
            m.fill_mask(after)
            assert torch.equal(before, after) and torch.equal(bits[0], before)  # state unchanged
            accepted = int(torch.randint(0, len(drafts) + 1, (1,), generator=g))
            final_logits = masked_logits(torch.randn(V, generator=g), bits[accepted])
            final = int(torch.multinomial(torch.softmax(final_logits, -1), 1, generator=g))
            assert m.consume(drafts[:accepted])
            out += drafts[:accepted] + [final]
            if final not in STOPS:
                assert m.consume([final]), m.error
        assert schema_ok(parse_chat_output(reply_text(out)).content)
        fresh = compiler.matcher(grammar)
        assert fresh.validate(out[:-1]) == len(out) - 1  # the emitted text is one valid path


def test_a_refused_draft_is_cut_and_leaves_the_matcher_usable(compiler):
    m = compiler.matcher(compiler.json_object())
    drafts = TOK.encode('{"a": x').ids  # 'x' is not JSON
    bits = torch.zeros(len(drafts) + 1, m.words, dtype=torch.int32)
    written = m.masks_along_drafts(drafts, bits)
    assert written == m.validate(drafts) + 1 < len(drafts) + 1
    assert not m.error and m.consume(TOK.encode('{"a": 1}').ids)


def direct_mask(compiler, grammar, prefix):
    """The mask after `prefix` from a matcher built here with llguidance (no cache, copy or rollback),
    or None where the grammar refuses the prefix."""
    m = llguidance.LLMatcher(compiler.ll_tokenizer, grammar.source, log_level=0)
    if m.validate_tokens(prefix) < len(prefix) or not m.consume_tokens(prefix):
        return None
    bits = torch.zeros((V + 31) // 32, dtype=torch.int32)
    m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
    return bits


@pytest.mark.parametrize("parallel", [False, True])
def test_batched_masks_along_drafts_equal_fresh_matchers(compiler, parallel):
    """Rows of the engine's batch: no drafts, valid drafts, a refused draft, a stop id drafted where the
    JSON is complete (a consumed stop id cannot be rolled back; this raised before), drafts running
    past the end. Each written mask equals a matcher built directly; positions not decided stay -1."""
    grammar = compiler.json_schema(SCHEMA)
    done = TOK.encode('{"name": "fox", "age": 2, "ok": true}').ids
    prefixes = [[], TOK.encode('{"name": "').ids, TOK.encode('{"na').ids, done[:-2], done[:-1]]
    drafts = [[], TOK.encode("fox jumps").ids[:3], TOK.encode("x").ids[:1], done[-2:] + [STOPS[0]],
              done[-1:] + [STOPS[1], 7]]
    matchers = [compiler.matcher(grammar) for _ in prefixes]
    for m, p in zip(matchers, prefixes):
        assert m.consume(p)
    T = 1 + max(map(len, drafts))
    out = torch.full((len(matchers), T, matchers[0].words), -1, dtype=torch.int32)
    masks_along_drafts(matchers, drafts, out, parallel=parallel)
    decided = [0] * len(drafts)
    for i, (p, d) in enumerate(zip(prefixes, drafts)):
        # the last position decided: a stop id or a refused draft comes next
        ends = next((t for t in range(len(d))
                     if d[t] in STOPS or direct_mask(compiler, grammar, p + d[: t + 1]) is None), len(d))
        for t in range(T):
            want = direct_mask(compiler, grammar, p + d[:t]) if t <= ends else None
            assert torch.equal(out[i, t], want if want is not None else torch.full_like(out[i, t], -1)), (i, t)
            decided[i] += want is not None
        assert torch.equal(direct_mask(compiler, grammar, p), _mask(matchers[i]))  # the state is unchanged
    assert decided == [1, 1 + len(drafts[1]), 1, 3, 2]


def _mask(m):
    bits = torch.zeros(m.words, dtype=torch.int32)
    m.fill_mask(bits)
    return bits


def test_cached_grammars_give_independent_fresh_matchers(compiler):
    grammar = compiler.json_schema(SCHEMA)
    assert compiler.json_schema(SCHEMA) is grammar  # compiled and validated once
    a, b = compiler.matcher(grammar), compiler.matcher(grammar)
    ids = TOK.encode('{"name": "fox"').ids
    assert a.consume(ids)
    assert torch.equal(_mask(a), direct_mask(compiler, grammar, ids))
    assert torch.equal(_mask(b), direct_mask(compiler, grammar, []))  # b did not move with a
    assert torch.equal(_mask(compiler.matcher(grammar)), direct_mask(compiler, grammar, []))
    assert not torch.equal(_mask(a), _mask(b))  # negative control: the two states do differ


def test_tags_as_text_when_the_tokenizer_has_no_special_tokens():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    compiler = GrammarCompiler(tok, 300, [0])
    grammar = compiler.tool_calls([TIME], name="get_time", reasoning=True, reasoning_max_chars=60)
    m = compiler.matcher(grammar)
    bits = torch.zeros(m.words, dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    out = []
    while not out or out[-1] != 0:
        m.fill_mask(bits)
        tok_id = int(torch.multinomial(torch.softmax(masked_logits(torch.randn(300, generator=g), bits), -1), 1,
                                       generator=g))
        out.append(tok_id)
        if tok_id != 0:
            assert m.consume([tok_id])
        assert len(out) < 600
    reply = parse_chat_output(tok.decode(out[:-1]), [TIME])
    assert [c["function"]["name"] for c in reply.tool_calls] == ["get_time"]
    assert "</think>" not in reply.reasoning_content


def test_bitmask_unpacking_matches_naive():
    bits = torch.tensor([[-1, 5], [0x40000000, -(2 ** 31)]], dtype=torch.int32)
    want = [[True] * 32 + [True, False, True] + [False] * 3, [False] * 30 + [True, False] + [False] * 6]
    assert bitmask_to_bool(bits, 38).tolist() == want
