"""OpenAI logprobs shapes: token bytes against the tokenizer's own decoding, offsets against the text."""

import math

from test_server import TOK

from stepflash.server.logprobs import FLOOR, TokenBytes, chat_logprobs, completion_logprobs

TEXT = "héllo wörld 東京 ✓ <|im_end|>"


def test_token_bytes_concatenate_to_the_text():
    ids = TOK.encode(TEXT, add_special_tokens=False).ids
    tb = TokenBytes(TOK)
    assert b"".join(tb(t) for t in ids) == TEXT.encode()
    assert any(not _valid_utf8(tb(t)) for t in ids)  # some token holds part of a character (the case that matters)
    for t in range(TOK.get_vocab_size()):
        raw = tb(t)
        if _valid_utf8(raw):
            assert raw.decode() == TOK.decode([t], skip_special_tokens=False), t


def test_chat_shape_and_floor():
    ids = TOK.encode("héllo", add_special_tokens=False).ids
    lps = [-0.5] * (len(ids) - 1) + [-math.inf]
    tops = [[(ids[i], lps[i]), (5, -3.0)] for i in range(len(ids))]
    out = chat_logprobs(TokenBytes(TOK), ids, lps, tops)
    assert out["refusal"] is None and len(out["content"]) == len(ids)
    first = out["content"][0]
    assert set(first) == {"token", "logprob", "bytes", "top_logprobs"} and first["logprob"] == -0.5
    assert out["content"][-1]["logprob"] == FLOOR  # -inf is not JSON
    assert [e["top_logprobs"][1]["logprob"] for e in out["content"]] == [-3.0] * len(ids)
    assert bytes(b for e in out["content"] for b in e["bytes"]).decode() == "héllo"
    assert chat_logprobs(TokenBytes(TOK), ids, lps)["content"][0]["top_logprobs"] == []


def test_completion_offsets_count_completed_characters():
    ids = TOK.encode(TEXT, add_special_tokens=False).ids
    out = completion_logprobs(TokenBytes(TOK), ids, [-1.0] * len(ids), text_offset=3)
    assert out["top_logprobs"] is None and out["token_logprobs"] == [-1.0] * len(ids)
    for i, off in enumerate(out["text_offset"]):  # characters fully decoded before token i, after 3 of echo
        prefix = b"".join(TokenBytes(TOK)(t) for t in ids[:i]).decode("utf-8", errors="ignore")
        assert off == 3 + len(prefix)
    tops = completion_logprobs(TokenBytes(TOK), ids[:1], [-1.0], [[(ids[0], -1.0), (4, float("nan"))]])
    assert tops["top_logprobs"] == [{TokenBytes(TOK).text(ids[0]): -1.0, "<|im_end|>": FLOOR}]


def _valid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
