import math

import pytest
import torch

from stepflash.config import tiny
from stepflash.model.moe import MoE
from stepflash.training.balance import ExpertLoad, apply_bias_updates, ep_balance_loss, update_router_bias
from stepflash.training.monitors import ExpertStatsWindow, SpikeDetector, expert_weight_norms


def test_bias_update_by_hand():
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0])
    update_router_bias(bias, torch.tensor([10.0, 0.0, 5.0, 5.0]), rate=1e-3)
    # mean load 5: expert 0 over (-1e-3), expert 1 under (+1e-3), 2 and 3 exact (0); mean already 0.
    torch.testing.assert_close(bias, torch.tensor([-1e-3, 1e-3, 0.0, 0.0]))

    bias = torch.tensor([0.5, 0.0, -0.1, 0.0, 0.0])
    update_router_bias(bias, torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]), rate=0.01)
    # mean load 4 -> steps +.01 +.01 +.01 0 -.01 -> [.51, .01, -.09, 0, -.01], mean .084 -> subtract.
    torch.testing.assert_close(bias, torch.tensor([0.426, -0.074, -0.174, -0.084, -0.094]))
    assert abs(float(bias.mean())) < 1e-7


def test_ep_loss_by_hand():
    # 2 tokens, 4 experts, top-2, G = 2 groups {0,1} and {2,3}.
    probs = torch.tensor([[0.9, 0.5, 0.3, 0.3],    # sums to 2.0 -> normalised [.45, .25, .15, .15]
                          [0.1, 0.1, 0.4, 0.4]])   # sums to 1.0 -> unchanged
    topk = torch.tensor([[0, 1], [2, 3]])
    # p_e = mean -> [.275, .175, .275, .275]; p_g = [.45, .55]
    # f_e = [1, 1, 1, 1] / 4 -> f_g = [.5, .5];  L = 2 * (.5 * .45 + .5 * .55) = 1.0
    assert float(ep_balance_loss(probs, topk, 2)) == pytest.approx(1.0)
    topk = torch.tensor([[0, 1], [0, 2]])
    # f_e = [2, 1, 1, 0] / 4 -> f_g = [.75, .25];  L = 2 * (.75 * .45 + .25 * .55) = 0.95
    assert float(ep_balance_loss(probs, topk, 2)) == pytest.approx(0.95)
    # G = 4 (one expert per group): L = 4 * sum_e f_e p_e = 4 * (.5*.275 + .25*.175 + .25*.275) = 1.0
    assert float(ep_balance_loss(probs, topk, 4)) == pytest.approx(1.0)


def test_ep_loss_extremes_and_gradient():
    n, e, k = 64, 8, 2
    uniform = torch.full((n, e), 0.5)
    balanced = torch.arange(n * k).reshape(n, k) % e
    assert float(ep_balance_loss(uniform, balanced, 4)) == pytest.approx(1.0)
    # everything routed to group 0 with all probability there: L = G
    skew = torch.zeros(n, e)
    skew[:, :2] = 1.0
    assert float(ep_balance_loss(skew, torch.tensor([[0, 1]] * n), 4)) == pytest.approx(4.0)
    # Gradient flows through p only and pushes probability away from the overloaded group.
    logits = torch.zeros(n, e, requires_grad=True)
    ep_balance_loss(torch.sigmoid(logits), torch.tensor([[0, 1]] * n), 4).backward()
    g = logits.grad.sum(0)
    assert (g[:2] > 0).all() and (g[2:] < 0).all()
    with pytest.raises(ValueError, match="equal EP groups"):
        ep_balance_loss(uniform, balanced, 3)


