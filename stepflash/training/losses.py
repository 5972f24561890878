"""Token losses every training verb shares: cross entropy (plain or masked) and token log-probabilities.

All of them compute in fp32 whatever the logits' dtype. Shapes: logits [B, T, V], targets and masks
[B, T]; a mask holds 1 on the tokens a loss covers (assistant tokens in SFT, response tokens in RL) and
the masked mean divides by their count (at least 1, so an all-zero mask gives 0, not NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy [B, T] in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="none").view(targets.shape)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T] over the positions where mask [B, T] is 1."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the masked tokens."""
    return masked_mean(token_cross_entropy(logits, targets), mask)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) [B, T] in fp32. For a sequence ids [B, S]: token_logprobs(model(ids)[:, :-1], ids[:, 1:])."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) [B, T] and the entropy [B, T] of each predictive distribution, from one log-softmax."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
