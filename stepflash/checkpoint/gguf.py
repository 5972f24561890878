"""GGUF export: a stepflash checkpoint as llama.cpp's `step35` model (what Ollama and LM Studio run).

`export_gguf(src, out, dtype)` writes one .gguf file with the `gguf` package (the writer llama.cpp
publishes). What llama.cpp reads, learned from its own converter (`conversion/step3.py`) and loader
(`src/models/step35.cpp`) in the llama.cpp vendored by llama-cpp-python 0.3.36:
- tensors under GGUF's names (`gguf.TENSOR_NAMES`). Shapes need no transposing: a torch [out, in] is
  ggml's {in, out}, and the stacked experts [E, out, in] are ggml's {in, out, E}. Every RMSNorm weight is
  stored as 1 + w (ggml's RMSNorm multiplies by the weight; ours is zero-centred). The router bias is
  `exp_probs_b.bias`; the MTP layers L.. are ordinary blocks plus `blk.N.nextn.*`; llama3 RoPE scaling is
  one `rope_freqs.weight` of per-frequency divisors, which llama.cpp applies on full-attention layers only;
- hyper-parameters under `step35.*`: per-layer head counts and sliding pattern over trunk + MTP, the two
  rope bases, the clamps, and the routing switches stated explicitly (sigmoid, renormalise, scale):
  llama.cpp reads an absent `expert_weights_norm` as false, a different model;
- the tokenizer as GPT-2 byte-level BPE (vocab, merges, special tokens as control tokens, bos/eos/pad,
  `<|im_end|>` as end of turn) and the checkpoint's chat template (docs/gguf.md).

llama.cpp's step35 graph has fixed assumptions that stepflash configs can break; such configs are refused
with one line (`check_exportable`). Tensors are streamed: read, converted and appended one at a time, so
memory holds one tensor, and the file appears under its name only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import gguf  # the PyPI package (absolute import), not this module
import numpy as np
import torch
from tqdm import tqdm

from stepflash.config import FULL, SLIDING, Step35Config
from stepflash.errors import UserError

ARCH = "step35"
T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType
# --dtype -> (storage type of weight matrices, file type recorded in general.file_type)
GGUF_DTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
               "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
_GLOBAL = {"model.embed_tokens.weight": T.TOKEN_EMBD, "model.norm.weight": T.OUTPUT_NORM, "lm_head.weight": T.OUTPUT}
_PER_LAYER = {  # release name after `model.layers.{i}.` -> GGUF tensor
    "input_layernorm.weight": T.ATTN_NORM, "post_attention_layernorm.weight": T.FFN_NORM,
    "self_attn.q_proj.weight": T.ATTN_Q, "self_attn.k_proj.weight": T.ATTN_K, "self_attn.v_proj.weight": T.ATTN_V,
    "self_attn.o_proj.weight": T.ATTN_OUT, "self_attn.g_proj.weight": T.ATTN_GATE,
    "self_attn.q_norm.weight": T.ATTN_Q_NORM, "self_attn.k_norm.weight": T.ATTN_K_NORM,
    "mlp.gate_proj.weight": T.FFN_GATE, "mlp.up_proj.weight": T.FFN_UP, "mlp.down_proj.weight": T.FFN_DOWN,
    "moe.gate.weight": T.FFN_GATE_INP, "moe.router_bias": T.FFN_EXP_PROBS_B,
    "moe.gate_proj.weight": T.FFN_GATE_EXP, "moe.up_proj.weight": T.FFN_UP_EXP, "moe.down_proj.weight": T.FFN_DOWN_EXP,
    "share_expert.gate_proj.weight": T.FFN_GATE_SHEXP, "share_expert.up_proj.weight": T.FFN_UP_SHEXP,
    "share_expert.down_proj.weight": T.FFN_DOWN_SHEXP,
    # MTP layers only
    "eh_proj.weight": T.NEXTN_EH_PROJ, "enorm.weight": T.NEXTN_ENORM, "hnorm.weight": T.NEXTN_HNORM,
    "transformer.shared_head.norm.weight": T.NEXTN_SHARED_HEAD_NORM,
    "transformer.shared_head.output.weight": T.NEXTN_SHARED_HEAD_HEAD,
}
_ALWAYS_F32 = (T.FFN_GATE_INP, T.FFN_EXP_PROBS_B, T.ROPE_FREQS)  # the router runs in fp32 (need_fp32_gate)

# name -> (shape, loader): what the writer needs before reading anything, and how to read it.
TensorSource = dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]


def gguf_name(release_name: str) -> tuple[gguf.MODEL_TENSOR, str] | None:
    """A release tensor name -> (GGUF tensor kind, GGUF name), or None if llama.cpp has no such tensor."""
    if release_name in _GLOBAL:
        kind = _GLOBAL[release_name]
        return kind, gguf.TENSOR_NAMES[kind] + ".weight"
    prefix, _, rest = release_name.partition("model.layers.")
    layer, _, suffix = rest.partition(".")
    if prefix or not layer.isdigit() or suffix not in _PER_LAYER:
        return None
    kind = _PER_LAYER[suffix]
    return kind, gguf.TENSOR_NAMES[kind].format(bid=int(layer)) + (".bias" if kind == T.FFN_EXP_PROBS_B else ".weight")


def is_norm(release_name: str) -> bool:
    """Zero-centred RMSNorm weights, stored in GGUF as 1 + w."""
    return release_name.endswith("norm.weight")


def check_exportable(cfg: Step35Config) -> None:
    """Refuse, in one line, what llama.cpp's step35 graph cannot express."""
    total = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if len({cfg.head_dim_of(i) for i in range(total)}) != 1:
        raise UserError("llama.cpp's step35 needs one head_dim for full and sliding layers "
                        "(attention_other_setting.head_dim differs from head_dim)")
    for i in range(total):
        want = 1.0 if cfg.is_sliding(i) else 0.5  # step35 halves the rotary dims of full layers, always
        if cfg.partial_rotary_factors[i] != want:
            raise UserError(f"llama.cpp's step35 needs partial_rotary_factors 0.5 on full and 1.0 on sliding layers; "
                            f"layer {i} ({cfg.layer_types[i]}) has {cfg.partial_rotary_factors[i]}")
    for kind in (FULL, SLIDING):
        thetas = {cfg.rope_theta[i] for i in range(total) if cfg.layer_types[i] == kind}
        if len(thetas) > 1:
            raise UserError(f"llama.cpp's step35 has one rope base per layer type; {kind} layers use {sorted(thetas)}")
    if cfg.rope_scaling_type == "llama3" and SLIDING in (cfg.yarn_only_types or [FULL]):
        raise UserError("llama.cpp's step35 applies llama3 rope scaling to full-attention layers only; "
                        "yarn_only_types names sliding_attention")


