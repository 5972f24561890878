"""`stepflash convert SRC DST`: between a DCP training checkpoint and the release's safetensors layout, or
to one GGUF file for llama.cpp / Ollama / LM Studio when DST ends in `.gguf`.

The direction is read from SRC: a directory with DCP's `.metadata` becomes a safetensors checkpoint
(config.json + model.safetensors or shards with an index, loadable by `stepflash.load_model`, vLLM,
SGLang and transformers); a safetensors checkpoint becomes a DCP directory that `load_checkpoint`
can resume from at any world size (model only: the optimizer starts fresh). Optimizer state in a DCP
source is left behind. Tokenizer and other side files (tokenizer.json, generation_config.json, ...)
are copied along; config.json is rewritten from the config.

A DST ending in `.gguf` is written by `stepflash.checkpoint.gguf` from either kind of SRC, in the --dtype
asked (f32, f16, bf16 or q8_0; default: the checkpoint's own dtype); SRC must hold its tokenizer.json.
From safetensors it streams one tensor at a time.

Between DCP and safetensors it runs in one process and holds the whole model in CPU memory once (the 196B release in bf16 needs
about 400 GB); tensors keep their stored dtype unless --dtype is given (the router bias stays fp32).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from stepflash.checkpoint import INDEX_NAME, SINGLE_NAME, load_model, save_model
from stepflash.config import Step35Config
from stepflash.checkpoint.dcp import TRAIN_STATE, is_dcp_dir, save_checkpoint, single_process_quiet
from stepflash.errors import UserError
from stepflash.model import Step35ForCausalLM

_DTYPES = {"": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
_NOT_SIDE_FILES = {".metadata", "config.json", INDEX_NAME, TRAIN_STATE, "trainer_state.pt"}  # + `train`'s state


@dataclass
class ConvertArgs:
    """Convert a checkpoint between DCP (sharded training) and safetensors (the release layout)."""

    src: str = field(metadata={"positional": True, "help": "DCP directory or safetensors checkpoint directory"})
    dst: str = field(metadata={"positional": True, "help": "output directory (the other format), or a .gguf file"})
    dtype: str = field(default="", metadata={"help": "cast floating tensors: bfloat16, float16 or float32; for .gguf "
                                                       "also q8_0 (default: keep the stored dtypes)"})
    tokenizer_pre: str = field(default="", metadata={
        "help": ".gguf only: llama.cpp pre-tokenizer name for a tokenizer that is not GPT-2 byte-level (e.g. llama-bpe)"})
    max_shard_size: str = field(default="5GB", metadata={"help": "safetensors shard size when writing safetensors"})
    overwrite: bool = field(default=False, metadata={"help": "write into a non-empty DST"})


def _copy_side_files(src: str, dst: str) -> None:
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (os.path.isfile(path) and name not in _NOT_SIDE_FILES
                and not name.endswith((".safetensors", ".distcp", ".tmp"))):
            shutil.copy2(path, os.path.join(dst, name))


def dcp_to_model(src: str, dtype: torch.dtype | None = None) -> Step35ForCausalLM:
    """Build the model of SRC/config.json with the weights stored in the DCP directory SRC."""
    cfg = Step35Config.from_json(os.path.join(src, "config.json"))
    stored = FileSystemReader(src).read_metadata().state_dict_metadata
    with torch.device("meta"):
        model = Step35ForCausalLM(cfg)
    state = {}
    for name, t in model.state_dict().items():
        meta = stored.get(f"model.{name}")
        if not isinstance(meta, TensorStorageMetadata):
            raise UserError(f"DCP checkpoint {src} has no tensor model.{name}: it does not match its config.json")
        if tuple(meta.size) != tuple(t.shape):
            raise UserError(f"tensor {name}: DCP shape {list(meta.size)} but config.json expects {list(t.shape)}")
        state[name] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)  # stored dtype
    with single_process_quiet():
        dcp.load({"model": state}, checkpoint_id=src, no_dist=True)
    if dtype is not None:
        state = {k: v if k.endswith("router_bias") or not v.is_floating_point() else v.to(dtype)
                 for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model


_GGUF_DTYPE_NAMES = {"": "", "float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "bfloat16": "bf16"}


def to_gguf(args: ConvertArgs) -> int:
    from stepflash.checkpoint.gguf import export_gguf, safetensors_source

    if os.path.isdir(args.dst):
        raise UserError(f"{args.dst} is a directory; a .gguf destination is one file")
    if os.path.exists(args.dst) and not args.overwrite:
        raise UserError(f"{args.dst} exists (pass --overwrite to replace it)")
    cfg = Step35Config.from_json(args.src) if os.path.isfile(os.path.join(args.src, "config.json")) else None
    if cfg is None:
        raise UserError(f"{args.src} has no config.json")
    dtype = _GGUF_DTYPE_NAMES.get(args.dtype, args.dtype) or {"float32": "f32", "float16": "f16"}.get(cfg.torch_dtype, "bf16")
    if is_dcp_dir(args.src):
        state = dcp_to_model(args.src).state_dict()
        tensors = {k: (tuple(v.shape), lambda v=v: v) for k, v in state.items()}
    else:
        try:
            tensors = safetensors_source(args.src)
        except FileNotFoundError:
            raise UserError(f"{args.src} holds neither a DCP checkpoint (.metadata) nor safetensors weights") from None
    n = export_gguf(args.src, args.dst, dtype, tensors, cfg=cfg, tokenizer_pre=args.tokenizer_pre or None)
    print(f"wrote {args.dst} ({n} tensors, {dtype}, llama.cpp architecture step35, "
          f"{os.path.getsize(args.dst) / 2**20:.1f} MiB)")
    return 0


def run(args: ConvertArgs) -> int:
    if not os.path.isdir(args.src):
        raise UserError(f"source {args.src} is not a directory")
    if args.dst.endswith(".gguf"):
        return to_gguf(args)
    if args.dtype not in _DTYPES:
        raise UserError(f"--dtype {args.dtype!r} is not one of bfloat16, float16, float32 (q8_0 only for a .gguf DST)")
    dtype = _DTYPES[args.dtype]
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise UserError("source and destination are the same directory")
    if os.path.isdir(args.dst) and os.listdir(args.dst) and not args.overwrite:
        raise UserError(f"destination {args.dst} is not empty (pass --overwrite to write into it)")
    if is_dcp_dir(args.src):
        if not os.path.isfile(os.path.join(args.src, "config.json")):
            raise UserError(f"DCP checkpoint {args.src} has no config.json to rebuild the model from")
        model = dcp_to_model(args.src, dtype)
        tok = args.src if os.path.isfile(os.path.join(args.src, "tokenizer.json")) else None  # its stop tokens too
        save_model(model, args.dst, max_shard_size=args.max_shard_size, dtype=dtype, tokenizer=tok)
        kind = "safetensors"
    elif os.path.isfile(os.path.join(args.src, SINGLE_NAME)) or os.path.isfile(os.path.join(args.src, INDEX_NAME)):
        model = load_model(args.src, dtype=dtype)
        if dtype is not None:
            model.config = model.config.replace(torch_dtype=str(dtype).removeprefix("torch."))
        save_checkpoint(args.dst, model)
        kind = "DCP"
    else:
        raise UserError(f"{args.src} holds neither a DCP checkpoint (.metadata) nor safetensors weights")
    _copy_side_files(args.src, args.dst)
    print(f"wrote {kind} checkpoint to {args.dst} ({model.num_parameters():,} parameters)")
    return 0
