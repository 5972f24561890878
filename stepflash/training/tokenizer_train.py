"""`stepflash tokenizer train`: a byte-level BPE with the chat special tokens, trained on a corpus.

The verb composes the corpus reader of `data prepare` (`training/documents.py`: the same inputs, the same
one-line errors for bad records, `--skip-bad-records`) with `stepflash.tokenizer.train_tokenizer`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from stepflash.tokenizer import TOKENIZER_FILE, train_tokenizer
from stepflash.training.documents import BUILTIN, BadRecords, input_files, iter_documents


@dataclass
class TrainTokenizerArgs:
    """Train a byte-level BPE (special tokens at ids 0..10) on a text corpus."""

    input: str | None = field(default=None, metadata={
        "positional": True, "help": "directory of text files, .jsonl or .parquet (default: the Python standard library)"})
    out: str = field(default="tokenizer", metadata={"help": "output directory for tokenizer.json"})
    vocab_size: int = field(default=8192, metadata={"help": "vocabulary size including the special tokens"})
    field_name: str = field(default="text", metadata={"help": "JSON field / parquet column holding the text"})
    max_docs: int = field(default=0, metadata={"help": "use only the first N documents (0: all)"})
    skip_bad_records: bool = field(default=False, metadata={
        "help": "skip records that are not documents (undecodable bytes, no string text field) and count them"})


def run(args: TrainTokenizerArgs) -> int:
    input_files(args.input)  # a missing input is one line before anything is trained
    bad = BadRecords(skip=args.skip_bad_records or args.input in (None, BUILTIN))
    docs = (text for _, text in iter_documents(args.input, args.field_name, args.max_docs, bad))
    # the tokenizers library's progress bars only make sense on a terminal (in a log they are blank lines)
    tok = train_tokenizer(docs, args.vocab_size, args.out, show_progress=sys.stderr.isatty())
    if bad.count:
        print(f"skipped {bad.count} bad records (first: {bad.first})")
    print(f"tokenizer with {tok.get_vocab_size()} tokens written to {os.path.join(args.out, TOKENIZER_FILE)}")
    return 0