def _rope_theta(cfg: Step35Config, kind: str) -> float | None:
    return next((float(t) for t, k in zip(cfg.rope_theta, cfg.layer_types) if k == kind), None)


def llama3_rope_freqs(cfg: Step35Config) -> np.ndarray | None:
    """rope_freqs.weight: ggml divides each inverse frequency of a full layer by its entry. Derived from the
    model's own rope (unscaled / scaled inverse frequencies), padded with 1.0 to the longest rotary dim."""
    from stepflash.model.rope import rope_inv_freq

    full = [i for i, k in enumerate(cfg.layer_types) if k == FULL]
    if cfg.rope_scaling_type != "llama3" or not full:
        return None
    theta, rd = float(cfg.rope_theta[full[0]]), cfg.rotary_dim(full[0])
    factors = (rope_inv_freq(theta, rd) / rope_inv_freq(theta, rd, cfg.rope_scaling)).numpy()  # [rd // 2]
    width = max(cfg.rotary_dim(i) for i in range(len(cfg.layer_types))) // 2
    return np.concatenate([factors, np.ones(width - len(factors))]).astype(np.float32)


def write_hparams(w: gguf.GGUFWriter, cfg: Step35Config) -> None:
    """Every `step35.*` key llama.cpp's loader reads, over trunk + MTP layers."""
    total = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    w.add_block_count(total)
    if cfg.num_nextn_predict_layers:
        w.add_nextn_predict_layers(cfg.num_nextn_predict_layers)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count([cfg.num_heads(i) for i in range(total)])
    w.add_head_count_kv([cfg.num_kv_heads(i) for i in range(total)])
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([cfg.is_sliding(i) for i in range(total)])
    for kind, add in ((FULL, w.add_rope_freq_base), (SLIDING, w.add_rope_freq_base_swa)):
        if (theta := _rope_theta(cfg, kind)) is not None:
            add(theta)
    moe = sorted(cfg.moe_layers)
    w.add_leading_dense_block_count(moe[0] if moe else cfg.num_hidden_layers)
    if moe:
        w.add_expert_count(cfg.moe_num_experts)
        w.add_expert_used_count(cfg.moe_top_k)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.share_expert_dim)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_norm(bool(cfg.norm_expert_weight))
        w.add_expert_weights_scale(float(cfg.moe_router_scaling_factor))
    w.add_swiglu_clamp_exp([float(x) for x in cfg.swiglu_limits])
    w.add_swiglu_clamp_shexp([float(x) for x in cfg.swiglu_limits_shared])


