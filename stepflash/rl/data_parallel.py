"""Data parallelism for `stepflash rl` under torchrun: N ranks run the one-process RL step on shares of it.

Every rank holds a whole copy of the policy, the critic, the reference and its own rollout engine
(replicated, not FSDP: the engine needs the whole model, and the RL models that fit a CPU or one GPU
fit every rank). What makes a step of N ranks equal the one-process step on the same seed:

- Rollouts. The step's prompts are split into contiguous slices (`span`). The engine samples prompt i
  of a call with seed + i on its own random stream, so a rank whose slice starts at sample s passes
  seed + s: global sample j gets seed + j on whichever rank draws it, and the union of the ranks'
  rollouts is the one-process batch.
- Scoring. Each rank scores its own rollouts (pi_old, entropy, values, reference log-probs), then
  `gather` pads them to the step's longest sequence and all-gathers batch and scores. Every rank then
  holds the whole scored batch, so the logged rollout metrics, the advantages (GRPO groups included)
  and the mini-batch permutation are the one-process ones, with no further collective.
- Updates. Each mini-batch of the global permutation is split over the ranks (`Runtime.span`); a rank's
  loss, normalised over its own rows, is multiplied by `share` (its part of the mini-batch's normaliser)
  and by the world size, and trained through torch's DistributedDataParallel (`Runtime.replicate`),
  whose gradient average over ranks is then the gradient of the whole mini-batch's loss. All ranks apply
  the same gradient, so their weights stay equal, and each takes every optimiser step: a rank whose part
  of a small mini-batch is empty runs one row with weight 0, because DDP's all-reduce needs every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stepflash.distributed.runtime import Runtime
from stepflash.rl.rollout import RolloutBatch


def share(local_mask: torch.Tensor, global_mask: torch.Tensor, normalization: str) -> float:
    """This rank's part of a mini-batch's loss normaliser (`losses.reduce_loss`): multiplying its loss,
    normalised over its own rows, by it and summing over ranks gives the loss normalised over all rows."""
    if normalization == "token":
        return float(local_mask.sum() / global_mask.sum().clamp(min=1))
    if normalization == "sequence":
        return float((local_mask.sum(1) > 0).sum() / (global_mask.sum(1) > 0).sum().clamp(min=1))
    return 1.0  # "none": a plain sum over tokens is already additive over ranks


def local_rows(rt: Runtime, idx: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of a mini-batch's row indices."""
    lo, hi = rt.span(len(idx))
    return idx[lo:hi]


def gather_batch(rt: Runtime, batch: RolloutBatch, scores: dict, pad_id: int) -> tuple[RolloutBatch, dict]:
    """The whole step's batch and scores from every rank's own (collective). 2-D tensors are padded on the
    right to the longest sequence of any rank (ids with pad_id, the rest with 0: masked anyway); group
    indices are offset so that rank r's prompts follow rank r-1's. Texts stay behind."""
    s_local = batch.ids.shape[1]
    s = int(rt.max(s_local))

    def whole(t: torch.Tensor | None, value: float = 0) -> torch.Tensor | None:
        if t is None:
            return None
        if t.dim() == 2:  # [b, S] or [b, S-1]: keep the offset to the sequence length
            t = F.pad(t, (0, s - s_local), value=value)
        return rt.all_gather(t)

    prompts_here = int(batch.group.max()) + 1  # every rank rolls out the same number of prompts
    whole_batch = RolloutBatch(whole(batch.ids, pad_id), whole(batch.response_mask), whole(batch.behavior_logprobs),
                               whole(batch.last_pos), whole(batch.rewards), whole(batch.truncated.long()).bool(),
                               whole(batch.group + rt.rank * prompts_here))
    return whole_batch, {k: whole(v) for k, v in scores.items()}


MOMENTS = ("count", "sum_r", "sum_r2", "sum_d", "sum_d2")


def moment_sums(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """The sums over response tokens that the explained variance 1 - Var(R - V) / Var(R) of a whole
    mini-batch is computed from after summing them over ranks (fp64: they are differenced)."""
    m = mask.bool()
    r, d = returns.detach()[m].double(), (returns.detach() - values.detach())[m].double()
    return [float(m.sum()), float(r.sum()), float((r * r).sum()), float(d.sum()), float((d * d).sum())]


def explained_variance(sums: list[float]) -> float:
    """1 - Var(R - V) / Var(R) from `moment_sums` (0 when the returns do not vary), as `value_loss` gives it."""
    n, sr, srr, sd, sdd = sums
    if n == 0:
        return 0.0
    var_r = srr / n - (sr / n) ** 2
    var_d = sdd / n - (sd / n) ** 2
    return 1.0 - var_d / var_r if var_r > 1e-12 * (srr / n) else 0.0  # below: cancellation noise
