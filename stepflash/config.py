"""Step35Config: one dataclass mirroring the release's config.json, plus named presets.

Field names and value shapes are exactly those of `stepfun-ai/Step-3.5-Flash/config.json`, so a
release config loads with `Step35Config.from_json(path)` and `to_dict()` writes one back in the same
form (48-entry per-layer lists ending with the 3 MTP entries, `moe_layers_enum` as a comma string,
`attention_other_setting` for the sliding layers). Keys we do not model are kept in `extra` and
written back unchanged. Every structural value is read from here; nothing is hard-coded in the model.
`to_dict` writes every field, including switches the release leaves to defaults (`norm_expert_weight`,
`max_seq_len`), because vLLM, SGLang and llama.cpp default them differently (docs/peers.md).

Presets: `flash` (the release), `small` (a ~37M-parameter CPU-trainable demo keeping every feature)
and `tiny` (unit tests).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"


class ConfigError(ValueError):
    """A config that contradicts itself or the release layout; the message names the field."""


@dataclass
class Step35Config:
    hidden_size: int = 4096
    num_hidden_layers: int = 45
    num_nextn_predict_layers: int = 3
    vocab_size: int = 128896
    # One entry per trunk layer then one per MTP layer (45 + 3 in the release).
    layer_types: list[str] = field(default_factory=lambda: ([FULL] + [SLIDING] * 3) * 12)
    num_attention_heads: int = 64  # full-attention layers
    num_attention_groups: int = 8  # KV heads
    head_dim: int = 128
    attention_other_setting: dict | None = field(default_factory=lambda: {
        "attention_type": SLIDING, "num_attention_heads": 96, "num_attention_groups": 8, "head_dim": 128})
    sliding_window: int = 512
    rope_theta: Any = field(default_factory=lambda: [5e6 if i % 4 == 0 and i < 45 else 1e4 for i in range(48)])
    partial_rotary_factors: list[float] = field(
        default_factory=lambda: [0.5 if i % 4 == 0 and i < 45 else 1.0 for i in range(48)])
    rope_scaling: dict | None = field(default_factory=lambda: {
        "rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 131072,
        "low_freq_factor": 1.0, "high_freq_factor": 32.0})
    yarn_only_types: list[str] = field(default_factory=lambda: [FULL])
    max_position_embeddings: int = 262144
    # The context peers serve. None means max_position_embeddings; to_dict writes it either way, since vLLM
    # defaults an absent max_seq_len to 4096 and SGLang to 128000 (docs/peers.md).
    max_seq_len: int | None = None
    intermediate_size: int = 11264
    moe_layers_enum: str = ",".join(str(i) for i in range(3, 45))
    moe_num_experts: int = 288
    moe_top_k: int = 8
    moe_intermediate_size: int = 1280
    share_expert_dim: int = 1280
    moe_router_activation: str = "sigmoid"
    use_moe_router_bias: bool = True
    need_fp32_gate: bool = True
    moe_router_scaling_factor: float = 3.0
    # Renormalise the chosen experts' weights to sum 1 before scaling. Always true here; written out because
    # llama.cpp reads an absent key as false (a different model) while vLLM and SGLang read it as true.
    norm_expert_weight: bool = True
    use_head_wise_attn_gate: bool = True
    use_qk_norm: bool = True
    zero_centered: bool = True
    swiglu_limits: list[float] = field(default_factory=lambda: [7.0 if i in (43, 44) else 0.0 for i in range(48)])
    swiglu_limits_shared: list[float] = field(default_factory=lambda: [16.0 if i == 44 else 0.0 for i in range(48)])
    rms_norm_eps: float = 1e-5
    bos_token_id: int = 0
    eos_token_id: Any = field(default_factory=lambda: [1, 2, 128007])
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    initializer_range: float = 0.02
    model_type: str = "step3p5"
    architectures: list[str] = field(default_factory=lambda: ["Step3p5ForCausalLM"])
    extra: dict = field(default_factory=dict)  # unmodelled keys of a loaded config.json, written back as-is

    def __post_init__(self):
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        L, n = self.num_hidden_layers, self.num_nextn_predict_layers
        total = L + n

        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        for name in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                     "num_attention_groups", "head_dim", "intermediate_size", "max_position_embeddings"):
            need(int(getattr(self, name)) > 0, f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(n >= 0, f"num_nextn_predict_layers must be >= 0, got {n}")
        need(self.sliding_window > 0, f"sliding_window must be > 0, got {self.sliding_window}")
        need(self.max_seq_len is None or 0 < int(self.max_seq_len) <= self.max_position_embeddings,
             f"max_seq_len must be in 1..max_position_embeddings ({self.max_position_embeddings}), "
             f"got {self.max_seq_len!r}")
        if not isinstance(self.rope_theta, list):
            self.rope_theta = [float(self.rope_theta)] * total
        for name in ("layer_types", "rope_theta", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared"):
            value = getattr(self, name)
            need(isinstance(value, list) and len(value) == total,
                 f"{name} must have num_hidden_layers + num_nextn_predict_layers = {total} entries, "
                 f"got {len(value) if isinstance(value, list) else type(value).__name__}")
        for i, t in enumerate(self.layer_types):
            need(t in (FULL, SLIDING), f"layer_types[{i}] must be {FULL!r} or {SLIDING!r}, got {t!r}")
        for i in range(total):
            need(self.num_heads(i) % self.num_kv_heads(i) == 0,
                 f"attention heads ({self.num_heads(i)}) of layer {i} must be divisible by its KV heads "
                 f"({self.num_kv_heads(i)}) (num_attention_heads / attention_other_setting vs num_attention_groups)")
            rd = self.rotary_dim(i)
            need(0 < rd <= self.head_dim_of(i) and rd % 2 == 0,
                 f"partial_rotary_factors[{i}] gives rotary dim {rd}; it must be even and in (0, head_dim]")
            need(self.rope_theta[i] > 0, f"rope_theta[{i}] must be > 0, got {self.rope_theta[i]}")
            need(self.swiglu_limits[i] >= 0 and self.swiglu_limits_shared[i] >= 0,
                 f"swiglu_limits[{i}] / swiglu_limits_shared[{i}] must be >= 0 (0 means no clamp)")
        try:
            moe = self.moe_layers
        except ValueError:
            raise ConfigError(f"moe_layers_enum must be comma-separated layer indices, got {self.moe_layers_enum!r}")
        need(all(0 <= i < L for i in moe), f"moe_layers_enum names layers outside 0..{L - 1}: {sorted(moe)}")
        if moe:
            need(self.moe_num_experts > 0, f"moe_num_experts must be > 0, got {self.moe_num_experts}")
            need(0 < self.moe_top_k <= self.moe_num_experts,
                 f"moe_top_k ({self.moe_top_k}) must be in 1..moe_num_experts ({self.moe_num_experts})")
            need(self.moe_intermediate_size > 0 and self.share_expert_dim > 0,
                 "moe_intermediate_size and share_expert_dim must be > 0")
            need(self.moe_router_activation == "sigmoid",
                 f"moe_router_activation {self.moe_router_activation!r} is not supported (only 'sigmoid')")
            need(self.norm_expert_weight is True,
                 "norm_expert_weight=false is not supported (the router always renormalises the top-k weights)")
        if self.rope_scaling is not None:
            rt = self.rope_scaling_type
            need(rt in ("llama3", "default"), f"rope_scaling.rope_type {rt!r} is not supported (llama3 or default)")
            if rt == "llama3":
                for k in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
                    need(k in self.rope_scaling, f"rope_scaling is missing {k!r} for llama3 scaling")
                need(self.rope_scaling["high_freq_factor"] > self.rope_scaling["low_freq_factor"],
                     "rope_scaling.high_freq_factor must be greater than low_freq_factor")
        need(self.zero_centered, "zero_centered=false (plain RMSNorm) is not supported")
        need(self.use_qk_norm, "use_qk_norm=false is not supported")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    # ---- per-layer views (layer index i covers trunk 0..L-1 and MTP L..L+n-1) ------------------
    @property
    def moe_layers(self) -> set[int]:
        s = self.moe_layers_enum
        items = s.split(",") if isinstance(s, str) else list(s)
        return {int(x) for x in items if str(x).strip()}

    def is_moe(self, i: int) -> bool:
        return i < self.num_hidden_layers and i in self.moe_layers  # MTP layers are dense

    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == SLIDING

    def _other(self, key: str, default):
        other = self.attention_other_setting or {}
        return other.get(key, default)

    def num_heads(self, i: int) -> int:
        return self._other("num_attention_heads", self.num_attention_heads) if self.is_sliding(i) else self.num_attention_heads

    def num_kv_heads(self, i: int) -> int:
        return self._other("num_attention_groups", self.num_attention_groups) if self.is_sliding(i) else self.num_attention_groups

    def head_dim_of(self, i: int) -> int:
        return self._other("head_dim", self.head_dim) if self.is_sliding(i) else self.head_dim

    def rotary_dim(self, i: int) -> int:
        return int(self.head_dim_of(i) * self.partial_rotary_factors[i])

    @property
    def rope_scaling_type(self) -> str | None:
        """rope_scaling's type ("llama3", "default") or None without scaling; old configs spell the key `type`."""
        if self.rope_scaling is None:
            return None
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))

    def rope_scaling_for(self, i: int) -> dict | None:
        """llama3 scaling applies only to the layer types named in `yarn_only_types` (full layers)."""
        if self.rope_scaling is None or self.layer_types[i] not in (self.yarn_only_types or [FULL]):
            return None
        return self.rope_scaling

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return list(e) if isinstance(e, (list, tuple)) else ([] if e is None else [int(e)])

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every field, so that no switch is left to a peer's default (docs/peers.md lists those defaults)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "initializer_range")}
        d["max_seq_len"] = self.context_length
        d.update(self.extra)
        return d

    @property
    def context_length(self) -> int:
        return int(self.max_seq_len or self.max_position_embeddings)

    @classmethod
    def from_dict(cls, d: dict) -> "Step35Config":
        d = dict(d)
        if "text_config" in d and isinstance(d["text_config"], dict):  # multimodal wrapper: take the text model
            d = dict(d["text_config"])
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if "num_attention_groups" not in known and "num_key_value_heads" in extra:
            known["num_attention_groups"] = extra.pop("num_key_value_heads")
        if known.get("max_seq_len") == known.get("max_position_embeddings", cls.max_position_embeddings):
            known.pop("max_seq_len")  # the usual case: follow max_position_embeddings through later replace()s
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str) -> "Step35Config":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json at {path}")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}")
        return cls.from_dict(d)

    def save_json(self, path: str) -> None:
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def replace(self, **changes) -> "Step35Config":
        return dataclasses.replace(self, **changes)


