"""Expert parallelism: each rank of an EP group holds E/ep routed experts and tokens travel to them.

The model's `MoE` takes its token dispatcher as an object; `AllToAllDispatcher` is the expert-parallel
one, and `apply_expert_parallel` installs it from outside the model (the model files stay single-device).
Routing (`MoE.route`), the sort by expert, the expert matmuls and the weighted sum are the model's own;
only the path of the token rows differs:

1. every rank routes its own tokens with the full, replicated router; rows (token, expert) are sorted
   by expert id, which also sorts them by destination rank;
2. `dispatch`: per-expert row counts are exchanged with one `all_to_all_single`, so each rank learns how
   many rows it will receive from every peer for each of its local experts (the split sizes); the rows
   themselves go out with `all_to_all_single` and are regrouped by local expert;
3. the local expert slice runs on them (`ExpertSlice`); `combine` regroups the outputs back and returns
   them with the reverse `all_to_all_single`, so the origin rank weights and sums them as usual.

The stacked expert weights keep their release names (`moe.gate_proj.weight`, ...) and are DTensors on
the EP mesh, sharded on the expert dimension: their global shape stays [E, out, in], so state dicts,
DCP checkpoints and resharding to another ep see the whole model. All-to-all is differentiable: the
backward of dispatch is a combine with the split sizes swapped, and vice versa.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from stepflash.model.moe import ExpertRows, MoE, StackedWeight, choose_path, expert_counts


class _AllToAll(torch.autograd.Function):
    """`dist.all_to_all_single` with autograd: the gradient goes back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """x [sum(in_splits), ...] -> [sum(out_splits), ...]; rows in_splits[r] go to rank r of `group`."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertSlice(StackedWeight):
    """One stacked projection, this rank's experts only; `weight` is a DTensor of global shape [E, out, in]."""

    def local_weight(self) -> torch.Tensor:
        w = self.weight
        return w.to_local() if isinstance(w, DTensor) else w  # [E/ep, out, in]

    def forward(self, rows: torch.Tensor, experts: ExpertRows) -> torch.Tensor:
        out = super().forward(rows, experts)
        if rows.shape[0] == 0:
            # No rows reached this rank: keep the weight in the graph so that it still gets a (zero)
            # gradient, as FSDP reduce-scatters the same tensors on every rank.
            out = out + 0.0 * self.local_weight().sum().to(out.dtype)
        return out

    @classmethod
    def slice_of(cls, full: torch.Tensor, ep_mesh: DeviceMesh) -> "ExpertSlice":
        per = full.shape[0] // ep_mesh.size()
        lo = ep_mesh.get_local_rank() * per
        holder = cls.__new__(cls)
        nn.Module.__init__(holder)
        local = full.detach()[lo:lo + per].clone()  # [E/ep, out, in]
        dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())
        holder.weight = nn.Parameter(dt, requires_grad=full.requires_grad)
        return holder


class AllToAllDispatcher:
    """Sends each routed row to the rank of its expert and brings the outputs back (module docstring)."""

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int):
        self.group, self.ep = ep_mesh.get_group(), ep_mesh.size()
        self.local_experts = num_experts // self.ep

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, path: str | None = None):
        """x [N, H], topk_idx [N, k] -> (received rows grouped by local expert, their ExpertRows, handle)."""
        ep, per = self.ep, self.local_experts
        flat = topk_idx.reshape(-1)  # [N*k]
        order = torch.argsort(flat, stable=True)  # by expert, hence by destination rank
        rows = x[order // topk_idx.shape[-1]]
        counts = expert_counts(flat, num_experts)  # [E] rows this rank sends per expert
        recv = torch.empty_like(counts)  # recv[s, e] = rows rank s sends to my local expert e
        dist.all_to_all_single(recv, counts, group=self.group)
        recv = recv.view(ep, per)  # [ep, E/ep]
        send_splits = counts.view(ep, per).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        received = all_to_all(rows, recv_splits, send_splits, self.group)  # [M, H], by source rank then expert
        # Regroup by local expert (stable, so rows of one expert keep their source order).
        expert_of_row = torch.repeat_interleave(torch.arange(per, device=x.device).repeat(ep), recv.reshape(-1))
        perm = torch.argsort(expert_of_row, stable=True)  # [M]
        unperm = torch.empty_like(perm)
        unperm[perm] = torch.arange(perm.numel(), device=perm.device)
        path = path or choose_path(received, received.shape[0], per)
        experts = ExpertRows(expert_of_row[perm], recv.sum(0), path)
        return received[perm], experts, (order, unperm, send_splits, recv_splits)

    def combine(self, rows: torch.Tensor, handle) -> torch.Tensor:
        """Expert-side rows [M, ...] -> this rank's own rows [N*k, ...] in (token, slot) order."""
        order, unperm, send_splits, recv_splits = handle
        mine = all_to_all(rows[unperm], send_splits, recv_splits, self.group)  # sorted by expert
        return torch.empty_like(mine).index_copy_(0, order, mine)


class ExpertParallelMoE(MoE):
    """A MoE whose routed experts are split over the ranks of `ep_mesh`: the model's MoE with an
    `AllToAllDispatcher` and `ExpertSlice` weights (see the module docstring)."""

    @classmethod
    def from_moe(cls, moe: MoE, ep_mesh: DeviceMesh) -> "ExpertParallelMoE":
        """Take over `moe`'s router, bias and settings; keep only this rank's slice of its experts."""
        ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
        if moe.num_experts % ep:
            raise ValueError(f"expert parallel size {ep} must divide the number of experts {moe.num_experts}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_experts, new.top_k, new.scaling = moe.num_experts, moe.top_k, moe.scaling
        new.limit, new.use_bias, new.expert_path = moe.limit, moe.use_bias, moe.expert_path
        new.gate = moe.gate  # the router stays replicated: every rank routes its own tokens over all experts
        new.register_buffer("router_bias", moe.router_bias)
        new.record_routing, new.last_routing = moe.record_routing, None
        new.record_expert_stats = moe.record_expert_stats
        new.ep_mesh, new.ep_size, new.ep_rank = ep_mesh, ep, rank
        new.local_experts = moe.num_experts // ep
        new.dispatcher = AllToAllDispatcher(ep_mesh, moe.num_experts)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(new, name, ExpertSlice.slice_of(getattr(moe, name).weight, ep_mesh))
        return new

    @property
    def expert_range(self) -> tuple[int, int]:
        """Global ids [lo, hi) of the experts this rank computes."""
        return self.ep_rank * self.local_experts, (self.ep_rank + 1) * self.local_experts


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> int:
    """Swap every MoE of `model` (decoder layers holding `.moe`) for an ExpertParallelMoE; returns how many."""
    swapped = 0
    for layer in model.model.layers:
        moe = getattr(layer, "moe", None)
        if isinstance(moe, MoE) and not isinstance(moe, ExpertParallelMoE):
            layer.moe = ExpertParallelMoE.from_moe(moe, ep_mesh)
            swapped += 1
    return swapped
