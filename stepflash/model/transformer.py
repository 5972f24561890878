"""Step 3.5 Flash: the decoder, its three MTP modules and the LM head, in the release's module names.

Architecture (every number from `Step35Config`):
- 45 pre-norm decoder layers, attention laid out S3F1: one full-attention layer then three sliding-window
  layers (window 512), with more query heads on sliding layers (96 vs 64) and 8 KV heads everywhere;
- attention: q/k per-head RMSNorm, partial NeoX RoPE (half the dims and llama3 scaling on full layers),
  GQA, a sigmoid gate per query head before o_proj;
- FFN: dense SwiGLU on the first layers, then a shared expert plus 288 routed experts (top-8, sigmoid
  router with a selection-only bias), SwiGLU clamps on the last layers;
- zero-centred RMSNorm everywhere; untied lm_head; no logit soft-cap, no embedding scale;
- 3 chained MTP modules stored as layers 45..47: module j predicts token t+2+j from position t.

The state dict names are the checkpoint's (`model.layers.{i}.self_attn.q_proj.weight`, ...,
`model.layers.45.transformer.shared_head.output.weight`). Projections that read the same input are one
parameter (q/k/v/gate, a SwiGLU's gate/up); `model/fused.py` maps them to and from the release names.
The model is built on whatever device is current; on "meta" it takes no memory (see `checkpoint.py`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stepflash.config import Step35Config
from stepflash.model.attention import Attention
from stepflash.model.fused import ReleaseNames
from stepflash.model.moe import MoE, StackedWeight, SwiGLU
from stepflash.model.norm import RMSNorm
from stepflash.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Step35Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe(layer_idx)
        if self.is_moe:
            self.moe = MoE(cfg, layer_idx)
            self.share_expert = SwiGLU(cfg.hidden_size, cfg.share_expert_dim, cfg.swiglu_limits_shared[layer_idx])
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.swiglu_limits_shared[layer_idx])

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.share_expert(x) + self.moe(x) if self.is_moe else self.mlp(x)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache=None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache)
        return h + self.ffn(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    def __init__(self, cfg: Step35Config):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class MTPLayer(DecoderLayer):
    """MTP module j: `z = decoder_layer(eh_proj(cat[enorm(embed(next_token)), hnorm(h_prev)]))`, then
    logits from its own head. `block` is z alone: drafting needs the head at one position per row."""

    def __init__(self, cfg: Step35Config, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.transformer = nn.Module()
        self.transformer.shared_head = SharedHead(cfg)

    def block(self, emb_next: torch.Tensor, h_prev: torch.Tensor, cos, sin, kv_cache=None) -> torch.Tensor:
        """emb_next, h_prev [B, T, hidden] -> z [B, T, hidden]."""
        z = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return super().forward(z, cos, sin, kv_cache)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        head = self.transformer.shared_head
        return head.output(head.norm(z))

    def forward(self, emb_next: torch.Tensor, h_prev: torch.Tensor, cos, sin, kv_cache=None):
        # Training calls the layer (not block/head) so that FSDP's forward hooks gather its weights.
        z = self.block(emb_next, h_prev, cos, sin, kv_cache)
        return z, self.head(z)


class Step35Model(nn.Module):
    def __init__(self, cfg: Step35Config):
        super().__init__()
        L, n = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, i) for i in range(L)] + [MTPLayer(cfg, L + j) for j in range(n)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Step35ForCausalLM(nn.Module):
    def __init__(self, cfg: Step35Config):
        super().__init__()
        self.config = cfg
        self.model = Step35Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # One rotary table per distinct (theta, rotary_dim, scaling); layer i uses self.rope_of[i].
        specs, self.rope_of = [], []
        for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
            spec = (float(cfg.rope_theta[i]), cfg.rotary_dim(i), cfg.rope_scaling_for(i))
            if spec not in specs:
                specs.append(spec)
            self.rope_of.append(specs.index(spec))
        self.rotary = nn.ModuleList([RotaryEmbedding(*s) for s in specs])
        if not self.lm_head.weight.is_meta:  # on meta there is nothing to initialise (checkpoint loads assign)
            self.init_weights()

    # ---- parts -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.num_layers:])

    def rope_tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [rot(position_ids, dtype) for rot in self.rotary]

    @staticmethod
    def default_positions(input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        b, t = input_ids.shape
        return torch.arange(start, start + t, device=input_ids.device).expand(b, t)

    def trunk(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache=None,
              inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] -> last hidden state [B, T, hidden] before `model.norm` (what MTP module 0 reads)."""
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = self.default_positions(h[..., 0])
        tables = self.rope_tables(position_ids, h.dtype)
        for i, layer in enumerate(self.model.layers[: self.num_layers]):
            cos, sin = tables[self.rope_of[i]]
            h = layer(h, cos, sin, kv_cache)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h))

    def _mtp_inputs(self, j: int, next_ids: torch.Tensor, h_prev: torch.Tensor, position_ids: torch.Tensor | None):
        layer = self.model.layers[self.num_layers + j]
        if position_ids is None:
            position_ids = self.default_positions(next_ids)
        cos, sin = self.rotary[self.rope_of[self.num_layers + j]](position_ids, h_prev.dtype)
        return layer, self.model.embed_tokens(next_ids), cos, sin

    def mtp(self, j: int, next_ids: torch.Tensor, h_prev: torch.Tensor, position_ids: torch.Tensor | None = None,
            kv_cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module j: next_ids [B, T] (the token after each position of h_prev, for module 0; j tokens
        further for module j), h_prev [B, T, hidden] (trunk output for j = 0, module j-1's z otherwise)
        -> (z [B, T, hidden], logits [B, T, vocab]) predicting the token after next_ids."""
        layer, emb, cos, sin = self._mtp_inputs(j, next_ids, h_prev, position_ids)
        return layer(emb, h_prev, cos, sin, kv_cache)

    def mtp_block(self, j: int, next_ids: torch.Tensor, h_prev: torch.Tensor, position_ids: torch.Tensor | None = None,
                  kv_cache=None) -> torch.Tensor:
        """`mtp` without the head: z [B, T, hidden] only (for drafting)."""
        layer, emb, cos, sin = self._mtp_inputs(j, next_ids, h_prev, position_ids)
        return layer.block(emb, h_prev, cos, sin, kv_cache)

    def mtp_head(self, j: int, z: torch.Tensor) -> torch.Tensor:
        """MTP module j's own head: z [..., hidden] -> logits [..., vocab]."""
        return self.model.layers[self.num_layers + j].head(z)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] of the main head."""
        return self.head(self.trunk(input_ids, position_ids, kv_cache))

    def mtp_logits(self, input_ids: torch.Tensor, h: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """Teacher-forced MTP chain over a training sequence input_ids [B, T], h = trunk(input_ids), through
        the first `depth` modules (all by default). Element j is [B, T-1-j, vocab]; element j at position t
        scores input_ids[:, t + 2 + j], so its targets are input_ids[:, 2 + j:] against logits[j][:, : T - 2 - j]."""
        out, t = [], input_ids.shape[1]
        pos = self.default_positions(input_ids)
        n = len(self.mtp_layers) if depth is None else min(depth, len(self.mtp_layers))
        for j in range(n):
            if t - 1 - j <= 0:
                break
            h, logits = self.mtp(j, input_ids[:, 1 + j:], h[:, : t - 1 - j], pos[:, : t - 1 - j])
            out.append(logits)
        return out

    # ---- initialisation and accounting ------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, std) for matrices, output projections scaled by 1/sqrt(2 * layers), norms at zero
        (= unit scale, norms are zero-centred), router bias at zero."""
        std = self.config.initializer_range if std is None else std
        out_std = std / math.sqrt(2 * max(1, self.num_layers))
        done = set()  # fused projections are drawn part by part, in the release's order, from their owner
        for name, mod in self.named_modules():
            if isinstance(mod, ReleaseNames):
                for part, weight in mod.release_weights():
                    nn.init.normal_(weight, 0.0, out_std if part in ("o_proj", "down_proj") else std)
                done.update(id(m) for m in mod.children())
            elif isinstance(mod, (nn.Linear, nn.Embedding, StackedWeight)) and id(mod) not in done:
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(mod.weight, 0.0, out_std if is_out else std)
            elif isinstance(mod, RMSNorm):
                mod.reset_parameters()
            elif isinstance(mod, MoE):
                mod.router_bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def moe_modules(self) -> list[MoE]:
        return [layer.moe for layer in self.model.layers if getattr(layer, "is_moe", False)]
