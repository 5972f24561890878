"""Policy losses for RL post-training: MIS-PO (the report's), PPO-clip and GRPO baselines, a k3 KL penalty.

All functions are pure: they take per-token tensors `[batch, seq]` aligned with the generated tokens
(position t holds the log-prob of response token t given everything before it) plus a `response_mask`
(1 on tokens the policy generated, 0 on prompt, padding and tool output) and return a scalar loss and a
dict of float statistics. Advantages may be per token `[batch, seq]` or per sequence `[batch]`.
Advantages, masks and the old/behaviour log-probs are treated as constants (detached).

MIS-PO (SPEC section 7). With pi_old the training-side policy before the update and mu the distribution
the inference engine actually sampled from:
    x_t    = pi_old(a_t|s_t) / mu(a_t|s_t)                       token importance ratio
    rho    = exp(mean_t log x_t)                                  trajectory ratio (geometric mean)
    m_t    = 1[lo <= x_t <= hi] * 1[traj_lo <= rho <= traj_hi]   keep (1) or drop (0), nothing in between
    L      = - sum_t m_t * A_t * log pi_theta(a_t|s_t) / N
There is no ratio pi_theta/pi_old and no clipping: the ratios only decide which tokens are trained on.

Normalisation N (the report does not give it, so it is a named choice, `normalization=`):
    "token"    N = number of response tokens in the batch (kept or not: dropping tokens does not
               up-weight the survivors). The default.
    "sequence" mean over sequences (with at least one response token) of each sequence's sum divided by
               its own response-token count: every sequence weighs the same whatever its length.
    "none"     N = 1, the plain sum.
    a number   N = that constant (e.g. the global response-token count of a whole rollout batch, so that
               gradient accumulation over micro-batches gives exactly the full-batch gradient).
"""

from __future__ import annotations

import math

import torch

NORMALIZATIONS = ("token", "sequence", "none")


def _check(name: str, t: torch.Tensor, shape: torch.Size) -> None:
    if t.shape != shape:
        raise ValueError(f"{name} has shape {list(t.shape)} but logprobs has shape {list(shape)}")


