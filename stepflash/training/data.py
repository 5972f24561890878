"""Pre-training data: text -> memory-mapped token shards, and deterministic batches from them.

`stepflash data prepare [INPUT] --out DIR` reads the documents of a directory of text files, a `.jsonl`
or a `.parquet` file, or by default the running interpreter's standard library (`documents.py`).

It first reads the whole input once and writes nothing until the input is known to be good: a bad
record (not UTF-8, not JSON, no string text field) stops it with one line naming the file, line and
byte offset, unless `--skip-bad-records` counts and skips such records. The document count found then
sets the validation split (below) and the progress bar's length. Everything is written into
`.DIR.partial` beside DIR, which is renamed to DIR when complete: a failed run leaves no DIR. An
interrupted run (Ctrl-C, a crash) leaves the partial directory, and the same command resumes it by
skipping shards whose marker exists (other settings discard it); the output is byte-identical.

Layout of DIR:
  tokenizer.json, tokenizer_config.json   the tokenizer used (given, or trained on the input)
  prepare.json                            the settings; running again with other settings is refused
  shards/{train,val}-00007.bin            raw token ids (uint16 when the vocab fits, else uint32)
  shards/shard-00007.json                 written last for a shard: its token counts (= "done")
  meta.json                               the summary a trainer reads (written when every shard is done)

Shard k holds documents k*D .. (k+1)*D-1 (D = --docs-per-shard) in input order, each followed by the
EOS token. Document i goes to validation when i % P == P - 1, so the split does not depend on sharding;
P = round(1 / val_fraction), or the document count when that is smaller, so that a small input still
holds out one document (`val_period`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from stepflash.errors import UserError
from stepflash.training.documents import BUILTIN, BadRecords, builtin_corpus_files, iter_documents  # noqa: F401

FORMAT_VERSION = 1


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
    val_fraction: float = field(default=0.01, metadata={
        "help": "fraction of documents held out for validation (at least one document is)"})
    docs_per_shard: int = field(default=256, metadata={"help": "documents per shard (the unit of resumption)"})
    max_docs: int = field(default=0, metadata={"help": "use only the first N documents (0: all)"})
    skip_bad_records: bool = field(default=False, metadata={
        "help": "skip records that are not UTF-8, not JSON or have no string text field, and count them "
                "(default: stop at the first with one line saying where it is)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _write_json(path: str, obj) -> None:
    _write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _file_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _settings(args: PrepareArgs) -> dict:
    """What decides the output, checked before anything is read: a run with other settings never mixes in."""
    from stepflash.tokenizer import tokenizer_path

    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.docs_per_shard <= 0:
        raise UserError(f"--docs-per-shard must be positive, got {args.docs_per_shard}")
    if args.max_docs < 0:
        raise UserError(f"--max-docs must be >= 0, got {args.max_docs}")
    given = None
    if args.tokenizer is not None:
        path = tokenizer_path(args.tokenizer)
        if not os.path.isfile(path):
            raise UserError(f"--tokenizer: no tokenizer.json at {path}")
        given = _file_sha(path)
    return {"version": FORMAT_VERSION, "source": args.input or BUILTIN, "field_name": args.field_name,
            "val_fraction": args.val_fraction, "docs_per_shard": args.docs_per_shard, "max_docs": args.max_docs,
            "skip_bad_records": args.skip_bad_records, "given_tokenizer_sha256": given,
            "vocab_size": None if given else args.vocab_size}


def _matches(recipe: dict, settings: dict) -> bool:
    return {k: recipe.get(k) for k in settings} == settings


def _finished(out: str, settings: dict) -> dict | None:
    """meta.json of a finished prepare of `out` with these settings; None when `out` is free to write to."""
    if not os.path.exists(out):
        return None
    if not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory")
    if not os.listdir(out):
        return None
    recipe_path, meta_path = os.path.join(out, "prepare.json"), os.path.join(out, "meta.json")
    if not (os.path.isfile(recipe_path) and os.path.isfile(meta_path)):
        raise UserError(f"--out {out} exists and is not a prepared data directory; choose a new --out")
    if not _matches(_read_json(recipe_path), settings):
        raise UserError(f"{out} holds data prepared with other settings ({recipe_path}); use a new --out")
    return _read_json(meta_path)


def val_period(num_docs: int, val_fraction: float) -> int:
    """Document i is held out when i % period == period - 1: about `val_fraction` of them, at least one."""
    if num_docs < 2:
        raise UserError(f"the input holds {num_docs} document{'' if num_docs == 1 else 's'}; a validation split "
                        "needs at least 2 (split the text into several files or records)")
    return min(max(2, round(1 / val_fraction)), num_docs)


def _count_documents(args: PrepareArgs, bad: BadRecords) -> int:
    """Read the whole input once, writing nothing: bad records stop here (or are counted)."""
    n = 0
    with tqdm(desc="checking input", unit="doc", disable=not args.progress) as bar:
        for _ in iter_documents(args.input, args.field_name, args.max_docs, bad):
            n += 1
            bar.update()
    if n == 0:
        raise UserError(f"no documents found in {args.input or BUILTIN}")
    return n


def partial_dir(out: str) -> str:
    """Where a prepare of `out` is written until it is complete."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")


