"""MIS-PO and the baseline losses against hand-computed values and a naive per-token loop (SPEC section 7)."""

import math

import pytest
import torch

from stepflash.rl import (grpo_advantages, kl_k3, kl_penalty, mispo_loss, mispo_masks, ppo_clip_loss,
                          reduce_loss, token_logprobs)


def _leaf(x):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def _naive_mispo(logp, old, beh, adv, mask, token_bounds, traj_bounds, normalization):
    """Straight from the report's formulas, one token at a time in Python floats."""
    lo, hi = token_bounds
    tlo, thi = traj_bounds
    B, T = len(logp), len(logp[0])
    terms, lengths = [], []
    for b in range(B):
        idx = [t for t in range(T) if mask[b][t]]
        lengths.append(len(idx))
        rho = math.exp(sum(old[b][t] - beh[b][t] for t in idx) / len(idx)) if idx else 1.0
        seq = []
        for t in idx:
            x = math.exp(old[b][t] - beh[b][t])
            m = 1.0 if (lo <= x <= hi and tlo <= rho <= thi) else 0.0
            seq.append((t, m * adv[b][t]))  # loss term is -m*A*logp
        terms.append(seq)
    total = sum(-w * logp[b][t] for b in range(B) for t, w in terms[b])
    if normalization == "token":
        return total / sum(lengths)
    if normalization == "sequence":
        per = [sum(-w * logp[b][t] for t, w in terms[b]) / lengths[b] for b in range(B) if lengths[b]]
        return sum(per) / len(per)
    if normalization == "none":
        return total
    return total / normalization


def test_token_outside_bounds_gets_no_gradient():
    # log x per token: in bounds, x=3 (> 2), x=0.25 (< 0.5), in bounds; trajectory bounds wide open.
    log_x = torch.tensor([[0.0, math.log(3.0), math.log(0.25), math.log(1.9)]], dtype=torch.float64)
    beh = torch.full((1, 4), -1.0, dtype=torch.float64)
    old = beh + log_x
    logp = _leaf([[-0.5, -1.0, -1.5, -2.0]])
    adv = torch.tensor([[2.0, 2.0, -1.0, 0.5]], dtype=torch.float64)
    mask = torch.ones(1, 4)
    loss, stats = mispo_loss(logp, old, beh, adv, mask, traj_bounds=(0.01, 100.0))
    loss.backward()
    keep = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    expected = -(keep * adv * logp.detach()).sum() / 4
    assert torch.allclose(loss, expected)
    assert torch.allclose(logp.grad, -keep * adv / 4)
    assert logp.grad[0, 1] == 0 and logp.grad[0, 2] == 0
    assert stats["token_accept_rate"] == pytest.approx(0.5)
    assert stats["kept_tokens"] == 2
    assert stats["mean_abs_log_ratio"] == pytest.approx((math.log(3) + math.log(4) + math.log(1.9)) / 4)


def test_trajectory_outside_bounds_contributes_nothing():
    # Sequence 0 matches exactly (rho = 1); sequence 1 has every token in its bounds, but its geometric
    # mean ratio exp(0.01) = 1.01 is outside [0.996, 1.001]: the whole sequence is dropped.
    beh = torch.full((2, 3), -2.0, dtype=torch.float64)
    old = beh.clone()
    old[1] += 0.01
    logp = _leaf([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]])
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)  # per-sequence advantages broadcast over tokens
    loss, stats = mispo_loss(logp, old, beh, adv, torch.ones(2, 3))
    loss.backward()
    assert torch.allclose(loss, torch.tensor(6.0 / 6, dtype=torch.float64))
    assert torch.all(logp.grad[1] == 0)
    assert torch.allclose(logp.grad[0], torch.full((3,), -1.0 / 6, dtype=torch.float64))
    assert stats["traj_accept_rate"] == 0.5 and stats["token_accept_rate"] == 1.0
    assert stats["kept_fraction"] == 0.5


def test_trajectory_ratio_is_geometric_mean_over_response_tokens_only():
    # Prompt/padding positions carry huge ratios; they must neither count in rho nor be trained on.
    beh = torch.zeros(1, 4, dtype=torch.float64)
    old = torch.tensor([[5.0, 0.0005, -0.0005, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0]])
    keep, token_ok, traj_ok, log_x = mispo_masks(old, beh, mask)
    assert traj_ok.tolist() == [True]
    assert keep.tolist() == [[False, True, True, False]]
    assert log_x[0, 0] == 0 and log_x[0, 3] == 0