def _per_token(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sequence-level advantages [B] broadcast to [B, T]; per-token ones checked."""
    if advantages.dim() == 1:
        if advantages.shape[0] != shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} entries for a batch of {shape[0]}")
        return advantages[:, None].expand(shape)
    _check("advantages", advantages, shape)
    return advantages


def reduce_loss(per_token: torch.Tensor, response_mask: torch.Tensor,
                normalization: str | float = "token") -> torch.Tensor:
    """Sum of per_token [B, T] over response tokens divided as `normalization` says (module docstring)."""
    mask = response_mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if isinstance(normalization, (int, float)) and not isinstance(normalization, bool):
        if normalization <= 0:
            raise ValueError(f"a constant normalization must be > 0, got {normalization}")
        return total / normalization
    if normalization == "token":
        return total / mask.sum().clamp(min=1)
    if normalization == "sequence":
        lengths = mask.sum(dim=1)  # [B]
        per_seq = (per_token * mask).sum(dim=1) / lengths.clamp(min=1)  # [B]
        return per_seq.sum() / (lengths > 0).sum().clamp(min=1)
    if normalization == "none":
        return total
    raise ValueError(f"normalization must be one of {NORMALIZATIONS} or a positive number, got {normalization!r}")


def mispo_masks(old_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, response_mask: torch.Tensor,
                token_bounds: tuple[float, float] = (0.5, 2.0), traj_bounds: tuple[float, float] = (0.996, 1.001),
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MIS-PO keep decisions.

    Returns (keep [B, T] bool, token_ok [B, T] bool, traj_ok [B] bool, log_x [B, T]) where
    log_x = log pi_old - log mu, token_ok = lo <= x_t <= hi on response tokens, traj_ok = traj_lo <= rho <= traj_hi
    with log rho the mean of log_x over the sequence's response tokens (rho = 1 for an empty response),
    and keep = token_ok & traj_ok."""
    lo, hi = token_bounds
    tlo, thi = traj_bounds
    if not (0 < lo <= hi and 0 < tlo <= thi):
        raise ValueError(f"bounds must satisfy 0 < lo <= hi, got token_bounds={token_bounds}, "
                         f"traj_bounds={traj_bounds}")
    mask = response_mask.bool()
    log_x = (old_logprobs - behavior_logprobs).detach()  # [B, T], at least fp32 (bf16 would blur the window)
    log_x = log_x.to(torch.promote_types(log_x.dtype, torch.float32))
    log_x = torch.where(mask, log_x, torch.zeros_like(log_x))
    # Compare in log space: exp of a large log-ratio would overflow, the comparison is the same.
    token_ok = mask & (log_x >= math.log(lo)) & (log_x <= math.log(hi))
    lengths = mask.sum(dim=1)  # [B]
    log_rho = log_x.sum(dim=1) / lengths.clamp(min=1)  # [B]
    traj_ok = (log_rho >= math.log(tlo)) & (log_rho <= math.log(thi))
    return token_ok & traj_ok[:, None], token_ok, traj_ok, log_x


def mispo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor,
               advantages: torch.Tensor, response_mask: torch.Tensor,
               token_bounds: tuple[float, float] = (0.5, 2.0), traj_bounds: tuple[float, float] = (0.996, 1.001),
               normalization: str | float = "token") -> tuple[torch.Tensor, dict[str, float]]:
    """MIS-PO actor loss (module docstring). logprobs [B, T] carries the gradient; old_logprobs and
    behavior_logprobs [B, T] are pi_old and mu of the sampled tokens; advantages [B, T] or [B].

    stats: token_accept_rate (response tokens inside the token bounds), traj_accept_rate (sequences with a
    response inside the trajectory bounds), kept_fraction and kept_tokens (both filters), mean_abs_log_ratio
    (mean |log pi_old/mu| over response tokens, the staleness / mismatch signal), response_tokens."""
    shape = logprobs.shape
    for name, t in (("old_logprobs", old_logprobs), ("behavior_logprobs", behavior_logprobs),
                    ("response_mask", response_mask)):
        _check(name, t, shape)
    adv = _per_token(advantages, shape).detach()
    keep, token_ok, traj_ok, log_x = mispo_masks(old_logprobs, behavior_logprobs, response_mask,
                                                 token_bounds, traj_bounds)
    per_token = -(keep.to(logprobs.dtype) * adv.to(logprobs.dtype) * logprobs)  # [B, T]
    loss = reduce_loss(per_token, response_mask, normalization)

    mask = response_mask.bool()
    n_tok = int(mask.sum())
    has_response = mask.any(dim=1)  # [B]
    n_seq = int(has_response.sum())
    stats = {
        "token_accept_rate": token_ok.sum().item() / max(n_tok, 1),
        "traj_accept_rate": (traj_ok & has_response).sum().item() / max(n_seq, 1),
        "kept_tokens": float(keep.sum().item()),
        "kept_fraction": keep.sum().item() / max(n_tok, 1),
        "mean_abs_log_ratio": log_x.abs().sum().item() / max(n_tok, 1),
        "response_tokens": float(n_tok),
    }
    return loss, stats


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  response_mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                  normalization: str | float = "token") -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip baseline: - min(r A, clip(r, 1 - eps, 1 + eps_high) A) with r = pi_theta / pi_old.
    clip_eps_high None uses clip_eps (symmetric); a larger one is the "clip-higher" variant.
    stats: clip_fraction (response tokens whose clipped term was the active one), approx_kl (k3 estimate of
    KL(pi_old || pi_theta) over response tokens), ratio_mean."""
    shape = logprobs.shape
    _check("old_logprobs", old_logprobs, shape)
    _check("response_mask", response_mask, shape)
    adv = _per_token(advantages, shape).detach().to(logprobs.dtype)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv
    loss = reduce_loss(-torch.minimum(unclipped, clipped), response_mask, normalization)

    mask = response_mask.bool()
    n_tok = max(int(mask.sum()), 1)
    with torch.no_grad():
        active_clip = (clipped < unclipped) & mask
        stats = {
            "clip_fraction": active_clip.sum().item() / n_tok,
            "approx_kl": (kl_k3(old_logprobs, logprobs.detach()) * mask).sum().item() / n_tok,
            "ratio_mean": (ratio * mask).sum().item() / n_tok,
        }
    return loss, stats


def grpo_advantages(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages: rewards [num_prompts, k] (k samples of each prompt) ->
    (r - group mean) / (group std + eps), the population std (k = 1 gives 0, not NaN).
    std_normalize=False keeps only the mean baseline (the Dr. GRPO variant)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_prompts, samples_per_prompt], got shape {list(rewards.shape)}")
    r = rewards.float()
    centred = r - r.mean(dim=1, keepdim=True)
    if not std_normalize:
        return centred
    return centred / (r.std(dim=1, keepdim=True, unbiased=False) + eps)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) from tokens sampled from pi:
    exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased in expectation, low variance."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
               coef: float = 1e-3, normalization: str | float = "token") -> torch.Tensor:
    """coef * k3 KL to a frozen reference policy, reduced like the policy loss; add it to the actor loss
    (the report uses 0.001 in its final stage). The reference log-probs are detached."""
    _check("ref_logprobs", ref_logprobs, logprobs.shape)
    _check("response_mask", response_mask, logprobs.shape)
    return coef * reduce_loss(kl_k3(logprobs, ref_logprobs.detach()), response_mask, normalization)