def test_loss_free_bias_balances_a_skewed_router():
    torch.manual_seed(0)
    cfg = tiny()
    moe = MoE(cfg, 1)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.02)
        moe.gate.weight[0] += 0.05  # expert 0 wins for most tokens
    x = torch.randn(4096, cfg.hidden_size)
    x[:, :] += 1.0

    def imbalance():
        _, _, idx = moe.route(x)
        c = torch.bincount(idx.reshape(-1), minlength=moe.num_experts).float()
        return float(c.max() / c.mean()), c

    before, _ = imbalance()
    load = ExpertLoad(1, moe.num_experts, "cpu")
    for _ in range(300):
        _, _, idx = moe.route(x[torch.randint(0, len(x), (512,))])
        load.reset()
        load.counts[0] += torch.bincount(idx.reshape(-1), minlength=moe.num_experts).double()
        apply_bias_updates([moe], load.global_counts(), rate=1e-3)
    after, _ = imbalance()
    assert before > 2.0 and after < 1.3
    assert abs(float(moe.router_bias.mean())) < 1e-6


def test_global_counts_use_the_all_reduce_hook():
    load = ExpertLoad(2, 4, "cpu")
    load.counts += torch.tensor([[1.0, 2, 3, 4], [0, 0, 0, 8]], dtype=torch.float64)
    doubled = load.global_counts(lambda t: t.mul_(2))  # a fake 2-rank sum of identical ranks
    torch.testing.assert_close(doubled, 2 * load.counts)


def test_expert_stats_match_a_naive_loop():
    torch.manual_seed(1)
    cfg = tiny()
    moe = MoE(cfg, 1)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(40, cfg.hidden_size)
    plain = moe(x)
    moe.record_routing = moe.record_expert_stats = True
    out = moe(x)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # recording never changes the output
    r = moe.last_routing
    norms, sq = torch.zeros(moe.num_experts), torch.zeros(moe.num_experts)
    with torch.no_grad():
        for n in range(x.shape[0]):
            for e in r["topk_idx"][n].tolist():
                a = torch.nn.functional.silu(x[n] @ moe.gate_proj.weight[e].T) * (x[n] @ moe.up_proj.weight[e].T)
                norms[e] += (a @ moe.down_proj.weight[e].T).norm()
                sq[e] += a.pow(2).mean()
    torch.testing.assert_close(r["out_norm_sum"], norms, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r["act_sq_sum"], sq, rtol=1e-4, atol=1e-6)

    window = ExpertStatsWindow([moe])
    window.add()
    m = window.metrics([1])
    c = r["counts"].double()
    assert m["moe/L1/load_max_over_mean"] == pytest.approx(float(c.max() / c.mean()))
    assert m["moe/L1/dead_experts"] == int((c == 0).sum())
    seen = c > 0
    rms = (sq.double()[seen] / c[seen]).sqrt()
    assert m["moe/L1/act_rms_min_over_median"] == pytest.approx(float(rms.min() / rms.median()), rel=1e-4)
    w = expert_weight_norms(moe)
    ref = torch.stack([torch.cat([moe.gate_proj.weight[e].flatten(), moe.up_proj.weight[e].flatten(),
                                  moe.down_proj.weight[e].flatten()]).norm() for e in range(moe.num_experts)])
    torch.testing.assert_close(w, ref)


def test_dead_experts_are_counted_over_the_window():
    cfg = tiny()
    moe = MoE(cfg, 1)
    window = ExpertStatsWindow([moe])
    for counts in ([3, 0, 0, 1, 0, 0, 0, 0], [0, 0, 2, 0, 0, 0, 0, 2]):
        moe.last_routing = {"counts": torch.tensor(counts)}
        window.add()
    m = window.metrics([1])
    assert m["moe/L1/dead_experts"] == 4  # experts 1, 4, 5, 6 never received a token
    assert m["moe/L1/load_max_over_mean"] == pytest.approx(3 / 1.0)


def test_spike_detector():
    d = SpikeDetector(z=6.0, warmup=20)
    losses = [3.0 + 0.01 * math.sin(i) for i in range(40)]
    assert not any(d.check(x) for x in losses)
    assert d.check(4.0)  # far outside the running spread
    assert not d.check(3.005)  # and the spike did not poison the statistics
    state = d.state_dict()
    e = SpikeDetector(z=6.0, warmup=20)
    e.load_state_dict(state)
    assert e.check(4.0) and e.state_dict() == d.state_dict()
