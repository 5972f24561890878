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
- Updates. Each mini-batch of the global permutation is split over the ranks (`local_rows`); a rank's
  loss, normalised over its own rows, is multiplied by `share` (its part of the mini-batch's
  normaliser) and the gradients are summed over ranks (`Session.sum_grads`): the sum is the gradient of
  the whole mini-batch's loss. All ranks apply the same summed gradient, so their weights stay equal,
  and each takes every optimiser step, also when its part of a small mini-batch is empty.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from stepflash.distributed.launch import Session
from stepflash.rl.rollout import RolloutBatch


def share(local_mask: torch.Tensor, global_mask: torch.Tensor, normalization: str) -> float:
    """This rank's part of a mini-batch's loss normaliser (`losses.reduce_loss`): multiplying its loss,
    normalised over its own rows, by it and summing over ranks gives the loss normalised over all rows."""
    if normalization == "token":
        return float(local_mask.sum() / global_mask.sum().clamp(min=1))
    if normalization == "sequence":
        return float((local_mask.sum(1) > 0).sum() / (global_mask.sum(1) > 0).sum().clamp(min=1))
    return 1.0  # "none": a plain sum over tokens is already additive over ranks


class RankGroup:
    """This rank's view of an RL step split over a torchrun launch (module docstring)."""

    def __init__(self, session: Session):
        self.session = session

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world_size(self) -> int:
        return self.session.world_size

    @property
    def is_main(self) -> bool:
        return self.session.is_main

    def span(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of n items (sizes differ by at most one)."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        lo, hi = self.span(len(idx))
        return idx[lo:hi]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (collective)."""
        t = torch.tensor(values, dtype=torch.float64)
        self.session.all_reduce(t)
        return t.tolist()

    def sum_grads(self, params) -> None:
        self.session.sum_grads(params)

    def barrier(self) -> None:
        self.session.barrier()

    def gather(self, batch: RolloutBatch, scores: dict, pad_id: int) -> tuple[RolloutBatch, dict]:
        """The whole step's batch and scores from every rank's own (collective). 2-D tensors are padded on
        the right to the longest sequence of any rank (ids with pad_id, the rest with 0: masked anyway);
        group indices are offset so that rank r's prompts follow rank r-1's. Texts stay behind."""
        s_local = batch.ids.shape[1]
        s = torch.tensor([s_local])
        self.session.all_reduce(s, op=dist.ReduceOp.MAX)
        s = int(s)

        def whole(t: torch.Tensor | None, value: float = 0) -> torch.Tensor | None:
            if t is None:
                return None
            if t.dim() == 2:  # [b, S] or [b, S-1]: keep the offset to the sequence length
                t = F.pad(t, (0, s - s_local), value=value)
            return self.session.all_gather(t)

        prompts_here = int(batch.group.max()) + 1  # every rank rolls out the same number of prompts
        whole_batch = RolloutBatch(whole(batch.ids, pad_id), whole(batch.response_mask),
                                   whole(batch.behavior_logprobs), whole(batch.last_pos), whole(batch.rewards),
                                   whole(batch.truncated.long()).bool(),
                                   whole(batch.group + self.rank * prompts_here))
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
