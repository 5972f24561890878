"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), resumable at any world size.

Every rank writes its own shards of the model and optimizer state in parallel (no gather to rank 0).
The state dicts come from `torch.distributed.checkpoint.state_dict.get_state_dict`, which names every
tensor by its model path (the release's names, e.g. `model.layers.3.moe.gate_proj.weight`) with its
global shape; expert slices and FSDP shards are DTensors, so DCP records where each piece sits and a
later load at another dp / ep / world size (or in one plain process) reads just the pieces it needs.

Directory layout:
    <dir>/.metadata, <dir>/__<rank>_0.distcp   DCP's own files: keys "model.<name>" and, when saved
                                               with an optimizer, "optim.state.<name>.<exp_avg|...>"
    <dir>/config.json                          the model config, so `stepflash convert` can rebuild it
    <dir>/train_state.pt                       optional: the caller's own state from rank 0 (step, data
                                               position, RNG), torch.save'd, read back with weights_only

`stepflash convert` turns such a directory into the release's safetensors layout and back.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from stepflash.errors import UserError

TRAIN_STATE = "train_state.pt"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every single-process save/load that it assumes one process; that is the intent here."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")
        yield


def is_dcp_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def checkpoint_keys(path: str) -> set[str]:
    """The flattened keys stored in a DCP directory ("model.<name>", "optim.state.<name>.<field>", ...)."""
    if not is_dcp_dir(path):
        raise UserError(f"{path} is not a DCP checkpoint directory (no .metadata file)")
    return set(FileSystemReader(path).read_metadata().state_dict_metadata)


def _optimizers(optimizer) -> list[torch.optim.Optimizer] | None:
    """An optimizer, a list of them, or a wrapper holding them in `.optimizers` (training's CombinedOptimizer)."""
    if optimizer is None:
        return None
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(getattr(optimizer, "optimizers", optimizer))


def save_checkpoint(path: str, model: nn.Module, optimizer=None, train_state: dict | None = None) -> None:
    """Write model (+ optimizer) shards from every rank; rank 0 adds config.json and train_state.pt.

    `optimizer`: a torch optimizer, a list of them, or an object with `.optimizers`. `train_state`:
    rank 0's dict of tensors / numbers / strings / lists (step, data position, RNG). Call on all
    ranks (it is collective)."""
    os.makedirs(path, exist_ok=True)
    optimizer = _optimizers(optimizer)
    if optimizer is None:
        state = {"model": get_model_state_dict(model, options=_OPTIONS)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        state = {"model": model_sd, "optim": optim_sd}
    with single_process_quiet():
        dcp.save(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    if _is_main():
        config = getattr(model, "config", None)
        if config is not None:
            config.save_json(os.path.join(path, "config.json"))
        if train_state is not None:
            tmp = os.path.join(path, TRAIN_STATE + ".tmp")
            torch.save(train_state, tmp)
            os.replace(tmp, os.path.join(path, TRAIN_STATE))
    _barrier()


def load_checkpoint(path: str, model: nn.Module, optimizer=None) -> dict:
    """Read a DCP checkpoint into `model` (and `optimizer` when the checkpoint holds optimizer state);
    returns the saved train_state ({} if none). The model may be parallelized differently from the
    one that saved it, or not at all. Call on all ranks (it is collective)."""
    keys = checkpoint_keys(path)
    optimizer = _optimizers(optimizer)
    with_optim = optimizer is not None and any(k.startswith("optim.") for k in keys)
    if with_optim:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model, options=_OPTIONS)}
    missing = sorted(f"model.{k}" for k in state["model"] if f"model.{k}" not in keys)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {path} has no tensor {missing[0]}{more}: it was saved from another model config")
    with single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    if with_optim:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_OPTIONS)
    else:
        set_model_state_dict(model, state["model"], options=_OPTIONS)
    train_state_path = os.path.join(path, TRAIN_STATE)
    if os.path.isfile(train_state_path):
        return torch.load(train_state_path, map_location="cpu", weights_only=True)
    return {}