# ---- presets ----------------------------------------------------------------------------------

def _layout(num_layers: int, period: int = 4) -> list[str]:
    """S3F1 and friends: one full layer every `period` layers, starting with a full layer."""
    return [FULL if i % period == 0 else SLIDING for i in range(num_layers)]


def make_config(num_layers: int, hidden: int, *, layout: list[str] | None = None, full_heads: int, sliding_heads: int,
                kv_heads: int, head_dim: int, window: int, vocab: int, inter: int, experts: int, top_k: int,
                moe_inter: int, dense_layers: int = 1, mtp: int = 3, max_pos: int = 4096,
                rope_original: int = 1024, routed_limit: float = 7.0, shared_limit: float = 16.0) -> Step35Config:
    """A release-shaped config at any size: per-layer lists of length num_layers + mtp, clamps on the last
    trunk layers (as the release clamps layers 43-44), llama3 scaling on full layers."""
    types_ = (layout or _layout(num_layers)) + [SLIDING] * mtp
    total = num_layers + mtp
    return Step35Config(
        hidden_size=hidden, num_hidden_layers=num_layers, num_nextn_predict_layers=mtp, vocab_size=vocab,
        layer_types=types_, num_attention_heads=full_heads, num_attention_groups=kv_heads, head_dim=head_dim,
        attention_other_setting={"attention_type": SLIDING, "num_attention_heads": sliding_heads,
                                 "num_attention_groups": kv_heads, "head_dim": head_dim},
        sliding_window=window,
        rope_theta=[5e6 if t == FULL else 1e4 for t in types_],
        partial_rotary_factors=[0.5 if t == FULL else 1.0 for t in types_],
        rope_scaling={"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": rope_original,
                      "low_freq_factor": 1.0, "high_freq_factor": 32.0},
        max_position_embeddings=max_pos, intermediate_size=inter,
        moe_layers_enum=",".join(str(i) for i in range(dense_layers, num_layers)),
        moe_num_experts=experts, moe_top_k=top_k, moe_intermediate_size=moe_inter, share_expert_dim=moe_inter,
        swiglu_limits=[routed_limit if i == num_layers - 1 else 0.0 for i in range(total)],
        swiglu_limits_shared=[shared_limit if i == num_layers - 1 else 0.0 for i in range(total)],
        bos_token_id=0, eos_token_id=[1], torch_dtype="float32",
    )


def flash() -> Step35Config:
    return Step35Config()


def small() -> Step35Config:
    """~37M parameters (~9M active): trains on 2 CPU cores in minutes, every architectural feature on."""
    return make_config(8, 256, full_heads=4, sliding_heads=6, kv_heads=2, head_dim=64, window=128, vocab=8192,
                       inter=768, experts=32, top_k=4, moe_inter=128, dense_layers=1, max_pos=4096, rope_original=1024)


def tiny() -> Step35Config:
    """For tests: hidden 64, 4 layers (F S S S), 8 experts top-2, window 8, vocab 256."""
    return make_config(4, 64, full_heads=4, sliding_heads=8, kv_heads=2, head_dim=16, window=8, vocab=256,
                       inter=96, experts=8, top_k=2, moe_inter=32, dense_layers=1, max_pos=512, rope_original=32)


PRESETS = {"flash": flash, "small": small, "tiny": tiny}


def resolve_config(name_or_path: str) -> Step35Config:
    """A preset name, a config.json, or a checkpoint directory holding one."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if os.path.exists(name_or_path):
        return Step35Config.from_json(name_or_path)
    raise ConfigError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an existing config path")

