"""Expert parallelism: each rank of an EP group holds E/ep routed experts and tokens travel to them.

`ExpertParallelMoE` replaces a `stepflash.model.moe.MoE` from outside the model (the model files stay
single-device). It is a subclass, so routing (`MoE.route`: sigmoid router, selection-only bias, top-k,
renormalised and scaled weights) and the grouped expert matmul (`grouped_linear`) are the model's own;
only the path of the token rows differs:

1. every rank routes its own tokens with the full, replicated router; rows (token, expert) are sorted
   by expert id, which also sorts them by destination rank;
2. per-expert row counts are exchanged with one `all_to_all_single`, so each rank learns how many rows
   it will receive from every peer for each of its local experts (the split sizes);
3. the rows themselves go out with `all_to_all_single` (dispatch), are regrouped by local expert, run
   through the local expert slice, regrouped back and returned with the reverse `all_to_all_single`
   (combine); the origin rank weights them and sums them into its tokens exactly as `MoE.forward` does.

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

from stepflash.model.moe import MoE, StackedWeight, grouped_linear, sort_by_expert, swiglu


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


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if isinstance(w, DTensor) else w


class ExpertSlice(StackedWeight):
    """One stacked projection, this rank's experts only; `weight` is a DTensor of global shape [E, out, in].

    Called as a module (rather than read as a tensor) so that FSDP's forward hooks gather it."""

    def forward(self, rows: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """rows [M, in] grouped by local expert -> [M, out]."""
        w = _local(self.weight)  # [E/ep, out, in]
        out = grouped_linear(rows, w, counts, offsets)
        if rows.shape[0] == 0:
            # No rows reached this rank: keep the weight in the graph so that it still gets a (zero)
            # gradient, as FSDP reduce-scatters the same tensors on every rank.
            out = out + 0.0 * w.sum().to(out.dtype)
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


class ExpertParallelMoE(MoE):
    """A MoE whose routed experts are split over the ranks of `ep_mesh` (see the module docstring)."""

    @classmethod
    def from_moe(cls, moe: MoE, ep_mesh: DeviceMesh) -> "ExpertParallelMoE":
        """Take over `moe`'s router, bias and settings; keep only this rank's slice of its experts."""
        ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
        if moe.num_experts % ep:
            raise ValueError(f"expert parallel size {ep} must divide the number of experts {moe.num_experts}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_experts, new.top_k, new.scaling = moe.num_experts, moe.top_k, moe.scaling
        new.limit, new.use_bias = moe.limit, moe.use_bias
        new.gate = moe.gate  # the router stays replicated: every rank routes its own tokens over all experts
        new.register_buffer("router_bias", moe.router_bias)
        new.record_routing, new.last_routing = moe.record_routing, None
        new.record_expert_stats = getattr(moe, "record_expert_stats", False)
        new.ep_mesh, new.ep_size, new.ep_rank = ep_mesh, ep, rank
        new.local_experts = moe.num_experts // ep
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(new, name, ExpertSlice.slice_of(getattr(moe, name).weight, ep_mesh))
        return new

    @property
    def expert_range(self) -> tuple[int, int]:
        """Global ids [lo, hi) of the experts this rank computes."""
        return self.ep_rank * self.local_experts, (self.ep_rank + 1) * self.local_experts

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [M, H] grouped by local expert, counts [E/ep] -> (expert outputs [M, H] (unweighted),
        SwiGLU activations [M, inter])."""
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        hidden = swiglu(self.gate_proj(rows, counts, offsets), self.up_proj(rows, counts, offsets), self.limit)
        return self.down_proj(hidden, counts, offsets), hidden

    @torch.no_grad()
    def _expert_stats(self, out_grouped, hidden, unperm, send_splits, recv_splits, expert_of_row) -> dict:
        """The single-device MoE's `expert_stats` for this rank's own rows: per-row output norm and
        activation mean square are computed where the expert ran and sent back with the rows."""
        row_stats = torch.stack([out_grouped.float().norm(dim=-1), hidden.float().pow(2).mean(-1)], 1)[unperm]
        mine = all_to_all(row_stats, send_splits, recv_splits, self.ep_mesh.get_group())  # [N*k, 2]
        zeros = torch.zeros(self.num_experts, dtype=torch.float32, device=mine.device)
        return {"out_norm_sum": zeros.index_add(0, expert_of_row, mine[:, 0]),
                "act_sq_sum": zeros.index_add(0, expert_of_row, mine[:, 1])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        probs, topk_w, topk_idx = self.route(x)
        # counts: rows this rank sends per expert
        flat_idx, order, token_of_row, counts = sort_by_expert(topk_idx, self.num_experts)
        rows = x[token_of_row]  # [N*k, H], grouped by expert, hence by destination rank

        group, ep, per = self.ep_mesh.get_group(), self.ep_size, self.local_experts
        # Split sizes first: recv[s, e] = rows rank s sends to my local expert e.
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=group)
        recv = recv.view(ep, per)  # [ep, E/ep]
        send_splits = counts.view(ep, per).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        received = all_to_all(rows, recv_splits, send_splits, group)  # [M, H], by source rank then expert
        # Regroup by local expert (stable, so rows of one expert keep their source order).
        expert_of_row = torch.repeat_interleave(torch.arange(per, device=x.device).repeat(ep), recv.reshape(-1))
        perm = torch.argsort(expert_of_row, stable=True)  # [M]
        unperm = torch.empty_like(perm)
        unperm[perm] = torch.arange(perm.numel(), device=perm.device)
        out_grouped, hidden = self._experts(received[perm], recv.sum(0))
        out_rows = all_to_all(out_grouped[unperm], send_splits, recv_splits, group)  # [N*k, H], my rows, sorted
        if self.record_routing:
            self.last_routing = {"probs": probs, "topk_idx": topk_idx, "counts": counts}
            if self.record_expert_stats:
                self.last_routing.update(self._expert_stats(out_grouped, hidden, unperm, send_splits, recv_splits,
                                                            flat_idx[order]))
        out_rows = out_rows * topk_w.reshape(-1)[order, None].to(out_rows.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of_row, out_rows)
        return out.reshape(shape)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> int:
    """Swap every MoE of `model` (decoder layers holding `.moe`) for an ExpertParallelMoE; returns how many."""
    swapped = 0
    for layer in model.model.layers:
        moe = getattr(layer, "moe", None)
        if isinstance(moe, MoE) and not isinstance(moe, ExpertParallelMoE):
            layer.moe = ExpertParallelMoE.from_moe(moe, ep_mesh)
            swapped += 1
    return swapped
