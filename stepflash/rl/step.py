"""One RL step on a rollout batch: steps 2-5 of `trainer.py`'s docstring, as small functions.

`score` (pi_old, entropy, reference log-probs, values; no grad) -> `rollout_metrics` (rewards, lengths,
MIS-PO acceptance rates) -> `advantages` (GAE from the critic, or GRPO's group-normalised rewards) ->
`actor_epoch` -> `critic_epoch`. `train_step` chains them. Under torchrun (a distributed `Runtime`) the
batch passed in is this rank's rollouts: `train_step` scores and gathers it, and the epochs train on this
rank's rows of every mini-batch through DDP-replicated models (`data_parallel.py`). In one process
nothing here communicates and the arithmetic is the one-process step's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from stepflash.distributed.runtime import Runtime
from stepflash.rl.advantages import gae, value_loss
from stepflash.rl.data_parallel import MOMENTS, explained_variance, gather_batch, local_rows, moment_sums, share
from stepflash.rl.losses import grpo_advantages, kl_penalty, mispo_loss, mispo_masks, ppo_clip_loss
from stepflash.rl.rollout import RolloutBatch, RolloutWorker
from stepflash.training.losses import logprobs_and_entropy as token_logprobs_and_entropy
from stepflash.training.losses import masked_mean, token_logprobs

if TYPE_CHECKING:
    from stepflash.rl.trainer import RLArgs


# ---- per-token quantities --------------------------------------------------------------------------

def logprobs_and_entropy(model, ids: torch.Tensor, want_entropy: bool = False):
    """log pi(ids[:, 1:]) [B, S-1] in fp32 and, optionally, the entropy of each predictive distribution."""
    logits = model(ids[:, :-1])  # [B, S-1, V]
    if want_entropy:
        return token_logprobs_and_entropy(logits, ids[:, 1:])
    return token_logprobs(logits, ids[:, 1:]), None


# ---- one step ----------------------------------------------------------------------------------

@dataclass
class State:
    """Everything a step changes (saved in trainer_state.pt), and the models training runs through: `actor`
    and `critic_net` are the policy and critic replicated over ranks (DDP), or themselves in one process."""
    policy: torch.nn.Module
    critic: torch.nn.Module | None
    ref: torch.nn.Module | None
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer | None
    worker: RolloutWorker
    actor: torch.nn.Module | None = None
    critic_net: torch.nn.Module | None = None

    def replicate(self, rt: Runtime) -> None:
        self.actor = rt.replicate(self.policy)
        self.critic_net = rt.replicate(self.critic) if self.critic is not None else None


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
            "mean_abs_log_ratio": float(masked_mean(log_x.abs(), mask)),
            "entropy": float(masked_mean(sc["entropy"], mask))}


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


def _rows(rt: Runtime, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's rows of a mini-batch and the weight of their loss: 1, or 0 for a stand-in row when the
    rank's part is empty (DDP's gradient all-reduce needs a backward on every rank)."""
    rows = local_rows(rt, idx) if rt.distributed else idx
    return (rows, 1.0) if len(rows) else (idx[:1], 0.0)


def _scale(rt: Runtime, sub_mask: torch.Tensor, mb_mask: torch.Tensor, normalization: str, present: float
           ) -> tuple[float, float]:
    """(loss share, token share) of this rank's rows in a mini-batch: (1, 1) in one process."""
    if not rt.distributed:
        return 1.0, 1.0
    return present * share(sub_mask, mb_mask, normalization), present * share(sub_mask, mb_mask, "token")


