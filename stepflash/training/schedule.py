"""The learning-rate schedule every training verb uses: linear warmup, then decay to a floor.

`lr_factor` is a pure function of the step, so resuming needs nothing but the step; `set_lr` applies it to
any optimizer's parameter groups (each keeps its own peak, remembered as `initial_lr`, so groups with
different learning rates, like the reward model's head and trunk, scale together).
"""

from __future__ import annotations

import math

DECAYS = ("cosine", "linear")


def lr_factor(step: int, warmup: int, total: int, min_lr_ratio: float, decay: str = "cosine") -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup over `warmup` steps, then cosine (or linear)
    decay from 1 to min_lr_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    if decay == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, factor: float) -> None:
    """Every parameter group's lr = its peak (its lr when first seen here) x factor."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
