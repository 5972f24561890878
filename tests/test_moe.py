import pytest
import torch

import stepflash.model.moe as moe_mod
from stepflash.config import tiny
from stepflash.model.moe import MoE, moe_reference


def make_moe(limit=0.5):
    cfg = tiny().replace(swiglu_limits=[0.0, limit, 0.0, 0.0, 0.0, 0.0, 0.0], moe_router_scaling_factor=2.0)
    m = MoE(cfg, 1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.router_bias.normal_(0, 0.5)
    return m


def test_grouped_equals_naive_formula():
    m = make_moe()
    x = torch.randn(3, 7, 64)
    torch.testing.assert_close(m(x), moe_reference(m, x), atol=1e-5, rtol=1e-5)


def test_fallback_path_equals_grouped(monkeypatch):
    m = make_moe()
    x = torch.randn(20, 64)
    ref = m(x)
    monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda x: False)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_router_bias_selects_but_does_not_weight():
    m = make_moe()
    x = torch.randn(16, 64)
    probs, w, idx = m.route(x)
    m2_bias = torch.zeros_like(m.router_bias)
    m2_bias[0] = 100.0  # force expert 0 into every top-k
    m.router_bias.copy_(m2_bias)
    probs2, w2, idx2 = m.route(x)
    assert (idx2 == 0).any(-1).all()
    torch.testing.assert_close(probs, probs2)
    chosen = probs2.gather(-1, idx2)
    torch.testing.assert_close(w2, chosen / chosen.sum(-1, keepdim=True) * 2.0)


def test_gradients_flow_to_experts_and_router():
    m = make_moe()
    x = torch.randn(10, 64, requires_grad=True)
    (m(x) * torch.randn(10, 64)).sum().backward()
    assert m.gate.weight.grad.abs().sum() > 0
    assert m.gate_proj.weight.grad.abs().sum() > 0 and m.down_proj.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("n_tokens", [1, 0])
def test_edge_token_counts(n_tokens):
    m = make_moe()
    x = torch.randn(n_tokens, 64)
    assert m(x).shape == (n_tokens, 64)