def _storage_type(kind: gguf.MODEL_TENSOR, shape: tuple[int, ...], norm: bool, wanted: gguf.GGMLQuantizationType):
    """llama.cpp's converter's rule: vectors, norms and the router stay F32; Q8_0 needs rows of 32 (else F16)."""
    if len(shape) <= 1 or norm or kind in _ALWAYS_F32:
        return Q.F32
    if wanted == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return wanted


def plan_tensors(cfg: Step35Config, tensors: TensorSource, wanted: gguf.GGMLQuantizationType) -> list[tuple]:
    """[(gguf name, shape, storage type, loader)] for every tensor of the file, in layer order."""
    plan = []
    for name in sorted(tensors, key=_layer_order):
        if name.endswith("moe.router_bias") and not cfg.use_moe_router_bias:
            continue  # llama.cpp would select with it; stepflash ignores it
        mapped = gguf_name(name)
        if mapped is None:
            raise UserError(f"tensor {name} has no counterpart in llama.cpp's step35 (not a release tensor name)")
        kind, out_name = mapped
        shape, load = tensors[name]
        norm = is_norm(name)
        plan.append((out_name, tuple(shape), _storage_type(kind, shape, norm, wanted),
                     (lambda load=load: load().float() + 1.0) if norm else load))
    if "lm_head.weight" not in tensors and cfg.tie_word_embeddings:
        shape, load = tensors["model.embed_tokens.weight"]
        plan.append((gguf.TENSOR_NAMES[T.OUTPUT] + ".weight", tuple(shape), _storage_type(T.OUTPUT, shape, False, wanted),
                     load))
    if (freqs := llama3_rope_freqs(cfg)) is not None:
        plan.append((gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", freqs.shape, Q.F32, lambda: torch.from_numpy(freqs)))
    return plan


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[2]) if name.startswith("model.layers.") else -1, name)


def export_gguf(src: str, out: str, dtype: str, tensors: TensorSource, cfg: Step35Config | None = None,
                tokenizer_pre: str | None = None) -> int:
    """Write `out` (.gguf) from the checkpoint directory `src` (config, tokenizer, chat template) and its
    `tensors`. dtype: a key of GGUF_DTYPES. Returns the number of tensors written."""
    from stepflash.checkpoint.gguf_vocab import write_vocab

    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)} for a GGUF file")
    cfg = cfg or Step35Config.from_json(src)
    check_exportable(cfg)
    wanted, file_type = GGUF_DTYPES[dtype]
    plan = plan_tensors(cfg, tensors, wanted)
    tmp = out + ".tmp"
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        w.add_name(os.path.basename(os.path.abspath(src)))
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(w, cfg)
        write_vocab(w, src, cfg, tokenizer_pre)
        for out_name, shape, qtype, _ in plan:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            w.add_tensor_info(out_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # A bar on a terminal only (disable=None), in elements: big tensors dominate the time.
        with tqdm(total=sum(int(np.prod(shape)) for _, shape, _, _ in plan), desc=f"writing {os.path.basename(out)}",
                  unit="param", unit_scale=True, disable=None) as bar:
            for out_name, shape, qtype, load in plan:
                data = load().detach().to(torch.float32).contiguous().numpy()  # [shape] as stored, fp32
                assert data.shape == shape, f"{out_name}: loaded {data.shape}, planned {shape}"
                w.write_tensor_data(gguf.quants.quantize(data, qtype))
                bar.update(data.size)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)  # nothing half-written is left behind, under either name
        raise
    w.close()
    os.replace(tmp, out)
    return len(plan)


def safetensors_source(path: str) -> TensorSource:
    """Every tensor of a release-layout directory (single file or sharded), read lazily."""
    from safetensors import safe_open

    from stepflash.checkpoint.release import shard_files

    source: TensorSource = {}
    for fname, names in shard_files(path).items():
        fpath = os.path.join(path, fname)
        with safe_open(fpath, framework="pt") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                source[name] = (shape, lambda fpath=fpath, name=name: _read(fpath, name))
    return source


def _read(fpath: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(fpath, framework="pt") as f:
        return f.get_tensor(name)


def read_metadata(path: str) -> dict:
    """The GGUF's key/values as Python values (strings decoded, arrays as lists), to inspect a file."""
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}
