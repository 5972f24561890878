"""Tokenizers: train a byte-level BPE with the project's special tokens, load and save tokenizer.json.

A tokenizer is a plain `tokenizers.Tokenizer` (the HF Rust tokenizer): `tok.encode(text).ids`,
`tok.decode(ids)`, `tok.token_to_id("<|eos|>")`. Tokenizers trained here put the special tokens at
ids 0..10 in the order of `SPECIAL_TOKENS`; the release tokenizer has other ids, so code looks
special tokens up by string (`special_id`), never by number.

A checkpoint's own tokenizer.json (the release's, say) is used unchanged: `save_tokenizer` given the
path of a tokenizer.json copies the file byte for byte instead of re-serialising it.
Next to tokenizer.json we write tokenizer_config.json (bos/eos/pad tokens and the Step 3.5 chat template),
so `transformers.AutoTokenizer.from_pretrained(dir)` loads the same tokenizer and its `apply_chat_template`
renders byte for byte what `stepflash serve` renders (tests/test_chat.py checks it).

`stepflash tokenizer train` trains one from a text corpus (the same inputs as `stepflash data prepare`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stepflash.chat import DEFAULT_CHAT_TEMPLATE
from stepflash.errors import UserError

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                  "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Byte-level BPE needs all 256 byte symbols for a lossless round trip.
LOSSLESS_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# The project's one chat template: stepflash's own Jinja source for the official Step 3.5 Flash format
# (SPEC section 8; `stepflash.chat.template`), which starts with `bos_token`. Written into
# tokenizer_config.json so servers and transformers' apply_chat_template render exactly what
# `stepflash serve` renders.
CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE


def _texts(files_or_iterator: Iterable[str] | str) -> Iterator[str]:
    """A list of file paths (or one path) yields each file's text; any other iterable yields its strings."""
    if isinstance(files_or_iterator, (str, os.PathLike)):
        files_or_iterator = [files_or_iterator]
    for item in files_or_iterator:
        if isinstance(item, (str, os.PathLike)) and os.path.isfile(item):
            with open(item, encoding="utf-8", errors="replace") as f:
                yield f.read()
        else:
            yield str(item)


def train_tokenizer(files_or_iterator: Iterable[str] | str, vocab_size: int, out_path: str | None = None,
                    show_progress: bool = False, split_digits: bool = False) -> Tokenizer:
    """Byte-level BPE of `vocab_size` tokens (special tokens at ids 0..10) trained on the texts.

    files_or_iterator: file paths, or an iterable of text strings. out_path: a directory (tokenizer.json
    and tokenizer_config.json are written there) or a path ending in .json; None writes nothing.
    Below LOSSLESS_MIN_VOCAB (267) not every byte can have a token: the alphabet is then the most
    frequent bytes of the corpus and rarer bytes are dropped on encode (only the `tiny` test preset
    is that small). split_digits: every digit its own token (small models learn arithmetic on digits)."""
    if vocab_size <= len(SPECIAL_TOKENS) + 1:
        raise UserError(f"vocab_size must be larger than the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    if vocab_size >= LOSSLESS_MIN_VOCAB:
        alphabet = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
    else:
        alphabet = {"limit_alphabet": vocab_size - len(SPECIAL_TOKENS)}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  show_progress=show_progress, **alphabet)
    tok.train_from_iterator(_texts(files_or_iterator), trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, f"special token {s} landed at {tok.token_to_id(s)}, expected {i}"
    if out_path is not None:
        if out_path.endswith(".json"):
            tok.save(out_path)
        else:
            save_tokenizer(tok, out_path)
    return tok


def tokenizer_path(checkpoint_dir_or_file: str) -> str:
    p = checkpoint_dir_or_file
    return os.path.join(p, TOKENIZER_FILE) if os.path.isdir(p) else p


def load_tokenizer(checkpoint_dir_or_file: str) -> Tokenizer:
    """tokenizer.json from a checkpoint directory (or the file itself)."""
    path = tokenizer_path(checkpoint_dir_or_file)
    if not os.path.isfile(path):
        raise UserError(f"no tokenizer.json at {path}")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises plain Exceptions for malformed files
        raise UserError(f"{path} is not a valid tokenizer.json: {e}")


def special_id(tok: Tokenizer, token: str) -> int | None:
    """Id of a special token looked up by its string (None when the tokenizer lacks it)."""
    return tok.token_to_id(token)


def _tokenizer_config(tok: Tokenizer) -> dict:
    vocab = tok.get_vocab(with_added_tokens=True)
    have = [s for s in SPECIAL_TOKENS if s in vocab]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS if BOS in vocab else None,
        "eos_token": EOS if EOS in vocab else None,
        "pad_token": PAD if PAD in vocab else None,
        "additional_special_tokens": [s for s in have if s not in (BOS, EOS, PAD)],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tok: Tokenizer | str, out_dir: str) -> None:
    """Write tokenizer.json and tokenizer_config.json into out_dir (each to a temp name, then renamed).

    `tok` may be the path of an existing tokenizer.json (or a directory holding one): it is then copied
    unchanged, with its tokenizer_config.json if it has one."""
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, TOKENIZER_FILE)
    src_config = None
    if isinstance(tok, (str, os.PathLike)):
        src = tokenizer_path(str(tok))
        if not os.path.isfile(src):
            raise UserError(f"no tokenizer.json at {src}")
        candidate = os.path.join(os.path.dirname(os.path.abspath(src)), TOKENIZER_CONFIG_FILE)
        src_config = candidate if os.path.isfile(candidate) else None
        if os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
        tok = Tokenizer.from_file(src)
    else:
        tok.save(dst + ".tmp")
        os.replace(dst + ".tmp", dst)
    cfg_dst = os.path.join(out_dir, TOKENIZER_CONFIG_FILE)
    if src_config is not None:
        if os.path.abspath(src_config) != os.path.abspath(cfg_dst):
            shutil.copyfile(src_config, cfg_dst + ".tmp")
            os.replace(cfg_dst + ".tmp", cfg_dst)
        return
    with open(cfg_dst + ".tmp", "w") as f:
        json.dump(_tokenizer_config(tok), f, indent=2)
        f.write("\n")
    os.replace(cfg_dst + ".tmp", cfg_dst)
