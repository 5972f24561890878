"""`stepflash plan`: parameter counts, state bytes and KV bytes against hand arithmetic (SPEC section 4),
and the activation formula against the tensors autograd really saves."""

from __future__ import annotations

import json

import pytest
import torch

from stepflash.cli import main
from stepflash.config import flash, small, tiny
from stepflash.distributed.plan import (GIB, PlanArgs, count_parameters, kv_cache_bytes,
                                        layer_activation_bytes_per_token, make_plan)
from stepflash.errors import UserError
from stepflash.model import DecoderLayer
from stepflash.model.rope import RotaryEmbedding

H, V, E, MOE_I, MOE_LAYERS = 4096, 128896, 288, 1280, 42


def test_flash_parameter_counts_match_hand_arithmetic():
    p = count_parameters(flash())
    assert round(p.trunk / 1e9, 2) == 196.96
    assert round(p.total / 1e9, 2) == 199.38
    assert p.expert == MOE_LAYERS * E * 3 * MOE_I * H  # 190.25B stacked gate/up/down
    assert p.dense == p.total - p.expert
    assert p.embed_and_head == 2 * V * H
    # One MTP module with its own head: 0.81B (SPEC section 4), three of them.
    assert round(p.mtp / 3 / 1e9, 2) == 0.81
    # A MoE layer's unit at ep=8 holds its dense part plus 36 of 288 experts.
    dense3, expert3 = p.layers[3]
    assert expert3 == E * 3 * MOE_I * H
    assert p.largest_unit(8) >= dense3 + expert3 / 8


def test_flash_training_state_per_gpu():
    plan = make_plan(flash(), PlanArgs("flash", gpus=64, gpu_mem=80, ep=8))
    total = 199_384_289_280
    t = plan["training_bytes"]
    assert t["parameters"] == total * 4 / 64  # fp32 master, 1/N of everything
    assert t["gradients"] == total * 4 / 64
    assert t["optimizer"] == total * 8 / 64
    assert plan["dp"] == 8
    assert not plan["training_fits"] and plan["training_fits_checkpointed"]  # 4k tokens needs checkpointing
    bf16 = make_plan(flash(), PlanArgs("flash", gpus=64, gpu_mem=80, ep=8, master="bf16"))["training_bytes"]
    assert bf16["parameters"] + bf16["gradients"] + bf16["optimizer"] == total * 12 / 64


def test_flash_kv_cache_s3f1():
    # 12 full layers keep every token, 33 sliding trunk layers + 3 MTP layers keep 512; 4 KiB per layer-token.
    assert kv_cache_bytes(flash(), 4096) == 12 * 4096 * 4096 + 36 * 512 * 4096
    assert kv_cache_bytes(flash(), 256) == 48 * 256 * 4096
    assert kv_cache_bytes(flash(), 131072, include_mtp=False) == 12 * 131072 * 4096 + 33 * 512 * 4096


def test_flash_inference_fit():
    eight = make_plan(flash(), PlanArgs("flash", gpus=8, gpu_mem=80, seq=131072))
    assert eight["inference_bytes"]["weights"] == 199_384_289_280 * 2 / 8
    assert eight["inference_fits"]
    one = make_plan(flash(), PlanArgs("flash", gpus=1, gpu_mem=80, ep=1))
    assert not one["inference_fits"] and one["inference_bytes"]["max_sequences"] == 0


def _measured_bytes_per_token(cfg, i: int, seq: int) -> float:
    """Bytes of the distinct non-parameter tensors autograd saves for decoder layer i (bf16)."""
    torch.manual_seed(0)
    layer = DecoderLayer(cfg, i).to(torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, seq, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    rope = RotaryEmbedding(float(cfg.rope_theta[i]), cfg.rotary_dim(i), cfg.rope_scaling_for(i))
    cos, sin = rope(torch.arange(seq)[None], torch.bfloat16)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin)
    return sum(saved.values()) / seq


@pytest.mark.parametrize("layer", [0, 1])  # dense full-attention layer, MoE sliding layer
def test_activation_formula_matches_saved_tensors(layer):
    cfg = small()
    seq = cfg.sliding_window  # within the window: efficient attention, no mask, as on GPUs
    want = _measured_bytes_per_token(cfg, layer, seq)
    got = layer_activation_bytes_per_token(cfg, layer, seq)
    assert abs(got - want) / want < 0.1, (got, want)


def test_plan_cli_json_and_errors(capsys):
    assert main(["plan", "tiny", "--gpus", "2", "--ep", "2", "--gpu-mem", "8", "--seq", "64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"]["total"] == count_parameters(tiny()).total
    assert plan["inference_fits"] and plan["training_bytes"]["total"] < GIB
    assert main(["plan", "flash", "--gpus", "8", "--ep", "7"]) == 2
    assert "--ep 7" in capsys.readouterr().err
    with pytest.raises(UserError):
        make_plan(flash(), PlanArgs("flash", gpus=6, pp=4))
