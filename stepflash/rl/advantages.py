"""Advantages and the critic's loss: GAE over response tokens with truncation bootstrapping.

Alignment (the same as the log-probs in `losses.py`): position t of a `[batch, seq]` tensor is response
token a_t; `values[:, t]` is V(s_t), the critic's value of the state just before a_t was generated
(for a critic that reads the whole sequence, that is its output at the position before a_t; see
`critic.py`). `response_mask` marks generated tokens; masked positions (prompt, padding, tool output)
are skipped: they are not steps, they neither discount nor receive advantages.

The reward arrives at the last response token. What follows the last token differs:
- the response ended by itself (EOS): the episode is over, the value after it is 0;
- the response was cut at the length limit (`truncated`): the episode is not over, so the return is
  bootstrapped with the critic's value of the state after the last token, `last_values` = V(s_T).
  A truncated response usually gets reward 0, so its return is then exactly R = V(s_T) instead of 0.

GAE: delta_t = r_t + gamma V(s_{t+1}) - V(s_t); A_t = sum_l (gamma lambda)^l delta_{t+l}; returns = A + V.
With gamma = lambda = 1 (the report's setting) this is A_t = R - V(s_t) (R bootstrapped when truncated).
"""

from __future__ import annotations

import torch

from stepflash.rl.losses import reduce_loss


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last response token [B] (0 for a row without one)."""
    t = response_mask.shape[1]
    positions = torch.arange(t, device=response_mask.device).expand_as(response_mask)
    return torch.where(response_mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def token_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sequence rewards [B] placed at each row's last response token -> [B, T] (per-token rewards pass through)."""
    if rewards.dim() == 2:
        if rewards.shape != response_mask.shape:
            raise ValueError(f"per-token rewards have shape {list(rewards.shape)}, "
                             f"the mask {list(response_mask.shape)}")
        return rewards.float()
    out = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)  # [B, T]
    has_response = response_mask.bool().any(dim=1)
    out[torch.arange(out.shape[0], device=out.device), last_token_index(response_mask)] = \
        torch.where(has_response, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    return out


@torch.no_grad()
def gae(values: torch.Tensor, rewards: torch.Tensor, response_mask: torch.Tensor,
        truncated: torch.Tensor | None = None, last_values: torch.Tensor | None = None,
        gamma: float = 1.0, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (module docstring).

    values [B, T] = V(s_t); rewards [B] (at the last response token) or [B, T] per token; response_mask [B, T];
    truncated [B] bool (cut at the length limit); last_values [B] = V(s_T), required when any row is truncated.
    Returns (advantages [B, T], returns [B, T]), both 0 off the response mask."""
    if values.shape != response_mask.shape:
        raise ValueError(f"values has shape {list(values.shape)} but response_mask has {list(response_mask.shape)}")
    b, t = values.shape
    mask = response_mask.bool()
    v = values.detach().float()
    r = token_rewards(rewards, response_mask)
    next_value = torch.zeros(b, dtype=torch.float32, device=v.device)  # value after the last response token
    if truncated is not None and bool(truncated.any()):
        if last_values is None:
            raise ValueError("truncated responses need last_values = V(s_T) to bootstrap their return")
        next_value = torch.where(truncated.bool(), last_values.detach().float(), next_value)
    running = torch.zeros(b, dtype=torch.float32, device=v.device)
    adv = torch.zeros(b, t, dtype=torch.float32, device=v.device)  # [B, T]
    for i in reversed(range(t)):
        m = mask[:, i]
        delta = r[:, i] + gamma * next_value - v[:, i]
        candidate = delta + gamma * lam * running
        adv[:, i] = torch.where(m, candidate, torch.zeros_like(candidate))
        running = torch.where(m, candidate, running)
        next_value = torch.where(m, v[:, i], next_value)
    returns = torch.where(mask, adv + v, torch.zeros_like(adv))
    return adv, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (masked-out entries become 0). Optional for advantages."""
    m = mask.bool()
    vals = x[m].float()
    if vals.numel() == 0:
        return torch.zeros_like(x)
    return torch.where(m, (x - vals.mean()) / (vals.std(unbiased=False) + eps), torch.zeros_like(x))


def value_loss(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor,
               old_values: torch.Tensor | None = None, clip_eps: float | None = None,
               normalization: str | float = "token") -> tuple[torch.Tensor, dict[str, float]]:
    """Critic loss 0.5 (V - R)^2 over response tokens. With clip_eps and old_values, the PPO-style clipped
    variant: 0.5 max((V - R)^2, (V_clip - R)^2), V_clip = old + clamp(V - old, -eps, eps).
    stats: value_mse, explained_variance (1 - Var(R - V) / Var(R)), clip_fraction (when clipped)."""
    if values.shape != returns.shape or values.shape != response_mask.shape:
        raise ValueError(f"values {list(values.shape)}, returns {list(returns.shape)} and response_mask "
                         f"{list(response_mask.shape)} must have the same shape")
    ret = returns.detach().to(values.dtype)
    err = (values - ret) ** 2  # [B, T]
    stats: dict[str, float] = {}
    if clip_eps is not None:
        if old_values is None:
            raise ValueError("a clipped value loss needs old_values")
        old = old_values.detach().to(values.dtype)
        clipped = old + torch.clamp(values - old, -clip_eps, clip_eps)
        err_clipped = (clipped - ret) ** 2
        m = response_mask.bool()
        stats["clip_fraction"] = ((err_clipped > err) & m).sum().item() / max(int(m.sum()), 1)
        err = torch.maximum(err, err_clipped)
    loss = 0.5 * reduce_loss(err, response_mask, normalization)
    with torch.no_grad():
        m = response_mask.bool()
        v, r_ = values.detach()[m].float(), ret[m].float()
        stats["value_mse"] = ((v - r_) ** 2).mean().item() if v.numel() else 0.0
        var_r = r_.var(unbiased=False).item() if r_.numel() else 0.0
        stats["explained_variance"] = 1.0 - (r_ - v).var(unbiased=False).item() / var_r if var_r > 0 else 0.0
    return loss, stats
