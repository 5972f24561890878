"""Training checkpoints and finished model directories: the release layout plus what a run adds, published
atomically.

`save_model_dir` / `copy_model_dir` publish one complete model directory (weights, config, tokenizer; the
result of `sft`, the MTP phase, a recipe stage); `save_tensors` / `load_tensors` keep a named safetensors
file beside the weights (the critic's and reward model's value head).

RUN_DIR/checkpoints/step_00000200/ holds what `stepflash.load_model` and the tokenizer loader read
(config.json, model.safetensors or shards + index, tokenizer.json, tokenizer_config.json) and
trainer_state.pt (optimizer, data position, RNG, spike-detector and monitor state, step). Everything is
written into a hidden temporary directory which is then renamed to its final name; RUN_DIR/checkpoints/
latest names the newest one and is itself replaced atomically. A crash mid-save therefore leaves the
previous checkpoint, and `latest`, untouched.

Under torchrun (`save_sharded_checkpoint`) the same directory holds a DCP checkpoint instead: every
rank writes its shards of the model and optimizer (`stepflash.checkpoint.dcp.save_checkpoint`) into the
temporary directory, rank 0 adds trainer_state.pt and the tokenizer and, after a barrier, publishes it
the same way. `load_resume` reads either kind into a model parallelized any way (or not at all), so a
run saved at N processes resumes at M. `stepflash convert` turns a DCP checkpoint into the release
layout; `export=True` also writes that layout next to the shards (gathered on rank 0).
"""

from __future__ import annotations

import os
import re
import shutil

import torch

from stepflash.checkpoint import load_model, save_model

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"step_(\d{8})")


def checkpoints_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_root(run_dir)
    if not os.path.isdir(root):
        return []
    out = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := _NAME.fullmatch(d))]
    return sorted(out)


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint named by `latest` (falling back to the highest step), or None."""
    pointer = os.path.join(checkpoints_root(run_dir), "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(checkpoints_root(run_dir), f.read().strip())
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    found = [p for _, p in list_checkpoints(run_dir) if os.path.isfile(os.path.join(p, STATE_FILE))]
    return found[-1] if found else None


def save_checkpoint(run_dir: str, step: int, model, trainer_state: dict, tokenizer_src: str | None = None,
                    keep: int = 2) -> str:
    """Write checkpoint `step` and publish it; prune all but the newest `keep`. Returns its path."""
    root = checkpoints_root(run_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = os.path.join(root, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, tokenizer=tokenizer_src)  # + tokenizer files and generation_config.json
    torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
    return _publish(run_dir, name, keep)


def save_model_dir(model, tokenizer, out: str) -> str:
    """Weights, config and tokenizer (a Tokenizer, or the path of one to copy) written into a temporary sibling
    directory, then renamed to `out` (replacing an older one). Returns the absolute path."""
    out = os.path.abspath(out)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, tokenizer=tokenizer)  # + tokenizer files and generation_config.json
    replace_dir(tmp, out)
    return out


def copy_model_dir(src: str, out: str) -> None:
    """Copy a checkpoint directory without its trainer state to out.tmp, then rename it to `out`."""
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(STATE_FILE))
    replace_dir(tmp, out)


def save_tensors(path: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` (fp32, on CPU) as PATH/NAME (safetensors), atomically."""
    from safetensors.torch import save_file

    tmp = os.path.join(path, name + ".tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, name))


def load_tensors(path: str, name: str, device="cpu") -> dict[str, torch.Tensor] | None:
    """The tensors of PATH/NAME, or None when there is no such file."""
    from safetensors.torch import load_file

    file = os.path.join(path, name)
    return load_file(file, device=str(device)) if os.path.isfile(file) else None


def replace_dir(tmp: str, final: str) -> None:
    """Make the complete directory `tmp` become `final`, replacing any `final` already there: the old one is
    moved aside first, so at every moment `final` is either the old or the new complete directory."""
    if not os.path.exists(final):
        os.replace(tmp, final)
        return
    old = os.path.join(os.path.dirname(final), ".old-" + os.path.basename(final))
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _publish(run_dir: str, name: str, keep: int) -> str:
    """Rename the complete .tmp-<name> to <name>, point `latest` at it and prune; returns its path."""
    root = checkpoints_root(run_dir)
    final = os.path.join(root, name)
    replace_dir(os.path.join(root, f".tmp-{name}"), final)  # re-saving a step after a resume replaces it
    with open(os.path.join(root, "latest.tmp"), "w") as f:
        f.write(name + "\n")
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    if keep > 0:
        for _, path in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str, model) -> dict:
    """Copy a checkpoint's weights (and router biases) into `model`; return its trainer state."""
    device = next(model.parameters()).device
    loaded = load_model(path, dtype=next(model.parameters()).dtype, device=device, config=model.config)
    model.load_state_dict(loaded.state_dict())
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)


