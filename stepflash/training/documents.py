"""Documents of a pre-training corpus, in a fixed order, with every bad record reported in one line.

Inputs: a directory of text files (walked in sorted order, hidden entries and binary files skipped), a
`.jsonl` file (one JSON object per line, the text under `field_name`), a `.parquet` file (string column
`field_name`), or None for the built-in corpus: the running interpreter's standard library (*.py under
`sysconfig.get_paths()["stdlib"]`, site-packages excluded, sorted), which needs no download.

A bad record is a JSONL line that is not UTF-8 or not JSON or has no string under `field_name`, a null
in the Parquet column, or a text file that is not UTF-8. `BadRecords` decides what happens to one: stop
with a one-line `UserError` naming the file, line and byte offset (the default), or count it and go on
(`--skip-bad-records`). The standard library holds a few files written in other encodings on purpose
(tests of source encodings); the built-in corpus skips them.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator

from stepflash.errors import UserError

BUILTIN = "python-stdlib"


class BadRecords:
    """What to do with a record that is not a document: stop with one line, or (skip=True) count it."""

    def __init__(self, skip: bool = False):
        self.skip, self.count, self.first = skip, 0, None

    def __call__(self, message: str) -> None:
        if not self.skip:
            raise UserError(f"{message} (--skip-bad-records skips such records)")
        self.count += 1
        self.first = self.first or message


def builtin_corpus_files() -> list[str]:
    """The standard library's *.py files, sorted by path relative to the stdlib root."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out, key=lambda p: os.path.relpath(p, root))


def _not_utf8(path: str, data: bytes, err: UnicodeDecodeError, base: int = 0, line: int | None = None) -> str:
    line = data[: err.start].count(b"\n") + 1 if line is None else line
    return f"{path} line {line}, byte {base + err.start}: not valid UTF-8 ({data[err.start:err.start + 4]!r}...)"


def _text_file_docs(path: str, bad: BadRecords) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data[:8192]:
        return  # binary, not text
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad(_not_utf8(path, data, e))
        return
    yield path, text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() in text mode


def _describe(value) -> str:
    return "null" if value is None else type(value).__name__


def _jsonl_docs(path: str, field_name: str, bad: BadRecords) -> Iterator[tuple[str, str]]:
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            base, offset = offset, offset + len(raw)
            where = f"{path} line {n + 1}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(_not_utf8(path, raw, e, base, n + 1))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad(f"{where} is not valid JSON: {e}")
                continue
            if not isinstance(obj, dict):
                bad(f"{where} is a JSON {_describe(obj)}, not an object with a string field {field_name!r}")
            elif field_name not in obj:
                bad(f"{where} has no field {field_name!r} (fields: {', '.join(map(str, obj)) or 'none'}; "
                    "choose one with --field-name)")
            elif not isinstance(obj[field_name], str):
                bad(f"{where}: field {field_name!r} is {_describe(obj[field_name])}, not a string")
            else:
                yield f"{path}:{n}", obj[field_name]


def _parquet_docs(path: str, field_name: str, bad: BadRecords) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file: {str(e).splitlines()[0]}") from None
    schema = pf.schema_arrow
    if field_name not in schema.names:
        raise UserError(f"{path} has no column {field_name!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(field_name).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {field_name!r} holds {kind}, not strings")
    n = 0
    for batch in pf.iter_batches(columns=[field_name], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                bad(f"{path} row {n}: {field_name!r} is null")
            else:
                yield f"{path}:{n}", text
            n += 1


def _file_docs(path: str, field_name: str, bad: BadRecords) -> Iterator[tuple[str, str]]:
    if path.endswith(".jsonl"):
        yield from _jsonl_docs(path, field_name, bad)
    elif path.endswith(".parquet"):
        yield from _parquet_docs(path, field_name, bad)
    else:
        yield from _text_file_docs(path, bad)


def input_files(source: str | None) -> list[str]:
    """The files of `source` in document order; a one-line error when it does not exist."""
    if source is None or source == BUILTIN:
        return builtin_corpus_files()
    if os.path.isdir(source):
        files = []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
        return sorted(files, key=lambda p: os.path.relpath(p, source))
    if os.path.isfile(source):
        return [source]
    raise UserError(f"input {source} does not exist" if not os.path.exists(source)
                    else f"input {source} is neither a directory nor a regular file")


def iter_documents(source: str | None, field_name: str = "text", max_docs: int = 0,
                   bad: BadRecords | None = None) -> Iterator[tuple[str, str]]:
    """(key, text) of every non-empty document of `source` in a fixed order; None means the built-in corpus.
    `bad` handles bad records (default: stop at the first; the built-in corpus skips them)."""
    files = input_files(source)
    bad = bad or BadRecords(skip=source in (None, BUILTIN))
    n = 0
    for path in files:
        for key, text in _file_docs(path, field_name, bad):
            if not text:
                continue
            yield key, text
            n += 1
            if max_docs and n >= max_docs:
                return
