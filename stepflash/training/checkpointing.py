"""Training checkpoints: the release layout plus the trainer's state, published atomically.

RUN_DIR/checkpoints/step_00000200/ holds what `stepflash.load_model` and the tokenizer loader read
(config.json, model.safetensors or shards + index, tokenizer.json, tokenizer_config.json) and
trainer_state.pt (optimizer, data position, RNG, spike-detector and monitor state, step). Everything is
written into a hidden temporary directory which is then renamed to its final name; RUN_DIR/checkpoints/
latest names the newest one and is itself replaced atomically. A crash mid-save therefore leaves the
previous checkpoint, and `latest`, untouched.
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
    from stepflash.tokenizer import save_tokenizer

    root = checkpoints_root(run_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    if tokenizer_src is not None:
        save_tokenizer(tokenizer_src, tmp)
    torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
    if os.path.exists(final):  # re-saving a step (after a resume): move the old one aside first
        old = os.path.join(root, f".old-{name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
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