def actor_epoch(a: RLArgs, st: State, batch: RolloutBatch, sc: dict, adv: torch.Tensor, gen: torch.Generator,
                rt: Runtime) -> dict:
    """Step 4: one epoch in `actor_minibatches` updates; under torchrun each rank takes its rows of every
    mini-batch and DDP averages the gradients (data_parallel.py)."""
    actor_params = [p for p in st.policy.parameters() if p.requires_grad]
    st.policy.train()
    norms, rows_stats = [], []  # rows_stats: per mini-batch [loss, clip_fraction, kl_ref], this rank's shares
    for idx in torch.randperm(batch.size, generator=gen).chunk(a.actor_minibatches):
        rows, present = _rows(rt, idx)
        st.actor_opt.zero_grad(set_to_none=True)
        vals = [0.0, 0.0, 0.0]
        sub = batch.select(rows)
        T = sub.ids.shape[1] - 1
        lp, _ = logprobs_and_entropy(st.actor, sub.ids)  # [b, T] with grad
        sub_adv = adv[rows] if adv.dim() == 1 else adv[rows, :T]
        w, w_tok = _scale(rt, sub.response_mask, batch.response_mask[idx], a.normalization, present)
        if a.algo == "mispo":
            loss, stats = mispo_loss(lp, sc["old_lp"][rows, :T], sub.behavior_logprobs, sub_adv, sub.response_mask,
                                     tuple(a.token_bounds), tuple(a.traj_bounds), a.normalization)
        else:
            loss, stats = ppo_clip_loss(lp, sc["old_lp"][rows, :T], sub_adv, sub.response_mask, a.clip_eps,
                                        normalization=a.normalization)
            vals[1] = stats["clip_fraction"] * w_tok
        if sc["ref_lp"] is not None:
            kl = kl_penalty(lp, sc["ref_lp"][rows, :T], sub.response_mask, a.kl_coef, a.normalization)
            vals[2] = float(kl.detach()) / max(a.kl_coef, 1e-12) * w
            loss = loss + kl
        if rt.distributed:
            loss = loss * w
        vals[0] = float(loss.detach())
        (loss * rt.world_size).backward()  # DDP averages over ranks: the sum of the ranks' shares
        norms.append(float(rt.clip_grad_norm(actor_params, a.grad_clip)))
        st.actor_opt.step()
        st.worker.on_update(st.policy)
        rows_stats.append(vals)
    if rt.distributed:
        n = len(rows_stats)
        rows_stats = torch.tensor(rt.sum(sum(rows_stats, []))).view(n, 3).tolist()
    m = {"loss": sum(r[0] for r in rows_stats) / len(rows_stats), "grad_norm": sum(norms) / len(norms),
         "grad_norm_max": max(norms)}
    if a.algo != "mispo":
        m["clip_fraction"] = sum(r[1] for r in rows_stats) / len(rows_stats)
    if sc["ref_lp"] is not None:
        m["kl_ref"] = sum(r[2] for r in rows_stats) / len(rows_stats)
    return m


def critic_epoch(a: RLArgs, st: State, batch: RolloutBatch, returns: torch.Tensor, gen: torch.Generator,
                 rt: Runtime) -> dict:
    """Step 5: one epoch of 0.5 (V - R)^2 in `critic_minibatches` updates (split over ranks like the actor's)."""
    ev, rows_stats = [], []  # rows_stats: per mini-batch [loss share, explained-variance moment sums...]
    for idx in torch.randperm(batch.size, generator=gen).chunk(a.critic_minibatches):
        rows, present = _rows(rt, idx)
        st.critic_opt.zero_grad(set_to_none=True)
        vals = [0.0] * (1 + len(MOMENTS))
        sub = batch.select(rows)
        T = sub.ids.shape[1] - 1
        values = st.critic_net(sub.ids)[:, :-1]
        loss, stats = value_loss(values, returns[rows, :T], sub.response_mask)
        if present:
            ev.append(max(stats["explained_variance"], -1.0))  # clamp: ~0-variance returns blow it up
        if rt.distributed:
            loss = loss * present * share(sub.response_mask, batch.response_mask[idx], "token")
            vals[1:] = [present * x for x in moment_sums(values, returns[rows, :T], sub.response_mask)]
        vals[0] = float(loss.detach())
        (loss * rt.world_size).backward()
        rt.clip_grad_norm(list(st.critic.parameters()), a.grad_clip)
        st.critic_opt.step()
        rows_stats.append(vals)
    if rt.distributed:  # the explained variance of each whole mini-batch, from the moments summed over ranks
        n = len(rows_stats)
        rows_stats = torch.tensor(rt.sum(sum(rows_stats, []))).view(n, -1).tolist()
        ev = [max(explained_variance(r[1:]), -1.0) for r in rows_stats]
    return {"value_loss": sum(r[0] for r in rows_stats) / len(rows_stats), "explained_variance": sum(ev) / len(ev)}


def train_step(a: RLArgs, st: State, batch: RolloutBatch, gen: torch.Generator, rt: Runtime | None = None,
               pad_id: int = 0) -> dict:
    """Steps 2-5 of the module docstring on one rollout batch; returns its metrics. Under torchrun `batch`
    holds this rank's rollouts: they are scored here, then gathered, and every rank goes on with the whole
    batch (data_parallel.py)."""
    rt = rt or Runtime()
    if st.actor is None:
        st.replicate(rt)
    sc = score(st, batch)
    if rt.distributed:
        batch, sc = gather_batch(rt, batch, sc, pad_id)
    m = rollout_metrics(a, batch, sc)
    adv, returns = advantages(a, batch, sc)
    m.update(actor_epoch(a, st, batch, sc, adv, gen, rt))
    if st.critic is not None:
        m.update(critic_epoch(a, st, batch, returns, gen, rt))
    return m
