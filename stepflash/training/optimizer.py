"""Optimisers and the learning-rate schedule for pre-training.

Muon (the report's optimiser) for the hidden weight matrices: heavy-ball momentum, then the update is
replaced by its orthogonal factor (U V^T of its SVD, approximated by a quintic Newton-Schulz iteration)
and scaled by 0.2 * sqrt(max(rows, cols)) so its RMS matches a typical AdamW update; one learning rate
and weight decay then serve both optimisers. Stacked expert weights [E, out, in] are orthogonalised per
expert (the iteration is batched over E). The iteration runs in fp32 on CPU and bf16 on GPU after
normalising the matrix to unit Frobenius norm, which keeps every intermediate in range (the report runs
its Polar-Express variant, same idea with per-step coefficients, in fp16).

AdamW for what is not a hidden matrix: embeddings, the LM / MTP heads, the router gate (small, and its
logits feed a sigmoid where Muon's fixed-RMS update would be too coarse), and every norm weight (without
weight decay).

Under FSDP only AdamW is correct (each rank holds a shard of every matrix, and Muon needs the whole one):
`resolve_optimizer` turns `--optimizer auto` into AdamW there and refuses an explicit Muon.

`lr_factor` is linear warmup then cosine decay to `min_lr_ratio`; the schedule is a pure function of
the step, so resuming needs nothing but the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stepflash.model.fused import fused_row_splits

# Quintic Newton-Schulz coefficients (a, b, c) tuned for fast convergence of small singular values:
# X <- a X + (b A + c A^2) X with A = X X^T. Singular values land in roughly [0.7, 1.2], not exactly 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None, eps: float = 1e-7) -> torch.Tensor:
    """g [..., m, n] -> approximately U V^T of each matrix (same shape and dtype as g)."""
    dtype = dtype or (torch.float32 if g.device.type == "cpu" else torch.bfloat16)
    x = g.to(dtype)
    wide = x.shape[-2] > x.shape[-1]
    if wide:  # iterate on the side with the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.mT  # [..., m, m]
        x = a * x + (b * gram + c * gram @ gram) @ x
    if wide:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum + orthogonalised update for 2D matrices (or stacks of them, batched over the first dim)."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype | None = None,
                 row_splits: dict[int, list[int]] | None = None):
        """row_splits: id(parameter) -> row counts of the separate matrices a fused parameter holds
        (`stepflash.model.fused.fused_row_splits`); each is orthogonalised and scaled on its own."""
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))
        self.ns_dtype = ns_dtype
        self.row_splits = row_splits or {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                assert p.ndim >= 2, "Muon only takes matrices; route vectors to AdamW"
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.mul_(1 - group["lr"] * group["weight_decay"])
                for rows in self._row_blocks(p):
                    o = orthogonalize(update[rows], group["ns_steps"], self.ns_dtype)
                    scale = 0.2 * math.sqrt(max(o.shape[-2], o.shape[-1]))
                    p[rows].add_(o, alpha=-group["lr"] * scale)
        return loss

    def _row_blocks(self, p: torch.Tensor) -> list[tuple]:
        """Index tuples of the matrices p holds: all of it, or each part of a fused projection."""
        bounds = [0]
        for n in self.row_splits.get(id(p), [p.shape[-2]]):
            bounds.append(bounds[-1] + n)
        return [(..., slice(a, b), slice(None)) for a, b in zip(bounds, bounds[1:])]


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
                    muon_momentum: float = 0.95) -> CombinedOptimizer:
    """kind 'muon' (Muon for hidden matrices + AdamW for the rest), 'adamw' (AdamW for everything), or
    'auto' (Muon: the single-process choice; sharded runs resolve it with `resolve_optimizer` first)."""
    kind = "muon" if kind == "auto" else kind
    groups = split_parameters(model)
    fused = {"fused": True} if all(p.is_cuda for p in model.parameters()) else {}
    if kind == "adamw":
        decay = groups["muon"] + groups["adamw_decay"]
        muon = None
    elif kind == "muon":
        decay = groups["adamw_decay"]
        muon = Muon(groups["muon"], lr=lr, momentum=muon_momentum, weight_decay=weight_decay,
                    row_splits=fused_row_splits(model)) if groups["muon"] else None
    else:
        raise ValueError(f"optimizer must be 'muon' or 'adamw', got {kind!r}")
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": groups["adamw_no_decay"], "weight_decay": 0.0}],
                              lr=lr, betas=betas, eps=1e-8, **fused)
    return CombinedOptimizer([adamw] + ([muon] if muon is not None else []))


def lr_factor(step: int, warmup: int, total: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine down to min_lr_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_optimizer(requested: str, world_size: int = 1, saved: str | None = None) -> str:
    """The optimizer a run uses: 'auto' is Muon on one process and AdamW when sharded (Muon orthogonalises
    whole matrices, FSDP hands each rank a shard), or whatever the checkpoint being resumed was trained with."""
    from stepflash.errors import UserError

    kind = requested if requested != "auto" else (saved or ("adamw" if world_size > 1 else "muon"))
    if kind not in ("muon", "adamw"):
        raise UserError(f"--optimizer must be auto, muon or adamw, got {requested!r}")
    if kind == "muon" and world_size > 1:
        raise UserError("--optimizer muon cannot train sharded (Muon orthogonalises whole matrices, FSDP gives each "
                        "rank a shard); use --optimizer adamw or auto" + (" (this checkpoint was trained with Muon)"
                                                                         if saved == "muon" else ""))
    if saved is not None and saved != kind:
        raise UserError(f"the checkpoint was trained with {saved}: resume it with --optimizer {saved} or auto")
    return kind
