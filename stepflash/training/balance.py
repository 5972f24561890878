"""MoE load balancing as in the report: a loss-free router bias plus the EP-group balance loss.

Loss-free bias (after every optimizer step, per MoE layer, from the step's global expert counts):
    bias_e += rate * sign(mean_load - load_e), then bias -= mean(bias)
An overloaded expert's bias drops, so `p + bias` selects it less; the bias never weights an output
(see stepflash/model/moe.py). Re-centring keeps the biases from drifting together, which would change
nothing in the selection but slowly lose fp32 resolution.

EP-group balance loss (coefficient 1e-3 in the report): the experts are split into G contiguous groups
(one per expert-parallel rank), and per layer
    f_e = fraction of the N*k top-k slots that went to expert e        (no gradient: a count)
    p_e = mean over tokens of the router probability of e, normalised per token
    f_g = sum_{e in g} f_e,  p_g = sum_{e in g} p_e,   L_EP = G * sum_g f_g * p_g
It equals 1 when the groups are evenly loaded and grows with imbalance; the gradient flows through p_g.
The loss is summed over MoE layers (each layer adds its own term, as per-layer auxiliary losses
usually are). There is no per-expert auxiliary loss: balance inside a group is the bias's job.

Why normalise p per token: the router uses independent sigmoids, so sum_e p_e is not fixed. Without
normalisation the cheapest way to lower L_EP is to shrink every probability (push all router logits
down), which balances nothing and fights the gating weights; normalising makes p a distribution over
experts, so the loss can only move probability mass between groups.
"""

from __future__ import annotations

import torch


def ep_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """probs [N, E] (sigmoid router outputs, with grad), topk_idx [N, k] -> scalar L_EP (fp32)."""
    n, e = probs.shape
    if e % num_groups:
        raise ValueError(f"{e} experts cannot be split into {num_groups} equal EP groups")
    if n == 0:
        return probs.sum() * 0.0
    p = probs.float()
    p = p / p.sum(-1, keepdim=True)  # [N, E], each row sums to 1 (see module docstring)
    p_e = p.mean(0)  # [E]
    counts = torch.bincount(topk_idx.reshape(-1), minlength=e).float()  # [E]
    f_e = counts / topk_idx.numel()
    p_g = p_e.view(num_groups, -1).sum(-1)  # [G]
    f_g = f_e.view(num_groups, -1).sum(-1)
    return num_groups * (f_g * p_g).sum()


@torch.no_grad()
def update_router_bias(router_bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """In place: bias [E] += rate * sign(mean(load) - load), then re-centred to mean zero. load [E]."""
    load = load.float()
    router_bias.add_(rate * torch.sign(load.mean() - load))
    router_bias.sub_(router_bias.mean())


class ExpertLoad:
    """Expert token counts per MoE layer, summed over the micro-batches of a step (and later over ranks).

    `add` is called after each forward with every layer's `last_routing`; `global_counts` applies the
    run's cross-rank sum (identity on one process) so every rank moves its biases identically."""

    def __init__(self, num_layers: int, num_experts: int, device):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)  # [layers, E]

    def add(self, moe_modules) -> None:
        for i, m in enumerate(moe_modules):
            self.counts[i] += m.last_routing["counts"].to(self.counts.dtype)

    def global_counts(self, all_reduce=None) -> torch.Tensor:
        counts = self.counts.clone()
        if all_reduce is not None:
            all_reduce(counts)
        return counts

    def reset(self) -> None:
        self.counts.zero_()


def apply_bias_updates(moe_modules, counts: torch.Tensor, rate: float) -> None:
    """One loss-free update per layer from global counts [layers, E]."""
    for m, c in zip(moe_modules, counts):
        update_router_bias(m.router_bias, c, rate)
