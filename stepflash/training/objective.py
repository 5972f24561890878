"""The pre-training objective: next-token loss + MTP loss + EP-group balance loss.

A training window holds T + 1 tokens [B, T + 1]. The trunk reads window[:, :T]; the main head at
position t predicts window[t + 1]. MTP module j (teacher-forced chain, `model.mtp_logits`) at position
t predicts window[t + 2 + j]; its logits cover positions 0 .. T - 2 - j, so with the window's extra
token every one of them has a target: `mtp_targets(window, j) = window[:, 2 + j:]`.

    total = CE_main + mtp_weight * sum_j w_j CE_j / sum_j w_j + ep_coef * sum_layers L_EP
w_j are the per-depth weights (the report first trains module 0 only: w = (1, 0, 0)); all cross
entropies are token means computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from stepflash.training.balance import ep_balance_loss


@dataclass
class LossParts:
    total: torch.Tensor  # scalar with grad
    main: float
    mtp: list[float] = field(default_factory=list)
    ep: float = 0.0
    max_logit: float = 0.0


def mtp_targets(window: torch.Tensor, j: int) -> torch.Tensor:
    """window [B, T+1] -> targets [B, T-1-j] of MTP module j (position t predicts token t + 2 + j)."""
    return window[:, 2 + j:]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy in fp32; logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def compute_loss(model, window: torch.Tensor, mtp_weight: float = 0.3, mtp_depth_weights=(1.0, 1.0, 1.0),
                 ep_coef: float = 1e-3, ep_groups: int = 1, moe_modules=None) -> LossParts:
    """The full objective on one micro-batch window [B, T+1]. `moe_modules` must have record_routing on
    when ep_coef > 0 (their last_routing feeds the balance loss)."""
    inputs = window[:, :-1]  # [B, T]
    h = model.trunk(inputs)  # [B, T, hidden]
    logits = model.head(h)  # [B, T, V]
    main = cross_entropy(logits, window[:, 1:])
    total = main
    parts = LossParts(total=main, main=float(main.detach()), max_logit=float(logits.detach().max()))

    weights = list(mtp_depth_weights)
    if mtp_weight > 0 and sum(weights) > 0 and model.config.num_nextn_predict_layers > 0:
        mtp_sum = 0.0
        for j, lg in enumerate(model.mtp_logits(inputs, h)):
            ce = cross_entropy(lg, mtp_targets(window, j))
            parts.mtp.append(float(ce.detach()))
            if j < len(weights) and weights[j] > 0:
                mtp_sum = mtp_sum + weights[j] * ce
        total = total + mtp_weight * mtp_sum / sum(weights[: len(parts.mtp)] or [1.0])

    if ep_coef > 0 and moe_modules:
        ep = sum(ep_balance_loss(m.last_routing["probs"], m.last_routing["topk_idx"], ep_groups) for m in moe_modules)
        parts.ep = float(ep.detach())
        total = total + ep_coef * ep
    parts.total = total
    return parts


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], device, autocast_dtype=None) -> dict[str, float]:
    """Mean validation cross entropy of the main head and of each MTP module over fixed windows."""
    was_training = model.training
    model.eval()
    main, mtp, n = 0.0, [], 0
    for window in batches:
        window = window.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            inputs = window[:, :-1]
            h = model.trunk(inputs)
            main += float(cross_entropy(model.head(h), window[:, 1:]))
            for j, lg in enumerate(model.mtp_logits(inputs, h)):
                ce = float(cross_entropy(lg, mtp_targets(window, j)))
                if j < len(mtp):
                    mtp[j] += ce
                else:
                    mtp.append(ce)
        n += 1
    model.train(was_training)
    out = {"val_loss": main / max(n, 1)}
    out.update({f"val_mtp_loss_{j}": v / max(n, 1) for j, v in enumerate(mtp)})
    return out
