"""The tokenizer part of a GGUF: tokenizer.json as llama.cpp's GPT-2 byte-level BPE, plus the chat template.

llama.cpp does not run a tokenizer.json: it re-implements a fixed set of pre-tokenizers and learns which
one a model uses from `tokenizer.ggml.pre`. Its own converter guesses that name from a hash of one encoded
text, which fails for every tokenizer stepflash trains (each has its own vocabulary, so its own hash).
Here the name is read from the structure instead: a byte-level BPE whose only pre-tokenizer is
`ByteLevel(use_regex=True, add_prefix_space=False)` splits text with GPT-2's regex, which is llama.cpp's
`gpt-2` pre-tokenizer (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT2). Anything else is refused in one line
unless the caller names the pre-tokenizer (`--tokenizer-pre`), e.g. for the release's own tokenizer.

Token types follow llama.cpp's converter: added tokens marked special are CONTROL (matched only when the
caller parses specials, never produced by plain text), other added tokens USER_DEFINED, ids the tokenizer
lacks below vocab_size are `[PAD{i}]` UNUSED.
"""

from __future__ import annotations

import json
import os

import gguf

from stepflash.config import Step35Config
from stepflash.errors import UserError

GPT2_PRE = "gpt-2"
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def _is_gpt2_byte_level(pre: dict | None) -> bool:
    if pre and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return bool(pre) and all(pre.get(k) == v for k, v in _GPT2_BYTE_LEVEL.items())


def pre_tokenizer_name(spec: dict, path: str, override: str | None = None) -> str:
    """llama.cpp's name for the pre-tokenizer of the parsed tokenizer.json `spec`; UserError if unknown."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("dropout"):
        raise UserError(f"{path} is not a plain byte-level BPE tokenizer, which is what llama.cpp's gpt2 vocab runs")
    if spec.get("normalizer") is not None:
        raise UserError(f"{path} has a normalizer ({spec['normalizer'].get('type')}); llama.cpp's gpt2 vocab has none")
    post = spec.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":
        raise UserError(f"{path} adds tokens on encode ({post.get('type')} post-processor); the GGUF would not")
    if override:
        return override
    if not _is_gpt2_byte_level(spec.get("pre_tokenizer")):
        raise UserError(f"the pre-tokenizer of {path} is not GPT-2's byte-level regex (what stepflash trains); "
                        f"pass --tokenizer-pre with the llama.cpp pre-tokenizer it equals (e.g. llama-bpe, qwen2)")
    return GPT2_PRE


def gguf_vocab(spec: dict, vocab_size: int, path: str) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges "a b") for vocab_size ids from a parsed tokenizer.json."""
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"{path} has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, types, merges


def write_vocab(w: gguf.GGUFWriter, src: str, cfg: Step35Config, tokenizer_pre: str | None = None) -> None:
    """tokenizer.ggml.* and the chat template, from SRC's tokenizer.json and tokenizer_config.json."""
    from stepflash.chat import ChatTemplate
    from stepflash.tokenizer import TOKENIZER_FILE

    path = os.path.join(src, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no {TOKENIZER_FILE} in {src}: llama.cpp needs the vocabulary (save the model with "
                        f"save_model(..., tokenizer=...) or copy the tokenizer there)")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(spec, path, tokenizer_pre))
    tokens, types, merges = gguf_vocab(spec, cfg.vocab_size, path)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_ids:
        w.add_eos_token_id(cfg.eos_token_ids[0])  # llama.cpp also ends a turn at <|im_end|> (eot below)
    for token, add in (("<|im_end|>", w.add_eot_token_id), ("<|pad|>", w.add_pad_token_id)):
        if token in ids:
            add(ids[token])
    w.add_add_bos_token(False)  # stepflash's encode adds nothing; the chat template writes bos itself
    w.add_add_eos_token(False)
    w.add_chat_template(ChatTemplate.from_checkpoint(src).source)
