"""Pre-training data: text -> memory-mapped token shards, and deterministic batches from them.

`stepflash data prepare [INPUT] --out DIR` reads documents from a directory of text files, a `.jsonl`
file (one JSON object per line, text under `--field-name`) or a `.parquet` file (column `--field-name`);
with no input it uses the running interpreter's standard library (*.py under
`sysconfig.get_paths()["stdlib"]`, site-packages excluded, sorted), which needs no download.

Layout of DIR:
  tokenizer.json, tokenizer_config.json   the tokenizer used (given, or trained on the input)
  prepare.json                            the settings; a resumed run must match them
  shards/{train,val}-00007.bin            raw token ids (uint16 when the vocab fits, else uint32)
  shards/shard-00007.json                 written last for a shard: its token counts (= "done")
  meta.json                               the summary a trainer reads (written when every shard is done)

Shard k holds documents k*D .. (k+1)*D-1 (D = --docs-per-shard) in input order, each followed by the
EOS token. Document i goes to validation when i % P == P - 1 (P = round(1 / val_fraction)), so the split
does not depend on sharding. Every file is written under a temporary name and renamed: an interrupted
run resumes by skipping shards whose marker exists, and produces byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from stepflash.errors import UserError

FORMAT_VERSION = 1
BUILTIN = "python-stdlib"


# ---- reading documents -------------------------------------------------------------------------

def builtin_corpus_files() -> list[str]:
    """The standard library's *.py files, sorted by path relative to the stdlib root."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out, key=lambda p: os.path.relpath(p, root))


