"""OpenAI's logprobs shapes, from token ids and the engine's logprobs.

    chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
                  "refusal": None}
    completions: {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}] | None,
                  "text_offset": [...]}

A byte-level BPE token may hold part of a UTF-8 character, so "bytes" are the token's own bytes (from
the vocabulary through the byte-level alphabet) and "token" is those bytes decoded with U+FFFD for an
incomplete character, as vLLM shows them. "text_offset" counts the characters completed before each
token. JSON has no -inf: a logprob below -9999 (a token outside top-k/top-p) is written as -9999.0, as
vLLM does. What a logprob means is defined in `inference/logits_process.py` (the distribution sampled from).

completions.py calls these with the engine's `StepOutput.new_top_logprobs`.
"""

from __future__ import annotations

import codecs
import math

from tokenizers import decoders

FLOOR = -9999.0


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    """token id -> its bytes, for byte-level tokenizers from the vocabulary, otherwise by decoding."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self.special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        self._table = _byte_decoder()
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tokenizer.id_to_token(token_id)
            if piece is None:
                hit = b""
            elif self.byte_level and piece not in self.special and all(c in self._table for c in piece):
                hit = bytes(self._table[c] for c in piece)
            else:
                hit = self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
            self._cache[token_id] = hit
        return hit

    def text(self, token_id: int) -> str:
        return self(token_id).decode("utf-8", errors="replace")


def finite(logprob: float) -> float:
    return FLOOR if math.isnan(logprob) or logprob < FLOOR else float(logprob)


def chat_logprobs(token_bytes: TokenBytes, token_ids: list[int], logprobs: list[float],
                  top: list[list[tuple[int, float]]] | None = None) -> dict:
    """The `logprobs` of a chat choice (or of one streamed chunk's tokens)."""
    def entry(tid: int, lp: float) -> dict:
        raw = token_bytes(tid)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": finite(lp), "bytes": list(raw)}

    content = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs)):
        item = entry(tid, lp)
        item["top_logprobs"] = [entry(t, v) for t, v in (top[i] if top else [])]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(token_bytes: TokenBytes, token_ids: list[int], logprobs: list[float],
                        top: list[list[tuple[int, float]]] | None = None, text_offset: int = 0) -> dict:
    """The `logprobs` of a completion choice; text_offset: characters before the first token (echo)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens, offsets, chars = [], [], text_offset
    for tid in token_ids:
        raw = token_bytes(tid)
        tokens.append(raw.decode("utf-8", errors="replace"))
        offsets.append(chars)
        chars += len(decoder.decode(raw))
    tops = None
    if top is not None:
        tops = [{token_bytes.text(t): finite(v) for t, v in row} for row in top]
    return {"tokens": tokens, "token_logprobs": [finite(lp) for lp in logprobs], "top_logprobs": tops,
            "text_offset": offsets}
