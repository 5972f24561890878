"""The pre-training optimiser: Muon for hidden matrices, AdamW for the rest, stepped as one.

Muon (`muon.py`, the report's optimiser) takes the hidden weight matrices, sharded or not. AdamW takes what
is not a hidden matrix: embeddings, the LM / MTP heads, the router gate (small, and its logits feed a
sigmoid where Muon's fixed-RMS update would be too coarse), and every norm weight (without weight decay).
`--optimizer adamw` gives AdamW everything. `auto` is Muon at every world size (a sharded run
orthogonalises whole matrices on their owner ranks), or, on `--resume`, what the checkpoint was trained with.
"""

from __future__ import annotations

import torch
from torch import nn

from stepflash.errors import UserError
from stepflash.model.fused import fused_row_splits
from stepflash.training.muon import Muon


def _is_adamw_matrix(name: str) -> bool:
    return ("embed_tokens" in name or name.startswith("lm_head") or "shared_head" in name
            or name.endswith("moe.gate.weight"))


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{'muon': hidden matrices, 'adamw_decay': embeddings/heads/router, 'adamw_no_decay': norms}."""
    groups: dict[str, list[nn.Parameter]] = {"muon": [], "adamw_decay": [], "adamw_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            groups["adamw_no_decay"].append(p)
        elif _is_adamw_matrix(name):
            groups["adamw_decay"].append(p)
        else:
            groups["muon"].append(p)
    return groups


class CombinedOptimizer:
    """Several optimisers stepped together; `param_groups` spans all of them so the schedule sets every lr."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        for opt in optimizers:
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError("optimizer state does not match this optimizer (different --optimizer?)")
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)

    def set_lr_factor(self, factor: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor


def build_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    muon_momentum: float = 0.95, muon_dtype: torch.dtype | None = None,
                    muon_iteration: str = "newton-schulz") -> CombinedOptimizer:
    """kind 'muon' (Muon for hidden matrices + AdamW for the rest), 'adamw' (AdamW for everything), or
    'auto' (Muon). muon_dtype / muon_iteration: the orthogonalisation's precision and polynomial."""
    kind = "muon" if kind == "auto" else kind
    groups = split_parameters(model)
    fused = {"fused": True} if all(p.is_cuda for p in model.parameters()) else {}
    if kind == "adamw":
        decay = groups["muon"] + groups["adamw_decay"]
        muon = None
    elif kind == "muon":
        decay = groups["adamw_decay"]
        muon = Muon(groups["muon"], lr=lr, momentum=muon_momentum, weight_decay=weight_decay, ns_dtype=muon_dtype,
                    iteration=muon_iteration, row_splits=fused_row_splits(model)) if groups["muon"] else None
    else:
        raise ValueError(f"optimizer must be 'muon' or 'adamw', got {kind!r}")
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": groups["adamw_no_decay"], "weight_decay": 0.0}],
                              lr=lr, betas=betas, eps=1e-8, **fused)
    return CombinedOptimizer([adamw] + ([muon] if muon is not None else []))


def resolve_optimizer(requested: str, saved: str | None = None) -> str:
    """The optimizer a run uses: 'auto' is Muon (at any world size), or whatever the checkpoint being resumed
    was trained with; an explicit choice that contradicts the checkpoint is refused."""
    kind = requested if requested != "auto" else (saved or "muon")
    if kind not in ("muon", "adamw"):
        raise UserError(f"--optimizer must be auto, muon or adamw, got {requested!r}")
    if saved is not None and saved != kind:
        raise UserError(f"the checkpoint was trained with {saved}: resume it with --optimizer {saved} or auto")
    return kind
