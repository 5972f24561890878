import json
import os
import sysconfig

import numpy as np
import pytest
import torch

from stepflash.errors import UserError
from stepflash.tokenizer import load_tokenizer, train_tokenizer
from stepflash.training import data as data_mod
from stepflash.training.data import (BatchSampler, PrepareArgs, TokenShards, builtin_corpus_files, iter_documents,
                                     prepare, validation_batches)

DOCS = [f"doc {i}: " + " ".join(f"word{(i * 7 + j) % 13}" for j in range(20 + i % 5)) + "\n" for i in range(23)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(DOCS):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"{i:02d}.txt").write_text(text)
    (root / "b" / "blob.bin").write_bytes(b"\0\1\2binary")  # skipped: not text
    tok_dir = tmp_path_factory.mktemp("tok")
    train_tokenizer(DOCS, 300, str(tok_dir))
    return root, str(tok_dir)


def _args(src, out, tok, **kw):
    return PrepareArgs(input=str(src), out=str(out), tokenizer=tok, val_fraction=0.2, docs_per_shard=5,
                       progress=False, **kw)


def _tree_bytes(path) -> dict:
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


def _doc_order(root) -> list[str]:
    """The documented order: files sorted by relative path."""
    files = sorted((p for p in root.rglob("*.txt")), key=lambda p: str(p.relative_to(root)))
    return [p.read_text() for p in files]


def test_shards_hold_every_document_followed_by_eos(corpus, tmp_path):
    root, tok_dir = corpus
    meta = prepare(_args(root, tmp_path / "d", tok_dir))
    tok = load_tokenizer(tok_dir)
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.token_to_id("<|eos|>") == 1
    ordered = _doc_order(root)
    assert meta["num_docs"] == len(ordered) == 23 and len(meta["shards"]) == 5
    train, val = [], []
    for s in meta["shards"]:
        for split, dst in (("train", train), ("val", val)):
            arr = np.fromfile(tmp_path / "d" / "shards" / s[f"{split}_file"], dtype=np.uint16)
            assert arr.size == s[f"{split}_tokens"]
            dst += arr.tolist()

    def split_docs(ids):
        docs, cur = [], []
        for i in ids:
            if i == 1:
                docs.append(tok.decode(cur))
                cur = []
            else:
                cur.append(i)
        assert not cur  # the stream ends with EOS
        return docs

    period = 5  # round(1 / 0.2)
    assert split_docs(val) == [d for i, d in enumerate(ordered) if i % period == period - 1]
    assert split_docs(train) == [d for i, d in enumerate(ordered) if i % period != period - 1]


def test_prepare_is_deterministic_and_resumable(corpus, tmp_path, monkeypatch):
    root, tok_dir = corpus
    prepare(_args(root, tmp_path / "one", tok_dir))
    prepare(_args(root, tmp_path / "two", tok_dir))
    reference = _tree_bytes(tmp_path / "one")
    assert reference == _tree_bytes(tmp_path / "two")

    # Simulate a crash after shard 1: shards 2.. never finished, no meta.json, a stray temp file.
    d = tmp_path / "two"
    for k in (2, 3, 4):
        os.remove(d / "shards" / f"shard-{k:05d}.json")
    os.remove(d / "shards" / "train-00003.bin")
    os.remove(d / "meta.json")
    (d / "shards" / "train-00002.bin.tmp").write_bytes(b"partial")
    written = []
    real = data_mod._write_shard
    monkeypatch.setattr(data_mod, "_write_shard", lambda out, k, *a: written.append(k) or real(out, k, *a))
    prepare(_args(root, d, tok_dir))
    assert written == [2, 3, 4]  # finished shards were skipped
    after = _tree_bytes(d)
    after.pop("shards/train-00002.bin.tmp", None)
    assert after == reference


def test_resume_with_other_settings_is_refused(corpus, tmp_path):
    root, tok_dir = corpus
    prepare(_args(root, tmp_path / "d", tok_dir))
    with pytest.raises(UserError, match="other settings"):
        prepare(PrepareArgs(input=str(root), out=str(tmp_path / "d"), tokenizer=tok_dir, val_fraction=0.5,
                            docs_per_shard=5, progress=False))


