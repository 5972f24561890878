"""One RL step on a rollout batch: steps 2-5 of `trainer.py`'s docstring, as small functions.

`score` (pi_old, entropy, reference log-probs, values; no grad) -> `rollout_metrics` (rewards, lengths,
MIS-PO acceptance rates) -> `advantages` (GAE from the critic, or GRPO's group-normalised rewards) ->
`actor_epoch` -> `critic_epoch`. `train_step` chains them. With a `RankGroup` (torchrun) the batch passed
in is this rank's rollouts: `train_step` scores and gathers it, and the epochs train on this rank's rows
of every mini-batch with gradients summed over ranks (`data_parallel.py`). Without one, nothing here
communicates and the arithmetic is the one-process step's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from stepflash.rl.advantages import gae, value_loss
from stepflash.rl.data_parallel import MOMENTS, RankGroup, explained_variance, moment_sums, share
from stepflash.rl.losses import grpo_advantages, kl_penalty, mispo_loss, mispo_masks, ppo_clip_loss
from stepflash.rl.rollout import RolloutBatch, RolloutWorker

if TYPE_CHECKING:
    from stepflash.rl.trainer import RLArgs


# ---- per-token quantities --------------------------------------------------------------------------

def logprobs_and_entropy(model, ids: torch.Tensor, want_entropy: bool = False):
    """log pi(ids[:, 1:]) [B, S-1] in fp32 and, optionally, the entropy of each predictive distribution."""
    logp_all = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)  # [B, S-1, V]
    lp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if want_entropy else None
    return lp, ent


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


# ---- one step ----------------------------------------------------------------------------------

@dataclass
class State:
    """Everything a step changes (saved in trainer_state.pt)."""
    policy: torch.nn.Module
    critic: torch.nn.Module | None
    ref: torch.nn.Module | None
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer | None
    worker: RolloutWorker


def _clip(params, max_norm: float) -> float:
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))


@torch.no_grad()
def score(st: State, batch: RolloutBatch) -> dict:
    """Step 2: pi_old and its entropy [B, S-1], the reference's log-probs [B, S-1] and the values [B, S]."""
    old_lp, ent = logprobs_and_entropy(st.policy, batch.ids, want_entropy=True)
    return {"old_lp": old_lp, "entropy": ent,
            "ref_lp": logprobs_and_entropy(st.ref, batch.ids)[0] if st.ref is not None else None,
            "values": st.critic(batch.ids) if st.critic is not None else None}


@torch.no_grad()
def rollout_metrics(a: RLArgs, batch: RolloutBatch, sc: dict) -> dict:
    """The batch's rewards, lengths and MIS-PO acceptance rates (pi_old vs mu), whatever the algorithm."""
    mask = batch.response_mask
    keep, token_ok, traj_ok, log_x = mispo_masks(sc["old_lp"], batch.behavior_logprobs, mask,
                                                 tuple(a.token_bounds), tuple(a.traj_bounds))
    return {"reward": float(batch.rewards.mean()), "truncation_rate": float(batch.truncated.float().mean()),
            "response_length": float(mask.sum(1).mean()),
            "token_accept_rate": float(token_ok.sum() / mask.sum().clamp(min=1)),
            "traj_accept_rate": float(traj_ok.float().mean()),
            "kept_fraction": float(keep.sum() / mask.sum().clamp(min=1)),
            "mean_abs_log_ratio": masked_mean(log_x.abs(), mask),
            "entropy": masked_mean(sc["entropy"], mask)}


