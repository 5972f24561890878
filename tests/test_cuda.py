"""CUDA checks, run by `benchmarks/gpu_check.sh` on a machine with a GPU (skipped elsewhere): the bf16
grouped-GEMM MoE against the per-expert loop and the formula, the engine on CUDA against the CPU
engine, and the compiled decode step (CUDA graphs) against eager decoding on the same device."""

import pytest
import torch

from stepflash.config import make_config, tiny
from stepflash.inference.engine import Engine
from stepflash.model.moe import MoE, moe_reference
from test_engine import random_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                          reason="torch._grouped_mm needs sm90+")


PROMPTS = [[5, 17, 3, 44, 9], [60, 2, 2, 81, 33, 7, 19, 52, 11, 4, 90]]


@sm90
@pytest.mark.parametrize("tokens", [3, 300])
def test_grouped_mm_moe_matches_loop_and_formula(tokens):
    cfg = tiny().replace(hidden_size=128, moe_num_experts=16, moe_top_k=4, moe_intermediate_size=64)
    torch.manual_seed(0)
    moe = MoE(cfg, 1)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    moe = moe.cuda().to(torch.bfloat16)
    x = torch.randn(tokens, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = moe(x)  # grouped_mm: CUDA, bf16, sm90
        moe.expert_path = "loop"
        loop = moe(x)
        ref = moe_reference(moe.float(), x.float())
    torch.testing.assert_close(got.float(), loop.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), ref, atol=5e-2, rtol=5e-2)


@cuda
def test_engine_on_cuda_matches_cpu():
    model = random_model(tiny())
    want = Engine(model, max_batch_size=2).generate(PROMPTS, 16, speculative_tokens=2)
    got = Engine(random_model(tiny()), max_batch_size=2, device="cuda").generate(PROMPTS, 16, speculative_tokens=2)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-3, rtol=1e-3)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cuda_graphs_decode_equals_eager(dtype):
    pytest.importorskip("triton")
    cfg = make_config(2, 64, full_heads=4, sliding_heads=4, kv_heads=2, head_dim=16, window=6, vocab=128, inter=96,
                      experts=16, top_k=2, moe_inter=32, dense_layers=1, mtp=1, max_pos=256, rope_original=16)
    model = random_model(cfg).to(dtype)
    eager = Engine(model, max_batch_size=2, device="cuda", cache_capacity=12)
    compiled = Engine(model, max_batch_size=2, device="cuda", cache_capacity=12, compile=True)
    assert compiled.compiled is not None, compiled.compile_note
    for k in (0, 1):
        want = eager.generate(PROMPTS, 24, speculative_tokens=k)  # the cache grows twice on the way
        got = compiled.generate(PROMPTS, 24, speculative_tokens=k)
        for g, w in zip(got, want):
            # fp32: the same tokens; bf16 rounds at different points once fused: the first tokens agree
            n = len(w.token_ids) if dtype == torch.float32 else 4
            assert g.token_ids[:n] == w.token_ids[:n]
    assert compiled.compile_seconds > 0
