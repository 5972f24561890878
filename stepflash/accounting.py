"""Parameter, KV-cache and FLOP accounting for a config, and the `stepflash info` verb.

Counts come from the model itself, built on the meta device (no memory), so they can never drift from
what `Step35ForCausalLM` builds. FLOPs follow the usual method (and the report's Table 1): 2 FLOPs per
multiply-accumulate of every weight a token touches, plus attention score and value products over the
keys each query sees (all previous keys on full layers, at most `sliding_window` on sliding layers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from stepflash.config import FULL, SLIDING, Step35Config, resolve_config

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(cfg: Step35Config) -> dict:
    """total / trunk / per-MTP / active counts. `active_params` excludes embedding and lm_head."""
    from stepflash.model import Step35ForCausalLM

    with torch.device("meta"):
        model = Step35ForCausalLM(cfg)
    L = cfg.num_hidden_layers
    layers = model.model.layers
    embed, head = _numel(model.model.embed_tokens), _numel(model.lm_head)
    trunk = embed + head + _numel(model.model.norm) + sum(_numel(layer) for layer in layers[:L])
    mtp = [_numel(layer) for layer in layers[L:]]
    active = _numel(model.model.norm)
    for layer in layers[:L]:
        n = _numel(layer)
        if layer.is_moe:
            experts = sum(p.numel() for name, p in layer.moe.named_parameters() if name.endswith("_proj.weight"))
            n -= experts - experts * cfg.moe_top_k // cfg.moe_num_experts
        active += n
    return {
        "total_params": trunk + sum(mtp),
        "trunk_params": trunk,
        "mtp_params": sum(mtp),
        "mtp_params_per_module": mtp[0] if mtp else 0,
        "embedding_params": embed,
        "lm_head_params": head,
        "active_params": active,
        "active_params_with_head": active + head,
    }


def kv_bytes_per_layer_token(cfg: Step35Config, i: int, dtype: str | None = None) -> int:
    return 2 * cfg.num_kv_heads(i) * cfg.head_dim_of(i) * DTYPE_BYTES.get(dtype or cfg.torch_dtype, 2)


def kv_cache_bytes(cfg: Step35Config, context: int, dtype: str | None = None, include_mtp: bool = False) -> int:
    """Bytes of K and V held at `context` tokens: full layers keep all, sliding layers the last window."""
    n = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    return sum(kv_bytes_per_layer_token(cfg, i, dtype) * (min(context, cfg.sliding_window) if cfg.is_sliding(i) else context)
               for i in range(n))


def flops_per_token(cfg: Step35Config, context: int) -> dict:
    """FLOPs per token of the trunk + lm_head: decode at `context`, and prefill of `context` tokens
    averaged per token. MTP modules are not counted (they are optional at inference)."""
    counts = param_counts(cfg)
    matmul = 2 * counts["active_params_with_head"]
    decode_attn = prefill_attn = 0.0
    W = cfg.sliding_window
    for i in range(cfg.num_hidden_layers):
        per_key = 2 * 2 * cfg.num_heads(i) * cfg.head_dim_of(i)  # QK^T and AV, multiply-add = 2 FLOPs
        if cfg.is_sliding(i):
            decode_attn += per_key * min(context, W)
            capped = min(context, W)
            mean_keys = (capped * (capped + 1) / 2 + (context - capped) * W) / context
        else:
            decode_attn += per_key * context
            mean_keys = (context + 1) / 2
        prefill_attn += per_key * mean_keys
    return {"decode_flops": matmul + decode_attn, "prefill_flops": matmul + prefill_attn}


def layout_variants(cfg: Step35Config) -> dict[str, Step35Config]:
    """The report's Table 1 layouts at this config's size: FFFF, S1F1, S3F1 (equal heads) and S3F1 with
    more sliding heads (this config's sliding head count if larger, else 1.5x)."""
    L, n = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    full_heads = cfg.num_attention_heads
    more = cfg.num_heads(next((i for i in range(L) if cfg.is_sliding(i)), 0))
    if more <= full_heads:
        more = full_heads * 3 // 2 // cfg.num_attention_groups * cfg.num_attention_groups or full_heads
    out = {}
    for name, period, heads in (("FFFF", 1, full_heads), ("S1F1", 2, full_heads), ("S3F1", 4, full_heads),
                                ("S3F1+heads", 4, more)):
        types_ = [FULL if i % period == 0 else SLIDING for i in range(L)] + [SLIDING] * n
        other = dict(cfg.attention_other_setting or {}, num_attention_heads=heads)
        out[name] = cfg.replace(
            layer_types=types_, attention_other_setting=other,
            rope_theta=[5e6 if t == FULL else 1e4 for t in types_],
            partial_rotary_factors=[cfg.partial_rotary_factors[0] if t == FULL else 1.0 for t in types_])
    return out


REPORT_TABLE1 = {"FFFF": (2.68, 2.90), "S1F1": (1.58, 1.65), "S3F1": (1.00, 1.00), "S3F1+heads": (1.01, 1.02)}


def info(cfg: Step35Config, context: int) -> dict:
    out = param_counts(cfg)
    out["kv_bytes_per_token"] = sum(kv_bytes_per_layer_token(cfg, i) for i in range(cfg.num_hidden_layers))
    out["kv_bytes_per_token_at_context"] = kv_cache_bytes(cfg, context) / context
    out["kv_bytes_at_context"] = kv_cache_bytes(cfg, context)
    out["context"] = context
    out.update(flops_per_token(cfg, context))
    variants = {name: flops_per_token(v, context) for name, v in layout_variants(cfg).items()}
    base = variants["S3F1"]
    out["layouts"] = {name: {"decode_ratio": v["decode_flops"] / base["decode_flops"],
                             "prefill_ratio": v["prefill_flops"] / base["prefill_flops"],
                             "report_table1": REPORT_TABLE1[name]} for name, v in variants.items()}
    return out


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass
class InfoArgs:
    """Parameters, active parameters, KV-cache bytes and FLOPs of a preset or config.json."""

    config: str = field(metadata={"positional": True, "help": "preset (flash, small, tiny), config.json or checkpoint dir"})
    context: int = field(default=32768, metadata={"help": "context length for KV bytes and FLOPs"})
    json: bool = field(default=False, metadata={"help": "print one JSON object"})


def run(args: InfoArgs) -> int:
    cfg = resolve_config(args.config)
    if args.context <= 0:
        from stepflash.errors import UserError

        raise UserError(f"--context must be positive, got {args.context}")
    d = info(cfg, args.context)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    n_mtp = cfg.num_nextn_predict_layers
    print(f"config: {args.config}   layers {cfg.num_hidden_layers} (+{n_mtp} MTP), hidden {cfg.hidden_size}, "
          f"experts {cfg.moe_num_experts} top-{cfg.moe_top_k}, window {cfg.sliding_window}")
    print(f"  trunk params (with embedding + head): {_fmt(d['trunk_params'])}")
    print(f"  MTP params: {_fmt(d['mtp_params'])} ({n_mtp} x {_fmt(d['mtp_params_per_module'])})")
    print(f"  total params (whole checkpoint):      {_fmt(d['total_params'])}")
    print(f"  active params per token: {_fmt(d['active_params'])} (no embedding/head), "
          f"{_fmt(d['active_params_with_head'])} with lm_head")
    print(f"  KV cache: {_bytes(d['kv_bytes_per_token'])}/token uncapped; at {args.context} tokens "
          f"{_bytes(d['kv_bytes_at_context'])} ({_bytes(d['kv_bytes_per_token_at_context'])}/token, sliding layers capped)")
    print(f"  FLOPs/token at context {args.context}: decode {_fmt(d['decode_flops'])}, prefill {_fmt(d['prefill_flops'])}")
    print("  layout       decode/S3F1  prefill/S3F1   report Table 1 (30B-A3B)")
    for name, v in d["layouts"].items():
        r = v["report_table1"]
        print(f"  {name:<12} {v['decode_ratio']:>10.2f}  {v['prefill_ratio']:>12.2f}   {r[0]:.2f} / {r[1]:.2f}")
    return 0