@pytest.mark.parametrize("normalization", ["token", "sequence", "none", 7.0])
def test_matches_naive_loop(normalization):
    g = torch.Generator().manual_seed(1)
    B, T = 4, 6
    beh = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    # Per-token mismatch: mostly tiny, a few large (outside [0.5, 2]).
    log_x = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.001
    log_x[0, 2], log_x[2, 4] = 1.2, -0.9
    old = beh + log_x
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.05).requires_grad_(True)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    mask[3, :2] = 0  # prompt positions
    bounds = ((0.5, 2.0), (0.5, 2.0))  # trajectory window wide enough to keep rows with one bad token
    loss, _ = mispo_loss(logp, old, beh, adv, mask, *bounds, normalization=normalization)
    loss.backward()
    ref = _naive_mispo(logp.tolist(), old.tolist(), beh.tolist(), adv.tolist(), mask.tolist(), *bounds, normalization)
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    # Gradient by finite differences of the naive loss (the mask is piecewise constant in logp).
    eps, lp = 1e-6, logp.detach().tolist()
    for b, t in [(0, 0), (0, 2), (1, 5), (2, 4), (3, 1), (3, 3)]:
        bumped = [row[:] for row in lp]
        bumped[b][t] += eps
        num = (_naive_mispo(bumped, old.tolist(), beh.tolist(), adv.tolist(), mask.tolist(), *bounds, normalization)
               - ref) / eps
        assert logp.grad[b, t].item() == pytest.approx(num, abs=1e-6)
    assert logp.grad[0, 2] == 0 and logp.grad[2, 4] == 0  # outside the token bounds
    assert logp.grad[1, 5] == 0 and logp.grad[3, 1] == 0  # not response tokens


def test_constant_normalization_makes_micro_batches_add_up():
    g = torch.Generator().manual_seed(2)
    B, T = 6, 5
    beh = -torch.rand(B, T, generator=g)
    old = beh + torch.randn(B, T, generator=g) * 1e-4
    logp = old.clone().requires_grad_(True)
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    full, _ = mispo_loss(logp, old, beh, adv, mask)
    full.backward()
    grad_full = logp.grad.clone()
    logp.grad = None
    n = float(mask.sum())
    total = sum(mispo_loss(logp[s], old[s], beh[s], adv[s], mask[s], normalization=n)[0]
                for s in (slice(0, 2), slice(2, 6)))
    total.backward()
    assert torch.allclose(total, full, atol=1e-6)
    assert torch.allclose(logp.grad, grad_full, atol=1e-7)


def test_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        mispo_loss(x, x, torch.zeros(2, 4), x, x)
    with pytest.raises(ValueError, match="bounds"):
        mispo_loss(x, x, x, x, x, token_bounds=(2.0, 0.5))
    with pytest.raises(ValueError, match="normalization"):
        mispo_loss(x, x, x, x, x, normalization="mean")


def test_ppo_clip_matches_formula_and_clipped_tokens_have_no_gradient():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64))
    # ratios 1.5 (clipped for A>0), 0.6 (clipped for A<0), 1.1 (inside)
    logp = (old + torch.log(torch.tensor([[1.5, 0.6, 1.1]], dtype=torch.float64))).requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    loss, stats = ppo_clip_loss(logp, old, adv, torch.ones(1, 3), clip_eps=0.2)
    loss.backward()
    expected = -(1.2 * 1.0 + 0.8 * -2.0 + 1.1 * 3.0) / 3
    assert loss.item() == pytest.approx(expected)
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0
    assert logp.grad[0, 2].item() == pytest.approx(-1.1 * 3.0 / 3)
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    # clip-higher: eps_high 0.6 no longer clips the 1.5 ratio
    loss_hi, _ = ppo_clip_loss(logp, old, adv, torch.ones(1, 3), clip_eps=0.2, clip_eps_high=0.6)
    assert loss_hi.item() == pytest.approx(-(1.5 - 1.6 + 3.3) / 3)


def test_grpo_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3], [2.0, 0.0, 1.0, 1.0]])
    a = grpo_advantages(r)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.all(a[1] == 0)  # identical rewards: no signal, no NaN
    std = math.sqrt(0.5)
    assert torch.allclose(a[2], torch.tensor([1 / std, -1 / std, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(grpo_advantages(r, std_normalize=False)[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert torch.all(grpo_advantages(torch.tensor([[1.0], [0.0]])) == 0)
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(4))


def test_k3_is_unbiased_for_kl():
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    exact_kl = (pi * (pi.log() - ref.log())).sum()
    expectation = (pi * kl_k3(pi.log(), ref.log())).sum()  # E_{a~pi}[k3]
    assert expectation.item() == pytest.approx(exact_kl.item())
    assert torch.all(kl_k3(pi.log(), ref.log()) >= 0)
    lp = torch.log(torch.rand(2, 4)).requires_grad_(True)
    assert kl_penalty(lp, lp.detach(), torch.ones(2, 4)).item() == 0
    pen = kl_penalty(lp, lp.detach() - 0.3, torch.ones(2, 4), coef=0.5)
    assert pen.item() == pytest.approx(0.5 * (math.exp(-0.3) + 0.3 - 1), rel=1e-5)


def test_token_logprobs_and_reduce_loss():
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    lp = token_logprobs(logits, tokens)
    for b in range(2):
        for t in range(3):
            assert lp[b, t].item() == pytest.approx(torch.log_softmax(logits[b, t], -1)[tokens[b, t]].item(), abs=1e-6)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert reduce_loss(x, m, "token").item() == pytest.approx(7 / 3)
    assert reduce_loss(x, m, "sequence").item() == pytest.approx((1.5 + 4) / 2)
    assert reduce_loss(x, m, "none").item() == pytest.approx(7)
