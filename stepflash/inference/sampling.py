"""Turning logits into the distribution a token is drawn from, and drawing it reproducibly.

Every row of a batch carries its own settings (temperature, top-k, top-p) and its own random stream:
a request's `torch.Generator` gives the uniforms, and a token is drawn by inverting the CDF with one
uniform, so a request samples the same tokens alone or in any batch. Temperature 0 means greedy: the
"distribution" is one-hot on the argmax of the raw logits, which lets speculative decoding use one
accept/reject rule for greedy and sampled rows alike.
"""

from __future__ import annotations

import torch


def row_params(params: list, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SamplingParams of each row -> temperature [b] fp32, top_k [b] long, top_p [b] fp32 on `device`."""
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    return temp, top_k, top_p


def target_probs(logits: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [N, V], per-row settings [N] -> probabilities [N, V] fp32 after temperature, top-k, top-p.

    top-k keeps the k largest logits (ties at the k-th kept); top-p keeps the smallest most-likely
    set whose mass reaches p (the token that crosses p is kept). Greedy rows (temp 0) are one-hot."""
    logits = logits.float()
    greedy = temp <= 0
    if bool(greedy.all()):
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    scaled = logits / torch.where(greedy, 1.0, temp)[:, None]
    if bool((top_k > 0).any()):
        k = top_k.clamp(min=1, max=logits.shape[-1])
        kth = scaled.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])  # [N, 1]
        kth = torch.where((top_k > 0)[:, None], kth, float("-inf"))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if bool((top_p < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # [N, V] mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p[:, None]
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [N, V] (rows need not sum to one), u [N] uniforms in [0, 1) -> token ids [N] by inverse CDF.

    A zero-probability token is never returned: the CDF does not rise across it."""
    cdf = probs.double().cumsum(-1)  # [N, V]
    x = u.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return ids.clamp(max=probs.shape[-1] - 1)


def uniforms(generators: list[torch.Generator | None], counts: list[int], width: int, device) -> torch.Tensor:
    """counts[r] uniforms from row r's generator, zero-padded to [b, width] fp64; rows without a
    generator (greedy) draw nothing and get zeros, so a request's stream never depends on its batch."""
    out = torch.zeros(len(generators), width, dtype=torch.float64)
    for r, (g, n) in enumerate(zip(generators, counts)):
        if g is not None and n > 0:
            out[r, :n] = torch.rand(n, generator=g, dtype=torch.float64)
    return out.to(device)


def token_logprobs(logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """Log-probability of ids [N] under the distribution sampled from: probs for sampled rows, the
    log-softmax of the raw logits [N, V] for greedy rows (greedy [N] bool)."""
    raw = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, None]).squeeze(-1)
    sampled = probs.gather(-1, ids[:, None]).squeeze(-1).log()
    return torch.where(greedy, raw, sampled)
