"""Grouped-query attention with per-head q/k RMSNorm, partial RoPE and a sigmoid gate per query head.

One class serves full and sliding layers; the difference is the mask (causal, or causal with a window
of `sliding_window` keys including the query itself: key k is visible from query q iff q - W < k <= q)
and the head count (the release has 64 heads on full layers, 96 on sliding ones, 8 KV heads on both).

KV caching is delegated to a cache object so that the model file stays free of inference policy:
`k, v, mask = kv_cache.update(layer_idx, k, v)` takes this step's keys/values [batch, kv_heads, seq, dim]
and returns every key/value the queries may see plus a boolean mask broadcastable to
[batch, heads, seq, keys] (True = attend), or mask None for plain causal attention over k/v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stepflash.config import Step35Config
from stepflash.model.fused import FusedLinear, ReleaseNames, keep_release_names
from stepflash.model.norm import RMSNorm
from stepflash.model.rope import apply_rope


def causal_mask(q_len: int, k_len: int, window: int | None, device) -> torch.Tensor:
    """Bool [q_len, k_len] for queries at the last q_len of k_len positions (True = attend)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class Attention(ReleaseNames, nn.Module):
    """q, k, v and the head gate come out of one product (`qkvg_proj`, rows in that order); the state
    dict still holds the release's `q_proj`, `k_proj`, `v_proj`, `g_proj` (see `model/fused.py`)."""

    RELEASE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj")

    def __init__(self, cfg: Step35Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads(layer_idx)
        self.num_kv_heads = cfg.num_kv_heads(layer_idx)
        self.head_dim = cfg.head_dim_of(layer_idx)
        self.sliding_window = cfg.sliding_window if cfg.is_sliding(layer_idx) else None
        self.use_gate = cfg.use_head_wise_attn_gate
        h, d = cfg.hidden_size, self.head_dim
        parts = {"q_proj": self.num_heads * d, "k_proj": self.num_kv_heads * d, "v_proj": self.num_kv_heads * d}
        if self.use_gate:
            parts["g_proj"] = self.num_heads
        self.qkvg_proj = FusedLinear(h, parts)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        keep_release_names(self)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache=None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v, *gate = self.qkvg_proj.split(self.qkvg_proj(x))
        q = self.q_norm(q.view(b, t, self.num_heads, self.head_dim))  # [B, T, H, D]
        k = self.k_norm(k.view(b, t, self.num_kv_heads, self.head_dim))  # [B, T, Hkv, D]
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if kv_cache is not None:
            k, v, mask = kv_cache.update(self.layer_idx, k, v)
        else:
            mask = None
        if mask is None and self.sliding_window is not None and k.shape[2] > self.sliding_window:
            mask = causal_mask(t, k.shape[2], self.sliding_window, x.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
            scale=self.head_dim ** -0.5, enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, H, T, D]
        out = out.transpose(1, 2)  # [B, T, H, D]
        if self.use_gate and gate:
            out = out * torch.sigmoid(gate[0]).unsqueeze(-1)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
