"""Routed experts: every expert path equals the formula, the router bias only selects, gradients flow,
the fused shared expert keeps the release's names, and edge token counts work."""

import pytest
import torch

from stepflash.config import tiny
from stepflash.model.moe import MoE, SwiGLU, choose_path, moe_reference


def make_moe(limit=0.5):
    cfg = tiny().replace(swiglu_limits=[0.0, limit, 0.0, 0.0, 0.0, 0.0, 0.0], moe_router_scaling_factor=2.0)
    m = MoE(cfg, 1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.router_bias.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("n_tokens", [3, 40])  # 3 x top-2 rows <= 8 experts: gather; 80 rows: loop
@pytest.mark.parametrize("path", [None, "gather", "loop", "grouped_mm"])
def test_every_path_equals_naive_formula(path, n_tokens):
    if path == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is missing")
    m = make_moe()
    m.expert_path = path
    x = torch.randn(n_tokens, 64)
    torch.testing.assert_close(m(x), moe_reference(m, x), atol=1e-5, rtol=1e-5)
    x3 = torch.randn(2, n_tokens, 64)  # any leading shape
    torch.testing.assert_close(m(x3), moe_reference(m, x3), atol=1e-5, rtol=1e-5)


def test_naive_formula_is_sensitive_to_routing():
    """Negative control: the comparison notices a wrong routing weight."""
    m = make_moe()
    x = torch.randn(5, 64)
    ref = moe_reference(m, x)
    m.scaling = 1.0
    assert (m(x) - ref).abs().max() > 1e-2


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


@pytest.mark.parametrize("path", ["gather", "loop", "grouped_mm"])
def test_gradients_flow_to_experts_and_router(path):
    if path == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is missing")
    m = make_moe()
    m.expert_path = path
    x = torch.randn(10, 64, requires_grad=True)
    g = torch.randn(10, 64)
    (m(x) * g).sum().backward()
    assert m.gate.weight.grad.abs().sum() > 0
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    xg = x.grad.clone()
    m.zero_grad()
    x.grad = None
    (moe_reference(m, x) * g).sum().backward()  # the naive loop's gradients
    torch.testing.assert_close(x.grad, xg, atol=1e-5, rtol=1e-4)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is missing")
def test_cpu_training_takes_grouped_mm_and_inference_does_not():
    """CPU fp32: the grouped kernel for eager training (autograd on), gather / loop otherwise (inference,
    compiled decode), whatever the row count."""
    x = torch.randn(4, 64)
    assert choose_path(x, 80, 8) == choose_path(x, 4, 8) == "grouped_mm"
    assert choose_path(x.bfloat16(), 80, 8) == "loop"
    assert choose_path(x[:0], 0, 8) == "gather"  # an expert-parallel rank that received no rows
    with torch.no_grad():
        assert (choose_path(x, 4, 8), choose_path(x, 80, 8)) == ("gather", "loop")
    seen = []
    torch.compile(lambda t: seen.append(choose_path(t, 80, 8)) or t + 1, backend="eager")(x)
    assert seen == ["loop"]


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is missing")
def test_grouped_mm_gradients_with_idle_experts_and_a_broadcast_gradient():
    """Experts without rows and the gradient of a plain .sum() (stride 0, which the CPU kernel's backward
    rejects unless made contiguous): the same gradients as one matmul per expert."""
    from stepflash.model.moe import ExpertRows

    weight = torch.randn(4, 8, 16, requires_grad=True)
    rows = torch.randn(5, 16, requires_grad=True)
    counts = torch.tensor([0, 2, 0, 3])
    grads = []
    for path in ("grouped_mm", "loop"):
        ExpertRows(torch.repeat_interleave(torch.arange(4), counts), counts, path).linear(rows, weight).sum().backward()
        grads.append((rows.grad.clone(), weight.grad.clone()))
        rows.grad = weight.grad = None
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_routing_record_and_expert_stats():
    m = make_moe()
    m.record_routing = m.record_expert_stats = True
    x = torch.randn(12, 64)
    m(x)
    rec = m.last_routing
    _, _, idx = m.route(x)
    assert torch.equal(rec["counts"], torch.bincount(idx.reshape(-1), minlength=8))
    # per-expert output norms, summed over the rows each expert ran
    want = torch.zeros(8)
    for n in range(12):
        for e in idx[n].tolist():
            g, u = x[n] @ m.gate_proj.weight[e].T, x[n] @ m.up_proj.weight[e].T
            a = torch.nn.functional.silu(g).clamp(max=0.5) * u.clamp(-0.5, 0.5)
            want[e] += (a @ m.down_proj.weight[e].T).norm()
    torch.testing.assert_close(rec["out_norm_sum"], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_tokens", [1, 0])
@pytest.mark.parametrize("path", ["gather", "loop"])
def test_edge_token_counts(n_tokens, path):
    m = make_moe()
    m.expert_path = path
    x = torch.randn(n_tokens, 64)
    assert m(x).shape == (n_tokens, 64)


def test_swiglu_fused_gate_up_keeps_release_names():
    mlp = SwiGLU(16, 24, limit=0.0)
    state = mlp.state_dict()
    assert sorted(state) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    x = torch.randn(3, 16)
    ref = mlp.down_proj(torch.nn.functional.silu(x @ state["gate_proj.weight"].T) * (x @ state["up_proj.weight"].T))
    torch.testing.assert_close(mlp(x), ref)
