"""Fused projections that keep the release's tensor names: the model's state-dict adapter.

A decode step pays per matrix product, so projections that read the same input are stored as one
matrix: attention's q/k/v/gate rows as `qkvg_proj`, a SwiGLU's gate/up rows as `gate_up_proj`. The
release (and every peer engine) names them separately. `keep_release_names(owner)` adapts the owner
module's state dict both ways, as gpt-fast's `load_hook` and torchtitan's state-dict adapters do:

- `state_dict()` emits `<owner>.q_proj.weight`, ... as row views of the fused weight. Views, not copies:
  an in-place copy into them updates the model (the RL rollout worker loads weights that way);
- `load_state_dict()` takes the release names and concatenates them into the fused weight;
- `owner.q_proj.weight` reads the same rows, so every state-dict key resolves attribute by attribute on
  the module tree, which torch.distributed.checkpoint requires of the keys it saves.

Parameters keep the fused names (`named_parameters()`, optimizer state); `fused_row_splits` tells an
optimizer that works per matrix (Muon) where the release's matrices start and end.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class FusedLinear(nn.Linear):
    """Several bias-free projections of one input as one matrix; `parts` maps each release name to its
    number of output rows, in row order."""

    def __init__(self, in_features: int, parts: dict[str, int]):
        super().__init__(in_features, sum(parts.values()), bias=False)
        self.parts = dict(parts)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """y [..., sum(rows)] -> one view per part, in `parts` order."""
        return y.split(list(self.parts.values()), dim=-1)

    def part_rows(self) -> dict[str, tuple[int, int]]:
        """release name -> (first row, row count)."""
        out, start = {}, 0
        for name, rows in self.parts.items():
            out[name] = (start, rows)
            start += rows
        return out


def _fused_children(owner: nn.Module) -> dict[str, FusedLinear]:
    return {name: m for name, m in owner.named_children() if isinstance(m, FusedLinear)}


def _save_parts(owner: nn.Module, state: dict, prefix: str, _meta) -> None:
    for name, fused in _fused_children(owner).items():
        weight = state.pop(prefix + name + ".weight", None)
        if weight is None:
            continue
        for part, (start, rows) in fused.part_rows().items():
            state[prefix + part + ".weight"] = weight.narrow(0, start, rows)


def _load_parts(owner: nn.Module, state: dict, prefix: str, *_args) -> None:
    for name, fused in _fused_children(owner).items():
        keys = [prefix + part + ".weight" for part in fused.parts]
        if all(k in state for k in keys):  # else strict loading names what is missing
            state[prefix + name + ".weight"] = torch.cat([state.pop(k) for k in keys])


def keep_release_names(owner: nn.Module) -> None:
    """Register the state-dict adapter on `owner` for every FusedLinear child it has (call at the end
    of the owner's __init__)."""
    owner.register_state_dict_post_hook(_save_parts)
    owner.register_load_state_dict_pre_hook(_load_parts)


class ReleaseNames:
    """Mixin for modules holding FusedLinear children: `self.q_proj.weight` is a row view of the fused
    weight (for reading; the fused parameter is the one that trains). `RELEASE_ORDER` lists the
    release's matrices in the order the release module defines them."""

    RELEASE_ORDER: tuple[str, ...] = ()

    def release_weights(self) -> list[tuple[str, torch.Tensor]]:
        """(release name, weight or row view) in RELEASE_ORDER: initialising them in this order draws the
        same random numbers as the unfused module did, so a seed gives the same model as before fusing."""
        return [(name, getattr(self, name).weight) for name in self.RELEASE_ORDER if hasattr(self, name)]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            for fused in _fused_children(self).values():
                if name in fused.parts:
                    start, rows = fused.part_rows()[name]
                    return SimpleNamespace(weight=fused.weight.narrow(0, start, rows))
            raise


def fused_row_splits(model: nn.Module) -> dict[int, list[int]]:
    """id(fused weight) -> row counts of the release matrices it holds, for per-matrix optimizers."""
    return {id(m.weight): list(m.parts.values()) for m in model.modules() if isinstance(m, FusedLinear)}