def _is_binary(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _jsonl_docs(path: str, field_name: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n + 1} is not valid JSON: {e}")
            if not isinstance(obj, dict) or field_name not in obj:
                raise UserError(f"{path} line {n + 1} has no field {field_name!r} (choose one with --field-name)")
            yield f"{path}:{n}", str(obj[field_name])


def _parquet_docs(path: str, field_name: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field_name not in pf.schema_arrow.names:
        raise UserError(f"{path} has no column {field_name!r} (columns: {', '.join(pf.schema_arrow.names)})")
    n = 0
    for batch in pf.iter_batches(columns=[field_name], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield f"{path}:{n}", str(text)
            n += 1


def _file_docs(path: str, field_name: str) -> Iterator[tuple[str, str]]:
    if path.endswith(".jsonl"):
        yield from _jsonl_docs(path, field_name)
    elif path.endswith(".parquet"):
        yield from _parquet_docs(path, field_name)
    elif not _is_binary(path):
        yield path, _read_text(path)


def iter_documents(source: str | None, field_name: str = "text", max_docs: int = 0) -> Iterator[tuple[str, str]]:
    """(key, text) of every document of `source` in a fixed order; None means the built-in corpus."""
    if source is None or source == BUILTIN:
        files = builtin_corpus_files()
    elif os.path.isdir(source):
        files = []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
        files.sort(key=lambda p: os.path.relpath(p, source))
    elif os.path.isfile(source):
        files = [source]
    else:
        raise UserError(f"input {source} is neither a directory nor a file")
    n = 0
    for path in files:
        for key, text in _file_docs(path, field_name):
            if not text:
                continue
            yield key, text
            n += 1
            if max_docs and n >= max_docs:
                return


# ---- preparing shards --------------------------------------------------------------------------

@dataclass
class PrepareArgs:
    """Tokenize a text corpus into memory-mapped token shards with a held-out validation split."""

    input: str | None = field(default=None, metadata={
        "positional": True, "help": "directory of text files, .jsonl or .parquet (default: the Python standard library)"})
    out: str = field(default="data", metadata={"help": "output directory"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer.json or checkpoint dir to use; default: train one on the input (--vocab-size)"})
    vocab_size: int = field(default=8192, metadata={"help": "vocab size of a tokenizer trained on the input"})
    field_name: str = field(default="text", metadata={"help": "JSON field / parquet column holding the text"})
    val_fraction: float = field(default=0.01, metadata={"help": "fraction of documents held out for validation"})
    docs_per_shard: int = field(default=256, metadata={"help": "documents per shard (the unit of resumption)"})
    max_docs: int = field(default=0, metadata={"help": "use only the first N documents (0: all)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _write_json(path: str, obj) -> None:
    _write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _file_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _ensure_tokenizer(args: PrepareArgs):
    """The tokenizer for this data dir: the given one, one already there (resume), or a new one."""
    from stepflash.tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer, train_tokenizer

    here = os.path.join(args.out, TOKENIZER_FILE)
    if args.tokenizer is not None:
        save_tokenizer(args.tokenizer, args.out)
    elif not os.path.isfile(here):
        docs = (text for _, text in iter_documents(args.input, args.field_name, args.max_docs))
        train_tokenizer(docs, args.vocab_size, args.out, show_progress=args.progress)
    return load_tokenizer(here)


def prepare(args: PrepareArgs) -> dict:
    """Run (or resume) a prepare; returns the meta.json contents."""
    from stepflash.tokenizer import EOS

    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.docs_per_shard <= 0:
        raise UserError(f"--docs-per-shard must be positive, got {args.docs_per_shard}")
    os.makedirs(os.path.join(args.out, "shards"), exist_ok=True)
    tok = _ensure_tokenizer(args)
    eos_id = tok.token_to_id(EOS)
    if eos_id is None:
        raise UserError(f"the tokenizer has no {EOS} token to separate documents")
    vocab_size = tok.get_vocab_size()
    dtype = _dtype_for(vocab_size)
    period = max(2, round(1 / args.val_fraction))
    recipe = {"version": FORMAT_VERSION, "source": args.input or BUILTIN, "field_name": args.field_name,
              "val_period": period, "docs_per_shard": args.docs_per_shard, "max_docs": args.max_docs,
              "tokenizer_sha256": _file_sha(os.path.join(args.out, "tokenizer.json"))}
    recipe_path = os.path.join(args.out, "prepare.json")
    if os.path.isfile(recipe_path):
        with open(recipe_path) as f:
            old = json.load(f)
        if old != recipe:
            raise UserError(f"{args.out} holds data prepared with other settings ({recipe_path}); use a new --out")
    else:
        _write_json(recipe_path, recipe)

    shards: list[dict] = []
    pending: list[tuple[int, str]] = []
    bar = tqdm(desc="tokenizing", unit="doc", disable=not args.progress)

    def flush(k: int):
        marker = os.path.join(args.out, "shards", f"shard-{k:05d}.json")
        if os.path.isfile(marker):  # done by an earlier run
            with open(marker) as f:
                shards.append(json.load(f))
        else:
            shards.append(_write_shard(args.out, k, pending, tok, eos_id, dtype, period))
        bar.update(len(pending))
        pending.clear()

    for i, (_, text) in enumerate(iter_documents(args.input, args.field_name, args.max_docs)):
        pending.append((i, text))
        if len(pending) == args.docs_per_shard:
            flush(i // args.docs_per_shard)
    if pending:
        flush(pending[0][0] // args.docs_per_shard)
    bar.close()
    if not shards:
        raise UserError(f"no documents found in {args.input or BUILTIN}")
    meta = {"version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab_size, "eos_token": EOS,
            "eos_id": eos_id, "source": recipe["source"], "num_docs": sum(s["docs"] for s in shards),
            "train_tokens": sum(s["train_tokens"] for s in shards),
            "val_tokens": sum(s["val_tokens"] for s in shards), "shards": shards}
    if meta["val_tokens"] == 0:
        raise UserError(f"the validation split is empty ({meta['num_docs']} documents, one in {period} held out); "
                        "raise --val-fraction or add documents")
    _write_json(os.path.join(args.out, "meta.json"), meta)
    return meta


def _write_shard(out: str, k: int, docs: list[tuple[int, str]], tok, eos_id: int, dtype, period: int) -> dict:
    encodings = tok.encode_batch([text for _, text in docs], add_special_tokens=False)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for (i, _), enc in zip(docs, encodings):
        split = "val" if i % period == period - 1 else "train"
        parts[split].append(np.asarray(enc.ids + [eos_id], dtype=dtype))
    info = {"index": k, "docs": len(docs)}
    for split, arrays in parts.items():
        name = f"{split}-{k:05d}.bin"
        data = np.concatenate(arrays) if arrays else np.zeros(0, dtype)
        _write_atomic(os.path.join(out, "shards", name), data.tobytes())
        info[f"{split}_file"], info[f"{split}_tokens"] = name, int(data.size)
    _write_json(os.path.join(out, "shards", f"shard-{k:05d}.json"), info)
    return info


def run(args: PrepareArgs) -> int:
    meta = prepare(args)
    print(f"{meta['num_docs']} documents -> {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']}) in {args.out}")
    return 0


# ---- reading batches ---------------------------------------------------------------------------

class TokenShards:
    """One split of a prepared directory as memory-mapped arrays, cut into non-overlapping windows."""

    def __init__(self, data_dir: str, split: str, window: int):
        path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(path):
            raise UserError(f"{data_dir} is not a prepared data directory (no meta.json; run `stepflash data prepare`)")
        with open(path) as f:
            self.meta = json.load(f)
        self.window = window
        dtype = np.dtype(self.meta["dtype"])
        self.arrays = [np.memmap(os.path.join(data_dir, "shards", s[f"{split}_file"]), dtype=dtype, mode="r")
                       for s in self.meta["shards"] if s[f"{split}_tokens"] > 0]
        counts = [len(a) // window for a in self.arrays]
        self.num_windows = sum(counts)
        if self.num_windows == 0:
            raise UserError(f"the {split} split of {data_dir} has {sum(len(a) for a in self.arrays)} tokens, "
                            f"fewer than one window of {window}")
        self._starts = np.cumsum([0] + counts)  # window index where each shard begins

    @property
    def num_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    def get(self, indices) -> torch.Tensor:
        """Window indices -> int64 tokens [len(indices), window]."""
        rows = []
        for w in indices:
            s = int(np.searchsorted(self._starts, w, side="right") - 1)
            off = (int(w) - int(self._starts[s])) * self.window
            rows.append(np.asarray(self.arrays[s][off: off + self.window], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


class BatchSampler:
    """Shuffled windows, a fresh permutation each epoch; the state is (epoch, cursor), so resuming is exact.

    `batch_size` is per rank. Each step consumes batch_size * world_size windows; rank r takes its own
    contiguous slice of them, so ranks never see the same window and a sharded run covers what a single
    process would: the training loop passes its global batch / world size, so the windows of a step (and
    the sampler state, which is the same on every rank) do not depend on the world size."""

    def __init__(self, shards: TokenShards, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.shards.num_windows, generator=g)

    def next_batch(self) -> torch.Tensor:
        """Tokens [batch_size, window] for this rank."""
        need, picked = self.batch_size * self.world_size, []
        while need:
            if self.cursor == len(self._perm):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(need, len(self._perm) - self.cursor)
            picked.append(self._perm[self.cursor: self.cursor + take])
            self.cursor += take
            need -= take
        mine = torch.cat(picked)[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
        return self.shards.get(mine.tolist())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._perm = self._permutation(self.epoch)


def validation_batches(shards: TokenShards, batch_size: int, max_batches: int, rank: int = 0,
                       world_size: int = 1) -> list[torch.Tensor]:
    """The same windows every time: evenly spread over the split, this rank's share of them.

    With several ranks only whole global batches are used (windows repeat when the split is smaller than
    one): every rank then runs the same number of forwards (FSDP's are collective), and the mean over
    ranks equals the mean over the global batches."""
    n = min(shards.num_windows, batch_size * max_batches * world_size)
    if world_size > 1:
        n = max(1, n // (batch_size * world_size)) * batch_size * world_size
    idx = np.linspace(0, shards.num_windows - 1, n).round().astype(int)[rank::world_size]
    return [shards.get(idx[i: i + batch_size]) for i in range(0, len(idx), batch_size)]


# ---- the training loop's data ---------------------------------------------------------------

def cache_dir() -> str:
    return os.environ.get("STEPFLASH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stepflash")


def default_data_dir(vocab_size: int, progress: bool = True, rt=None) -> str:
    """The built-in corpus tokenized with a tokenizer of `vocab_size`, prepared once and cached. `rt` (the
    training run's Runtime): only the main rank prepares, the others wait for it."""
    is_main = rt is None or rt.is_main
    name = f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib-v{vocab_size}"
    path = os.path.join(cache_dir(), "data", name)
    if is_main and not os.path.isfile(os.path.join(path, "meta.json")):
        print(f"preparing the built-in corpus (Python standard library) in {path} (once)", file=sys.stderr)
        prepare(PrepareArgs(input=None, out=path, vocab_size=vocab_size, progress=progress))
    if rt is not None:
        rt.barrier()
    return path


def open_training_data(args, vocab_size: int, rt=None) -> tuple[TokenShards, TokenShards, str | None]:
    """Train and validation windows of the data dir (the built-in corpus by default), and its tokenizer.json."""
    data_dir = args.data or default_data_dir(vocab_size, args.progress, rt)
    train_data = TokenShards(data_dir, "train", args.seq_len + 1)
    if train_data.meta["vocab_size"] > vocab_size:
        raise UserError(f"the data's tokenizer has {train_data.meta['vocab_size']} tokens but the model's vocab is "
                        f"{vocab_size}; prepare the data with --vocab-size {vocab_size} or less")
    tokenizer = os.path.join(data_dir, "tokenizer.json")
    return train_data, TokenShards(data_dir, "val", args.seq_len + 1), tokenizer if os.path.isfile(tokenizer) else None