# ---- sharded checkpoints (under torchrun) and resuming either kind --------------------------------

def is_sharded(path: str) -> bool:
    """True for a DCP checkpoint (written by a torchrun run), False for the release layout."""
    return os.path.isfile(os.path.join(path, ".metadata"))


def read_trainer_state(path: str) -> dict:
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)


def save_sharded_checkpoint(run_dir: str, step: int, model, optimizer, trainer_state: dict,
                            tokenizer_src: str | None = None, keep: int = 2, export: bool = False) -> str | None:
    """Collective: every rank writes its DCP shards of model + optimizer into .tmp-step_N; rank 0 adds
    trainer_state.pt and the tokenizer (and, with `export`, the release safetensors gathered from all
    ranks), then publishes it like `save_checkpoint`. Returns the path on rank 0, None elsewhere."""
    import torch.distributed as dist

    from stepflash.distributed import gather_model
    from stepflash.checkpoint.dcp import save_checkpoint as save_dcp
    from stepflash.tokenizer import save_tokenizer

    main = dist.get_rank() == 0
    root = checkpoints_root(run_dir)
    name = f"step_{step:08d}"
    tmp = os.path.join(root, f".tmp-{name}")
    if main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()  # nobody writes shards into a directory rank 0 is still clearing
    save_dcp(tmp, model, optimizer)  # ends with a barrier: every shard is on disk
    plain = gather_model(model) if export else None  # collective; the whole model on rank 0 only
    path = None
    if main:
        if plain is not None:
            save_model(plain, tmp, tokenizer=tokenizer_src)
        elif tokenizer_src is not None:
            save_tokenizer(tokenizer_src, tmp)
        torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
        path = _publish(run_dir, name, keep)
    dist.barrier()  # no rank goes on (or reads `latest`) before the checkpoint is published
    return path


def portable_optimizer_state(model, optimizer, state_dict: dict) -> dict:
    """A single-process checkpoint's optimizer state (keyed by parameter index) as a full state keyed by
    parameter name, which `load_portable_optimizer_state` can shard into any parallel layout. Call it on
    the plain model, before it is parallelized, with a fresh optimizer of the same kind."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer.load_state_dict(state_dict)
    return get_optimizer_state_dict(model, optimizer.optimizers, options=StateDictOptions())


def load_portable_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer.optimizers, state,
                             options=StateDictOptions(full_state_dict=True))


def resume_point(run_dir: str, resume: bool) -> tuple[str | None, dict | None]:
    """(checkpoint path, trainer state) a run resumes from, or (None, None) for a fresh run; refuses to
    start a fresh run over existing checkpoints."""
    from stepflash.errors import UserError

    path = latest_checkpoint(run_dir)
    if resume and path is None:
        raise UserError(f"--resume: no checkpoint in {checkpoints_root(run_dir)}")
    if not resume and path is not None:
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume to continue, or choose another --out")
    return (path, read_trainer_state(path)) if resume else (None, None)


def saved_optimizer(state: dict | None) -> str | None:
    """The optimizer ('muon' or 'adamw') a checkpoint was trained with, if it says."""
    if state is None:
        return None
    kind = state.get("optimizer_kind") or state.get("args", {}).get("optimizer")  # older checkpoints: the flag
    return kind if kind in ("muon", "adamw") else None