def prepare(args: PrepareArgs) -> dict:
    """Run (or resume) a prepare; returns the meta.json contents (with `val_period` and `skipped_records`)."""
    from stepflash.checkpoint.run import replace_dir

    settings = _settings(args)
    done = _finished(args.out, settings)
    if done is not None:
        print(f"{args.out} already holds this data prepared with these settings", file=sys.stderr)
        return done
    bad = BadRecords(skip=args.skip_bad_records or args.input in (None, BUILTIN))
    num_docs = _count_documents(args, bad)
    if bad.count and args.input not in (None, BUILTIN):
        print(f"skipping {bad.count} bad records (the first: {bad.first})", file=sys.stderr)
    period = val_period(num_docs, args.val_fraction)
    work = partial_dir(args.out)
    try:
        meta = _prepare_into(work, args, {**settings, "val_period": period}, num_docs)
    except UserError:
        shutil.rmtree(work, ignore_errors=True)  # the input must change: nothing worth resuming
        raise
    meta.update(skipped_records=bad.count, first_skipped_record=bad.first)
    _write_json(os.path.join(work, "meta.json"), meta)
    replace_dir(work, os.path.abspath(args.out))  # `out` is absent or empty here
    return meta


def _open_partial(work: str, recipe: dict) -> None:
    """Resume an unfinished prepare with the same settings in `work`, or start it afresh."""
    path = os.path.join(work, "prepare.json")
    if os.path.isdir(work):
        if os.path.isfile(path) and _matches(_read_json(path), recipe):
            print(f"resuming the unfinished prepare in {work}", file=sys.stderr)
        else:
            print(f"discarding an unfinished prepare with other settings in {work}", file=sys.stderr)
            shutil.rmtree(work)
    os.makedirs(os.path.join(work, "shards"), exist_ok=True)


def _ensure_tokenizer(args: PrepareArgs, work: str):
    """The given tokenizer, the one an unfinished run trained, or one trained now on the input."""
    from stepflash.tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer, train_tokenizer

    here = os.path.join(work, TOKENIZER_FILE)
    if args.tokenizer is not None:
        save_tokenizer(args.tokenizer, work)
    elif not os.path.isfile(here):
        docs = (text for _, text in iter_documents(args.input, args.field_name, args.max_docs, BadRecords(True)))
        train_tokenizer(docs, args.vocab_size, work, show_progress=args.progress)
    return load_tokenizer(here)


def _prepare_into(work: str, args: PrepareArgs, recipe: dict, num_docs: int) -> dict:
    from stepflash.tokenizer import EOS

    _open_partial(work, recipe)
    tok = _ensure_tokenizer(args, work)
    eos_id = tok.token_to_id(EOS)
    if eos_id is None:
        raise UserError(f"the tokenizer has no {EOS} token to separate documents")
    vocab_size = tok.get_vocab_size()
    dtype = _dtype_for(vocab_size)
    _write_json(os.path.join(work, "prepare.json"),
                {**recipe, "tokenizer_sha256": _file_sha(os.path.join(work, "tokenizer.json"))})

    period, shards, pending = recipe["val_period"], [], []
    bar = tqdm(total=num_docs, desc="tokenizing", unit="doc", disable=not args.progress)

    def flush(k: int):
        marker = os.path.join(work, "shards", f"shard-{k:05d}.json")
        if os.path.isfile(marker):  # done by an earlier, interrupted run
            shards.append(_read_json(marker))
        else:
            shards.append(_write_shard(work, k, pending, tok, eos_id, dtype, period))
        bar.update(len(pending))
        pending.clear()

    docs = iter_documents(args.input, args.field_name, args.max_docs, BadRecords(skip=True))  # checked already
    for i, (_, text) in enumerate(docs):
        pending.append((i, text))
        if len(pending) == args.docs_per_shard:
            flush(i // args.docs_per_shard)
    if pending:
        flush(pending[0][0] // args.docs_per_shard)
    bar.close()
    found = sum(s["docs"] for s in shards)
    if found != num_docs:
        raise UserError(f"the input changed while it was being prepared ({num_docs} documents, then {found})")
    return {"version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab_size, "eos_token": EOS,
            "eos_id": eos_id, "source": recipe["source"], "num_docs": found, "val_period": period,
            "train_tokens": sum(s["train_tokens"] for s in shards),
            "val_tokens": sum(s["val_tokens"] for s in shards), "shards": shards}


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
    try:
        meta = prepare(args)
    except KeyboardInterrupt:
        if os.path.isdir(partial_dir(args.out)):
            print(f"the unfinished output in {partial_dir(args.out)} resumes when the same command runs again",
                  file=sys.stderr)
        raise
    period, n = meta.get("val_period"), meta["num_docs"]
    if period is not None:
        wanted = max(2, round(1 / args.val_fraction))
        why = f"; --val-fraction {args.val_fraction} would hold out none of {n}" if period < wanted else ""
        print(f"validation split: 1 document in {period} ({n // period} of {n}){why}")
    print(f"{n} documents -> {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
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
