"""`stepflash generate CHECKPOINT --prompt TEXT | --prompt-ids 1,2,3 [--mtp K] ...`

Loads a release-layout checkpoint, generates one continuation with the engine (optionally with MTP
self-speculative decoding), prints it, then one line of statistics. Text prompts are tokenized with
CHECKPOINT/tokenizer.json; token-id prompts need no tokenizer (the output is then printed as ids,
and also as text when a tokenizer is present).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from stepflash.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerateArgs:
    """Generate a continuation from a checkpoint (optionally with MTP self-speculative decoding)."""
    checkpoint: str = field(metadata={"positional": True, "help": "checkpoint directory (config.json + safetensors)"})
    prompt: str | None = field(default=None, metadata={"help": "prompt text (needs CHECKPOINT/tokenizer.json)"})
    prompt_ids: str | None = field(default=None, metadata={"help": "prompt as comma-separated token ids"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = off)"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})
    mtp: int = field(default=0, metadata={"help": "draft tokens per step from the MTP modules (0 = off, up to 3)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    compile: bool = field(default=False, metadata={"help": "decode with torch.compile (a first run compiles for a "
                                                           "minute or more; later runs reuse ~/.cache/stepflash)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default: as stored)"})


def _tokenizer(checkpoint: str, required: bool):
    path = os.path.join(checkpoint, "tokenizer.json")
    if not os.path.isfile(path):
        if required:
            raise UserError(f"--prompt needs a tokenizer, but {path} does not exist (use --prompt-ids instead)")
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def _prompt_ids(args: GenerateArgs, tokenizer) -> list[int]:
    if (args.prompt is None) == (args.prompt_ids is None):
        raise UserError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if args.prompt is not None:
        return tokenizer.encode(args.prompt).ids
    try:
        return [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}")


def run(args: GenerateArgs) -> int:
    from stepflash.checkpoint import load_model
    from stepflash.inference.engine import Engine

    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        raise UserError(f"no checkpoint at {args.checkpoint} (expected a directory with config.json)")
    if args.dtype is not None and args.dtype not in _DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(_DTYPES)}, got {args.dtype!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    tokenizer = _tokenizer(args.checkpoint, required=args.prompt is not None)
    ids = _prompt_ids(args, tokenizer)
    model = load_model(args.checkpoint, dtype=_DTYPES.get(args.dtype), device=args.device)
    engine = Engine(model, max_batch_size=1, compile=args.compile)
    if engine.compile_note:
        print(engine.compile_note)
    (result,) = engine.generate([ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, speculative_tokens=args.mtp)
    if tokenizer is not None:
        print(tokenizer.decode(result.token_ids, skip_special_tokens=False))
    if args.prompt_ids is not None:
        print(",".join(map(str, result.token_ids)))
    s = result.stats
    decode_rate = s["decode_tokens_per_s"]
    if engine.compile_seconds and decode_rate:  # prefill is eager: every compile happened while decoding
        decode_tokens = len(result.token_ids) - 1
        decode_rate = decode_tokens / max(decode_tokens / decode_rate - engine.compile_seconds, 1e-9)
    print(f"[{len(ids)} prompt + {len(result.token_ids)} new tokens, finish={result.finish_reason}] "
          f"prefill {s['prefill_tokens_per_s']:.1f} tok/s | decode {decode_rate:.1f} tok/s | "
          f"mean accepted {s['mean_accepted']:.2f} (+1 per step)"
          + (f" | compiled in {engine.compile_seconds:.1f} s (not counted in the decode rate)"
             if engine.compile_seconds else ""))
    return 0
