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
    reference = _tree_bytes(tmp_path / "one")
    assert reference == (prepare(_args(root, tmp_path / "two", tok_dir)) and _tree_bytes(tmp_path / "two"))

    # A crash while writing shard 2: no output directory, the finished shards kept aside for the retry.
    real = data_mod._write_shard

    def crash_at_2(out, k, *a):
        if k == 2:
            raise RuntimeError("killed")
        return real(out, k, *a)

    monkeypatch.setattr(data_mod, "_write_shard", crash_at_2)
    d = tmp_path / "three"
    with pytest.raises(RuntimeError):
        prepare(_args(root, d, tok_dir))
    assert not d.exists() and os.path.isfile(os.path.join(data_mod.partial_dir(str(d)), "shards", "shard-00001.json"))
    written = []
    monkeypatch.setattr(data_mod, "_write_shard", lambda out, k, *a: written.append(k) or real(out, k, *a))
    prepare(_args(root, d, tok_dir))
    assert written == [2, 3, 4]  # finished shards were skipped
    assert _tree_bytes(d) == reference and not os.path.exists(data_mod.partial_dir(str(d)))
    # Running a finished prepare again with the same settings writes nothing.
    prepare(_args(root, d, tok_dir))
    assert written == [2, 3, 4] and _tree_bytes(d) == reference


def test_unfinished_prepare_with_other_settings_is_discarded(corpus, tmp_path, monkeypatch):
    root, tok_dir = corpus
    monkeypatch.setattr(data_mod, "_write_shard", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        prepare(_args(root, tmp_path / "d", tok_dir))
    monkeypatch.undo()
    meta = prepare(PrepareArgs(input=str(root), out=str(tmp_path / "d"), tokenizer=tok_dir, val_fraction=0.5,
                               docs_per_shard=5, progress=False))
    assert meta["val_period"] == 2 and _tree_bytes(tmp_path / "d") == (
        prepare(PrepareArgs(input=str(root), out=str(tmp_path / "e"), tokenizer=tok_dir, val_fraction=0.5,
                            docs_per_shard=5, progress=False)) and _tree_bytes(tmp_path / "e"))


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


# ---- bad input: one line, nothing written ---------------------------------------------------------

def _nothing_written(out) -> bool:
    return not os.path.exists(out) and not os.path.exists(data_mod.partial_dir(str(out)))


def _jsonl(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


GOOD = [json.dumps({"text": d}).encode() for d in DOCS]


def test_missing_input_is_one_line_and_writes_nothing(tmp_path, corpus, capsys):
    from stepflash.cli import main

    out = tmp_path / "out"
    with pytest.raises(UserError, match="does not exist"):
        prepare(_args(tmp_path / "missing", out, corpus[1]))
    assert _nothing_written(out)
    assert main(["data", "prepare", str(tmp_path / "missing"), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"stepflash data prepare: error: input {tmp_path / 'missing'} does not exist"]
    assert _nothing_written(out)


def test_undecodable_bytes_name_file_line_and_byte(tmp_path, corpus, capsys):
    # line 1 is 15 bytes; on line 2 the byte 0xE9 (latin-1 e-acute) follows 13 bytes: file offset 28
    path = _jsonl(tmp_path / "latin1.jsonl", [b'{"text": "ok"}', b'{"text": "caf\xe9"}', *GOOD])
    assert len(b'{"text": "ok"}\n') == 15
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"latin1.jsonl line 2, byte 28: not valid UTF-8 .*--skip-bad-records"):
        prepare(_args(path, out, corpus[1]))
    assert _nothing_written(out)
    meta = prepare(_args(path, out, corpus[1], skip_bad_records=True))
    assert meta["skipped_records"] == 1 and meta["num_docs"] == len(DOCS) + 1
    assert "line 2, byte 28" in meta["first_skipped_record"]
    assert "skipping 1 bad records (the first: " in capsys.readouterr().err  # said before the long part starts

    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    (text_dir / "a.txt").write_text("fine\n")
    (text_dir / "b.txt").write_bytes(b"first line\nsecond \xff line\n")
    with pytest.raises(UserError, match=r"b.txt line 2, byte 18: not valid UTF-8"):
        prepare(_args(text_dir, tmp_path / "t", corpus[1]))
    assert _nothing_written(tmp_path / "t")


@pytest.mark.parametrize("record, why", [
    (b'{"text": null}', "field 'text' is null, not a string"),
    (b"12345", "is a JSON int, not an object"),
    (b'{"a": 1}', "has no field 'text'"),
    (b'{"text": ["x"]}', "field 'text' is list, not a string"),
    (b'{"text": "unterminated', "is not valid JSON"),
])
def test_records_without_a_string_text_are_refused_or_counted(tmp_path, corpus, record, why):
    path = _jsonl(tmp_path / "docs.jsonl", [*GOOD[:5], record, *GOOD[5:]])
    with pytest.raises(UserError, match=rf"docs.jsonl line 6.*{why}"):
        prepare(_args(path, tmp_path / "out", corpus[1]))
    assert _nothing_written(tmp_path / "out")
    meta = prepare(_args(path, tmp_path / "out", corpus[1], skip_bad_records=True))
    assert meta["skipped_records"] == 1 and meta["num_docs"] == len(DOCS)
    # Negative control: the same documents without the bad record give the same shards.
    clean = _jsonl(tmp_path / "clean.jsonl", GOOD)
    assert prepare(_args(clean, tmp_path / "clean", corpus[1]))["train_tokens"] == meta["train_tokens"]


def test_garbage_and_mistyped_parquet_are_one_line(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all\n" * 10)
    with pytest.raises(UserError, match="garbage.parquet is not a readable Parquet file") as e:
        prepare(_args(garbage, tmp_path / "out", corpus[1]))
    assert "\n" not in str(e.value) and _nothing_written(tmp_path / "out")

    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": list(range(5))}), numbers)
    with pytest.raises(UserError, match="column 'text' holds int64, not strings"):
        prepare(_args(numbers, tmp_path / "out", corpus[1]))

    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": DOCS[:3] + [None] + DOCS[3:]}), nulls)
    with pytest.raises(UserError, match="nulls.parquet row 3: 'text' is null"):
        prepare(_args(nulls, tmp_path / "out", corpus[1]))
    assert prepare(_args(nulls, tmp_path / "out", corpus[1], skip_bad_records=True))["num_docs"] == len(DOCS)


def test_small_inputs_get_a_validation_split_that_works(tmp_path, corpus, capsys):
    from stepflash.cli import main

    src = tmp_path / "three"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(DOCS[i])
    out = tmp_path / "out"
    assert main(["data", "prepare", str(src), "--out", str(out), "--tokenizer", corpus[1], "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "validation split: 1 document in 3 (1 of 3); --val-fraction 0.01 would hold out none of 3" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["val_period"] == 3 and meta["val_tokens"] > 0 and meta["train_tokens"] > meta["val_tokens"]
    assert data_mod.val_period(1000, 0.01) == 100 and data_mod.val_period(99, 0.01) == 99
    with pytest.raises(UserError, match="holds 1 document; a validation split needs at least 2"):
        data_mod.val_period(1, 0.01)


def test_out_that_is_not_a_data_directory_is_refused(tmp_path, corpus):
    root, tok_dir = corpus
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not a prepared data directory"):
        prepare(_args(root, busy, tok_dir))
    assert (busy / "notes.txt").read_text() == "mine" and os.listdir(busy) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare(_args(root, empty, tok_dir))["num_docs"] == len(DOCS)
