"""Checkpoints in the release's layout: config.json plus safetensors, sharded with an index when large.

`load_model` builds the model on the meta device (no memory), then reads one shard at a time, casting each
tensor to `dtype` and moving it to `device` (the router bias stays fp32), and assigns them all with
`load_state_dict(assign=True)`, whose adapter fuses projections stored separately (`model/fused.py`). Every tensor
is checked: a missing, unexpected or mis-shaped tensor stops the load with its name and both shapes.
`save_model` writes the same layout back, each file written to a temporary name and renamed, so a
crash never leaves a half-written file under the final name. Beside the weights it writes what peers
(vLLM, SGLang, llama.cpp's converter, transformers) read from a model directory: config.json with every
switch stated, generation_config.json (bos, and every id a reply may end with: the config's eos ids plus
`<|im_end|>` and `<|eos|>` when the tokenizer has them) and, given a tokenizer, tokenizer.json and
tokenizer_config.json.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from stepflash.config import Step35Config
from stepflash.model import Step35ForCausalLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
# Tokens that end an assistant reply in the chat format; peers stop on generation_config's eos ids only.
_STOP_TOKENS = ("<|im_end|>", "<|eos|>")
_KEEP_FP32 = ("router_bias",)  # selection-only bias: precision matters, size does not


class CheckpointError(ValueError):
    """A checkpoint that does not match its config (names the tensor and both shapes)."""


def parse_size(size: int | str) -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def shard_files(path: str) -> dict[str, list[str]]:
    """file name -> tensor names, from the index when sharded."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, []).append(name)
        return files
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {SINGLE_NAME: list(f.keys())}
    raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}")


def _expected_tensors(model: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {name: (t.shape, t.dtype) for name, t in model.state_dict().items()}


def load_model(path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               config: Step35Config | None = None) -> Step35ForCausalLM:
    """Load a checkpoint directory (config.json + model.safetensors or a sharded index) into a model.

    dtype None keeps each tensor's stored dtype (router bias always fp32)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = config or Step35Config.from_json(path)
    files = shard_files(path)
    with torch.device("meta"):
        model = Step35ForCausalLM(cfg)
    expected = _expected_tensors(model)
    state: dict[str, torch.Tensor] = {}
    for fname, names in files.items():
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            raise FileNotFoundError(f"shard {fname} listed in {INDEX_NAME} is missing from {path}")
        with safe_open(fpath, framework="pt", device="cpu") as f:
            for name in names:
                if name not in expected:
                    raise CheckpointError(f"unexpected tensor {name} in {fname} (not in a model of this config)")
                tensor = f.get_tensor(name)
                shape = expected[name][0]
                if tensor.shape != shape:
                    raise CheckpointError(f"tensor {name}: checkpoint shape {list(tensor.shape)} but the config "
                                          f"expects {list(shape)}")
                if name.endswith(_KEEP_FP32):
                    tensor = tensor.float()
                elif dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[name] = tensor.to(device)
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]}{more} missing from checkpoint {path} "
                              f"(expected shape {list(expected[missing[0]][0])})")
    # The model's state-dict adapter turns the release names into its fused parameters (model/fused.py).
    model.load_state_dict(state, assign=True)
    return model


def _atomic_save_file(tensors: dict[str, torch.Tensor], fpath: str, metadata: dict) -> None:
    tmp = fpath + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, fpath)


def _atomic_write_json(obj: dict, fpath: str) -> None:
    with open(fpath + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(fpath + ".tmp", fpath)


def generation_config(cfg: Step35Config, tokenizer=None) -> dict:
    """generation_config.json: the config's bos/eos plus the chat stop tokens the tokenizer has, so a peer
    stops where `stepflash serve` stops. tokenizer: a `tokenizers.Tokenizer` or None."""
    eos = list(cfg.eos_token_ids)
    extra = [tokenizer.token_to_id(t) for t in _STOP_TOKENS] if tokenizer is not None else []
    eos += [i for i in extra if i is not None and i not in eos]
    out = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos}
    pad = tokenizer.token_to_id("<|pad|>") if tokenizer is not None else None
    if pad is not None:
        out["pad_token_id"] = pad
    return out


def save_model(model: Step35ForCausalLM, path: str, max_shard_size: int | str = "5GB",
               dtype: torch.dtype | None = None, tokenizer=None) -> None:
    """Write config.json, generation_config.json and the weights in the release's layout (sharded past
    max_shard_size). tokenizer: a `tokenizers.Tokenizer`, or the path of a tokenizer.json (or of a directory
    holding one) to copy; its files are written beside the weights and its stop tokens go into
    generation_config.json."""
    os.makedirs(path, exist_ok=True)
    limit = parse_size(max_shard_size)
    state = model.state_dict()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        if dtype is not None and t.is_floating_point() and not name.endswith(_KEEP_FP32):
            t = t.to(dtype)
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    # Remove a previous layout so a directory never holds both a single file and an index.
    for stale in [SINGLE_NAME, INDEX_NAME] + [f for f in os.listdir(path) if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f)]:
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        _atomic_save_file(shards[0], os.path.join(path, SINGLE_NAME), meta)
    else:
        weight_map, total = {}, 0
        for k, shard in enumerate(tqdm(shards, desc=f"saving {path}", unit="shard", disable=None)):  # a terminal only
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save_file(shard, os.path.join(path, fname), meta)
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        _atomic_write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, os.path.join(path, INDEX_NAME))
    cfg = model.config
    if dtype is not None:
        cfg = cfg.replace(torch_dtype=str(dtype).removeprefix("torch."))
    cfg.save_json(os.path.join(path, "config.json"))
    tok = None
    if tokenizer is not None:
        from stepflash.tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer

        save_tokenizer(tokenizer, path)
        tok = load_tokenizer(os.path.join(path, TOKENIZER_FILE))
    _atomic_write_json(generation_config(cfg, tok), os.path.join(path, GENERATION_CONFIG_NAME))