@torch.no_grad()
def advantages(a: RLArgs, batch: RolloutBatch, sc: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 3: (advantages [B, S-1] from the critic, or [B] for grpo; returns [B, S-1] or None)."""
    if sc["values"] is None:
        P = int(batch.group.max()) + 1
        return grpo_advantages(batch.rewards.view(P, -1)).reshape(-1), None
    v_full = sc["values"]  # [B, S]
    last_values = v_full[torch.arange(batch.size), batch.last_pos]
    truncated = batch.truncated if a.bootstrap_truncated else torch.zeros_like(batch.truncated)
    return gae(v_full[:, :-1], batch.rewards, batch.response_mask, truncated, last_values)


def _shares(dp, sub_mask: torch.Tensor, mb_mask: torch.Tensor, normalization: str) -> tuple[float, float]:
    """(loss share, token share) of this rank's rows in a mini-batch: (1, 1) in one process."""
    if dp is None:
        return 1.0, 1.0
    return share(sub_mask, mb_mask, normalization), share(sub_mask, mb_mask, "token")


def actor_epoch(a: RLArgs, st: State, batch: RolloutBatch, sc: dict, adv: torch.Tensor, gen: torch.Generator,
                dp: RankGroup | None = None) -> dict:
    """Step 4: one epoch in `actor_minibatches` updates; under torchrun each rank takes its rows of every
    mini-batch and the gradients are summed (data_parallel.py)."""
    actor_params = [p for p in st.policy.parameters() if p.requires_grad]
    st.policy.train()
    norms, rows_stats = [], []  # rows_stats: per mini-batch [loss, clip_fraction, kl_ref], this rank's shares
    for idx in torch.randperm(batch.size, generator=gen).chunk(a.actor_minibatches):
        rows = idx if dp is None else dp.local_rows(idx)
        st.actor_opt.zero_grad(set_to_none=True)
        vals = [0.0, 0.0, 0.0]
        if len(rows):  # an empty share (tiny mini-batch, many ranks) still takes part in the update
            sub = batch.select(rows)
            T = sub.ids.shape[1] - 1
            lp, _ = logprobs_and_entropy(st.policy, sub.ids)  # [b, T] with grad
            sub_adv = adv[rows] if adv.dim() == 1 else adv[rows, :T]
            w, w_tok = _shares(dp, sub.response_mask, batch.response_mask[idx], a.normalization)
            if a.algo == "mispo":
                loss, stats = mispo_loss(lp, sc["old_lp"][rows, :T], sub.behavior_logprobs, sub_adv,
                                         sub.response_mask, tuple(a.token_bounds), tuple(a.traj_bounds),
                                         a.normalization)
            else:
                loss, stats = ppo_clip_loss(lp, sc["old_lp"][rows, :T], sub_adv, sub.response_mask, a.clip_eps,
                                            normalization=a.normalization)
                vals[1] = stats["clip_fraction"] * w_tok
            if sc["ref_lp"] is not None:
                kl = kl_penalty(lp, sc["ref_lp"][rows, :T], sub.response_mask, a.kl_coef, a.normalization)
                vals[2] = float(kl.detach()) / max(a.kl_coef, 1e-12) * w
                loss = loss + kl
            if dp is not None:
                loss = loss * w
            loss.backward()
            vals[0] = float(loss.detach())
        if dp is not None:
            dp.sum_grads(actor_params)
        norms.append(_clip(actor_params, a.grad_clip))
        st.actor_opt.step()
        st.worker.on_update(st.policy)
        rows_stats.append(vals)
    if dp is not None:
        n = len(rows_stats)
        rows_stats = torch.tensor(dp.sum(sum(rows_stats, []))).view(n, 3).tolist()
    m = {"loss": sum(r[0] for r in rows_stats) / len(rows_stats), "grad_norm": sum(norms) / len(norms),
         "grad_norm_max": max(norms)}
    if a.algo != "mispo":
        m["clip_fraction"] = sum(r[1] for r in rows_stats) / len(rows_stats)
    if sc["ref_lp"] is not None:
        m["kl_ref"] = sum(r[2] for r in rows_stats) / len(rows_stats)
    return m


def critic_epoch(a: RLArgs, st: State, batch: RolloutBatch, returns: torch.Tensor, gen: torch.Generator,
                 dp: RankGroup | None = None) -> dict:
    """Step 5: one epoch of 0.5 (V - R)^2 in `critic_minibatches` updates (split over ranks like the actor's)."""
    ev, rows_stats = [], []  # rows_stats: per mini-batch [loss share, explained-variance moment sums...]
    for idx in torch.randperm(batch.size, generator=gen).chunk(a.critic_minibatches):
        rows = idx if dp is None else dp.local_rows(idx)
        st.critic_opt.zero_grad(set_to_none=True)
        vals = [0.0] * (1 + len(MOMENTS))
        if len(rows):
            sub = batch.select(rows)
            T = sub.ids.shape[1] - 1
            values = st.critic(sub.ids)[:, :-1]
            loss, stats = value_loss(values, returns[rows, :T], sub.response_mask)
            ev.append(max(stats["explained_variance"], -1.0))  # clamp: ~0-variance returns blow it up
            if dp is not None:
                loss = loss * share(sub.response_mask, batch.response_mask[idx], "token")
                vals[1:] = moment_sums(values, returns[rows, :T], sub.response_mask)
            loss.backward()
            vals[0] = float(loss.detach())
        if dp is not None:
            dp.sum_grads(st.critic.parameters())
        _clip(st.critic.parameters(), a.grad_clip)
        st.critic_opt.step()
        rows_stats.append(vals)
    if dp is not None:  # the explained variance of each whole mini-batch, from the moments summed over ranks
        n = len(rows_stats)
        rows_stats = torch.tensor(dp.sum(sum(rows_stats, []))).view(n, -1).tolist()
        ev = [max(explained_variance(r[1:]), -1.0) for r in rows_stats]
    return {"value_loss": sum(r[0] for r in rows_stats) / len(rows_stats), "explained_variance": sum(ev) / len(ev)}


def train_step(a: RLArgs, st: State, batch: RolloutBatch, gen: torch.Generator, dp: RankGroup | None = None,
               pad_id: int = 0) -> dict:
    """Steps 2-5 of the module docstring on one rollout batch; returns its metrics. Under torchrun `batch`
    holds this rank's rollouts: they are scored here, then gathered, and every rank goes on with the whole
    batch (data_parallel.py)."""
    sc = score(st, batch)
    if dp is not None:
        batch, sc = dp.gather(batch, sc, pad_id)
    m = rollout_metrics(a, batch, sc)
    adv, returns = advantages(a, batch, sc)
    m.update(actor_epoch(a, st, batch, sc, adv, gen, dp))
    if st.critic is not None:
        m.update(critic_epoch(a, st, batch, returns, gen, dp))
    return m
