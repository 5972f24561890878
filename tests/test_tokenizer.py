import json
import os

import pytest

from stepflash.errors import UserError
from stepflash.tokenizer import SPECIAL_TOKENS, load_tokenizer, save_tokenizer, train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "for i in range(10):\n    print(i ** 2)  # squares\n",
    "Unicode survives: héllo wörld, 日本語, emoji 🙂, tabs\tand\r\nnewlines.\n",
] * 5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 400)


def test_special_tokens_at_ids_0_to_10(tok):
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(11))
    assert [tok.id_to_token(i) for i in range(11)] == SPECIAL_TOKENS
    assert 256 + 11 < tok.get_vocab_size() <= 400  # the corpus may run out of merges before 400


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x * 2\n",
    "never seen: Ωμέγα ✓ 🚀 \x00 \u200b",  # bytes absent from training still round-trip (byte-level)
    "",
])
def test_round_trip(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # plain text never produces special ids


def test_special_strings_encode_to_single_ids(tok):
    text = "<|im_start|>user\nhi<|im_end|>\n<think>\nok</think>"
    ids = tok.encode(text).ids
    assert ids[0] == 3 and 4 in ids and 5 in ids and 6 in ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_training_is_deterministic(tok):
    assert train_tokenizer(TEXTS, 400).to_str() == tok.to_str()


def test_bpe_compresses(tok):
    text = TEXTS[0] * 3
    assert len(tok.encode(text).ids) < len(text.encode()) / 2


def test_save_load_and_transformers_reads_it(tok, tmp_path):
    save_tokenizer(tok, str(tmp_path))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    again = load_tokenizer(str(tmp_path))
    assert again.encode(TEXTS[1]).ids == tok.encode(TEXTS[1]).ids
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.encode(TEXTS[2], add_special_tokens=False) == tok.encode(TEXTS[2]).ids
    prompt = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"  # official layout


def test_given_tokenizer_json_is_copied_unchanged(tok, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # A foreign layout (indented, special tokens elsewhere) must come through byte for byte.
    data = json.loads(tok.to_str())
    (src / "tokenizer.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n\n")
    dst = tmp_path / "dst"
    save_tokenizer(str(src), str(dst))
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert os.path.isfile(dst / "tokenizer_config.json")


def test_small_vocab_keeps_special_ids():
    small = train_tokenizer(TEXTS, 200)  # below 256 + 11: alphabet limited to frequent bytes
    assert [small.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(11))
    assert small.get_vocab_size() <= 200
    assert small.decode(small.encode(TEXTS[0]).ids) == TEXTS[0]


def test_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(TEXTS, 5)


def test_cli_trains_from_a_directory(tmp_path):
    from stepflash.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, t in enumerate(TEXTS[:4]):
        (corpus / f"{i}.txt").write_text(t)
    assert main(["tokenizer", "train", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    t = load_tokenizer(str(tmp_path / "tok"))
    assert t.token_to_id("<|eos|>") == 1
