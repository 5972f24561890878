"""GAE with truncation bootstrapping, the value loss, and the critic's value head."""

import pytest
import torch

from stepflash.config import tiny
from stepflash.model import Step35ForCausalLM
from stepflash.rl import gae, value_loss, whiten
from stepflash.rl.advantages import last_token_index, token_rewards
from stepflash.rl.critic import CriticModel


def _naive_gae(values, rewards, mask, truncated, last_values, gamma, lam):
    """Textbook GAE per sequence over its response tokens (Python floats)."""
    B = len(values)
    adv = [[0.0] * len(values[0]) for _ in range(B)]
    for b in range(B):
        idx = [t for t, m in enumerate(mask[b]) if m]
        v = [values[b][t] for t in idx]
        r = [0.0] * len(idx)
        if idx:
            r[-1] = rewards[b]
        v_next = v[1:] + [last_values[b] if truncated[b] else 0.0]
        deltas = [r[i] + gamma * v_next[i] - v[i] for i in range(len(idx))]
        for i in range(len(idx)):
            adv[b][idx[i]] = sum((gamma * lam) ** (j - i) * deltas[j] for j in range(i, len(idx)))
    return adv


def test_gamma_lambda_one_is_return_minus_value():
    values = torch.tensor([[0.1, 0.4, -0.2, 0.0], [0.5, 0.5, 0.3, 0.9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    rewards = torch.tensor([1.0, -0.5])
    adv, ret = gae(values, rewards, mask)
    assert torch.allclose(adv[0, :3], 1.0 - values[0, :3]) and adv[0, 3] == 0
    assert torch.allclose(adv[1], -0.5 - values[1])
    assert torch.allclose(ret[0, :3], torch.ones(3)) and torch.allclose(ret[1], torch.full((4,), -0.5))


def test_truncated_response_bootstraps_with_value_of_last_state():
    values = torch.tensor([[0.2, 0.3, 0.6], [0.2, 0.3, 0.6]])
    mask = torch.ones(2, 3)
    rewards = torch.tensor([0.0, 0.0])  # a cut response gets no verifier reward
    last_values = torch.tensor([0.7, 0.7])
    adv, ret = gae(values, rewards, mask, truncated=torch.tensor([True, False]), last_values=last_values)
    assert torch.allclose(ret[0], torch.full((3,), 0.7))  # R = V(s_T) instead of 0
    assert torch.allclose(adv[0], 0.7 - values[0])
    assert torch.allclose(ret[1], torch.zeros(3))  # finished: R = 0
    with pytest.raises(ValueError, match="last_values"):
        gae(values, rewards, mask, truncated=torch.tensor([True, False]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.99, 0.0), (0.5, 1.0)])
def test_general_gae_matches_textbook(gamma, lam):
    g = torch.Generator().manual_seed(3)
    B, T = 5, 7
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0  # right padding
    mask[1, :3] = 0  # prompt in front
    mask[2, 2:4] = 0  # a hole (tool output) inside the response
    mask[4] = 0  # no response at all
    truncated = torch.tensor([False, True, True, False, True])
    last_values = torch.randn(B, generator=g, dtype=torch.float64)
    adv, ret = gae(values, rewards, mask, truncated, last_values, gamma, lam)
    ref = _naive_gae(values.tolist(), rewards.tolist(), mask.tolist(), truncated.tolist(), last_values.tolist(),
                     gamma, lam)
    assert torch.allclose(adv.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(ret, torch.where(mask.bool(), adv + values.float(), torch.zeros_like(adv)), atol=1e-6)
    assert torch.all(adv[4] == 0)


def test_lambda_zero_is_one_step_td():
    values = torch.tensor([[1.0, 2.0, 4.0]])
    adv, _ = gae(values, torch.tensor([3.0]), torch.ones(1, 3), gamma=0.5, lam=0.0)
    assert torch.allclose(adv, torch.tensor([[0.5 * 2 - 1, 0.5 * 4 - 2, 3.0 - 4]]))


def test_rewards_placement_and_last_index():
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 0, 0]
    r = token_rewards(torch.tensor([5.0, 6.0, 7.0]), mask)
    assert r.tolist() == [[0, 0, 5, 0], [6, 0, 0, 0], [0, 0, 0, 0]]


def test_value_loss_plain_and_clipped():
    values = torch.tensor([[0.0, 1.0, 3.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1]])
    loss, stats = value_loss(values, returns, mask)
    assert loss.item() == pytest.approx(0.5 * (1 + 0 + 4) / 3)
    assert stats["value_mse"] == pytest.approx(5 / 3)
    old = torch.tensor([[0.5, 1.0, 1.5]])
    loss_c, stats_c = value_loss(values, returns, mask, old_values=old, clip_eps=0.2)
    # clipped values: 0.3, 1.0, 1.7 -> errors 0.49, 0, 0.49; max with unclipped 1, 0, 4
    assert loss_c.item() == pytest.approx(0.5 * (1 + 0 + 4) / 3)
    old2 = torch.tensor([[-1.0, 1.0, 3.0]])  # V moved towards R from far away: clipped error is larger
    loss_c2, _ = value_loss(values, returns, mask, old_values=old2, clip_eps=0.2)
    assert loss_c2.item() == pytest.approx(0.5 * ((1 - (-0.8)) ** 2 + 0 + 4) / 3)
    loss_c2.backward()
    assert values.grad[0, 0] == 0  # the clipped branch is active: no gradient through V


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    w = whiten(x, m)
    assert w[0, 3] == 0
    assert w[0, :3].mean().abs() < 1e-6 and (w[0, :3].std(unbiased=False) - 1).abs() < 1e-4


def test_critic_values_align_with_tokens_and_round_trip(tmp_path):
    model = Step35ForCausalLM(tiny())
    critic = CriticModel(model)
    ids = torch.randint(0, 256, (2, 9))
    values = critic(ids)
    assert values.shape == (2, 9) and torch.all(values == 0)  # zero-initialised head
    torch.nn.init.normal_(critic.value_head.proj.weight)
    values = critic(ids)
    # Causal: the value at position p depends only on tokens 0..p.
    ids2 = ids.clone()
    ids2[:, 5:] = (ids2[:, 5:] + 1) % 256
    assert torch.allclose(critic(ids2)[:, :5], values[:, :5], atol=1e-5)
    assert not torch.allclose(critic(ids2)[:, 5:], values[:, 5:])
    # Independent reference: the head applied to the model's own final-normed hidden states.
    h = model.model.norm(model.trunk(ids))
    assert torch.allclose(values, h @ critic.value_head.proj.weight[0] + critic.value_head.proj.bias, atol=1e-5)
    critic.save(str(tmp_path))
    loaded = CriticModel.load(str(tmp_path))
    assert torch.allclose(loaded(ids), values, atol=1e-6)
    with pytest.raises(FileNotFoundError):
        CriticModel.load(str(tmp_path / "missing"))
