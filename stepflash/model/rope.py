"""Rotary position embedding: NeoX rotate-half on the first `rotary_dim` dims of each head.

Full-attention layers use theta 5e6, half the head dims and llama3 frequency scaling; sliding layers
use theta 1e4 on all dims and no scaling. All of it comes from the config, per layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(theta: float, rotary_dim: int, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] in fp32, with llama3 scaling when `scaling` asks for it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for one (theta, rotary_dim, scaling) triple. inv_freq is derived, never stored,
    so the module is free on the meta device and needs nothing from a checkpoint."""

    def __init__(self, theta: float, rotary_dim: int, scaling: dict | None = None):
        super().__init__()
        self.theta, self.rotary_dim, self.scaling = theta, rotary_dim, scaling
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self, device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.theta, self.rotary_dim, self.scaling).to(device)
        return self._inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [batch, seq] -> cos, sin [batch, seq, rotary_dim]."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)  # [B, T, rd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, seq, heads, head_dim]; cos/sin [batch, seq, rotary_dim]. Dims past rotary_dim pass through."""
    rd = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out