def test_trains_a_tokenizer_when_none_is_given(corpus, tmp_path):
    root, _ = corpus
    meta = prepare(PrepareArgs(input=str(root), out=str(tmp_path / "d"), vocab_size=280, val_fraction=0.2,
                               progress=False))
    tok = load_tokenizer(str(tmp_path / "d"))
    assert meta["vocab_size"] == tok.get_vocab_size() <= 280 and tok.token_to_id("<|bos|>") == 0


def test_jsonl_and_parquet_inputs(tmp_path, corpus):
    _, tok_dir = corpus
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(DOCS)) + "\n")
    got = [t for _, t in iter_documents(str(jl), "body")]
    assert got == DOCS
    with pytest.raises(UserError, match="no field 'text'"):
        list(iter_documents(str(jl)))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pqf = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": DOCS, "n": list(range(len(DOCS)))}), pqf)
    assert [t for _, t in iter_documents(str(pqf), "content")] == DOCS
    with pytest.raises(UserError, match="no column"):
        list(iter_documents(str(pqf), "text"))
    meta = prepare(PrepareArgs(input=str(pqf), out=str(tmp_path / "p"), tokenizer=tok_dir, field_name="content",
                               val_fraction=0.2, progress=False))
    assert meta["num_docs"] == len(DOCS)
    assert list(iter_documents(str(jl), "body", max_docs=3)) == list(iter_documents(str(jl), "body"))[:3]


def test_token_dtype_widens_for_large_vocabularies():
    assert data_mod._dtype_for(65535) == np.uint16
    assert data_mod._dtype_for(65536) == np.uint32
    assert data_mod._dtype_for(128896) == np.uint32


def test_builtin_corpus_is_the_stdlib_sources():
    files = builtin_corpus_files()
    root = sysconfig.get_paths()["stdlib"]
    rel = [os.path.relpath(f, root) for f in files]
    assert "os.py" in rel and "json/decoder.py" in rel
    assert rel == sorted(rel) and all(f.endswith(".py") for f in rel)
    assert not any("site-packages" in r for r in rel)


def test_batches_are_windows_of_the_stream_and_resume_exactly(corpus, tmp_path):
    root, tok_dir = corpus
    prepare(_args(root, tmp_path / "d", tok_dir))
    shards = TokenShards(str(tmp_path / "d"), "train", window=9)
    stream = np.concatenate([np.asarray(a, dtype=np.int64) for a in shards.arrays])
    sampler = BatchSampler(shards, batch_size=4, seed=3)
    # Every row is a contiguous slice of one shard.
    for row in sampler.next_batch().tolist():
        hits = [i for i in range(len(stream) - 8) if stream[i: i + 9].tolist() == row]
        assert hits
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(50)]  # crosses several epochs
    again = BatchSampler(shards, batch_size=4, seed=3)
    again.load_state_dict(state)
    for want in expected:
        torch.testing.assert_close(again.next_batch(), want, rtol=0, atol=0)
    assert again.epoch > 0


def test_ranks_split_the_global_batch(corpus, tmp_path):
    root, tok_dir = corpus
    prepare(_args(root, tmp_path / "d", tok_dir))
    shards = TokenShards(str(tmp_path / "d"), "train", window=9)
    single = BatchSampler(shards, batch_size=6, seed=1)
    ranks = [BatchSampler(shards, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        torch.testing.assert_close(torch.cat([s.next_batch() for s in ranks]), single.next_batch(), rtol=0, atol=0)


def test_validation_batches_are_fixed(corpus, tmp_path):
    root, tok_dir = corpus
    prepare(_args(root, tmp_path / "d", tok_dir))
    shards = TokenShards(str(tmp_path / "d"), "val", window=5)
    a, b = validation_batches(shards, 2, 3), validation_batches(shards, 2, 3)
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(UserError, match="fewer than one window"):
        TokenShards(str(tmp_path / "d"), "val", window=10**6)
