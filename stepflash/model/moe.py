"""Feed-forward blocks: clamped SwiGLU, the sigmoid router, and routed experts behind a token dispatcher.

Routing (fp32): p = sigmoid(x @ gate^T); the top-k experts are chosen by p + router_bias (the bias,
moved by the loss-free balancer, only selects); their weights are the unbiased p, renormalised to sum
to one and multiplied by `moe_router_scaling_factor`.

A MoE forward: route; hand the (token, expert) rows to the dispatcher, which delivers them to the device
holding their expert, grouped by expert (`LocalDispatcher`: they stay here; the all-to-all dispatcher of
`stepflash.distributed.expert_parallel` for expert parallelism); run each local expert on its rows;
`combine` brings the outputs back in (token, slot) order; weight and sum per token.

Experts are stored stacked, as in the release ([E, inter, hidden] for gate/up, [E, hidden, inter] for
down). `ExpertRows.linear` multiplies only the experts that received rows, in one of three ways:
- "grouped_mm": one `torch._grouped_mm` kernel (CUDA, bf16, sm90+; and CPU fp32 training, eager with autograd
  on: there its backward beats the loop's per-expert autograd nodes, 1.2x on a `small` training step,
  benchmarks/RESULTS.md);
- "gather": each row with its own expert's matrix gathered (decode-sized batches: static shapes and no
  sorting, so a compiled decode step has no graph break and no host sync);
- "loop": one matmul per expert that has rows (CPU prefill; and CPU training under torch.compile, where
  the fake kernel of `torch._grouped_mm` takes only bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stepflash.config import Step35Config
from stepflash.model.fused import FusedLinear, ReleaseNames, keep_release_names


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up, with the release's clamp when limit > 0: silu clamped above, up clamped both sides."""
    a = F.silu(gate)
    if limit > 0:
        a = a.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return a * up


class SwiGLU(ReleaseNames, nn.Module):
    """Dense MLP (layers before the first MoE layer, MTP blocks) and the shared expert. gate and up are
    one product (`gate_up_proj`); the state dict keeps `gate_proj` and `up_proj` (`model/fused.py`)."""

    RELEASE_ORDER = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, hidden: int, inter: int, limit: float = 0.0):
        super().__init__()
        self.limit = limit
        self.gate_up_proj = FusedLinear(hidden, {"gate_proj": inter, "up_proj": inter})
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        keep_release_names(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(swiglu(gate, up, self.limit))


# ---- routed rows and the experts that multiply them ---------------------------------------------

def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows per expert [E] (a scatter-add, not bincount: static shapes, so it compiles)."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":  # training, eager, fp32 (module docstring); never inside a compiled graph
        return x.dtype == torch.float32 and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    # The CUDA kernel wants bf16 on sm90+.
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


def choose_path(x: torch.Tensor, num_rows: int, num_local_experts: int) -> str:
    """grouped_mm where the kernel pays (`_grouped_mm_ok`); gather while there are no more rows than experts
    (at most one copy of the experts' weights is gathered); else the per-expert loop."""
    if num_rows and _grouped_mm_ok(x):  # (no rows: the CPU kernel's backward fails on an empty input)
        return "grouped_mm"
    return "gather" if num_rows <= num_local_experts else "loop"


@dataclass
class ExpertRows:
    """Which local expert each row goes to, and how the rows are multiplied (module docstring)."""
    expert_of_row: torch.Tensor  # [M] local expert id (non-decreasing unless path is "gather")
    counts: torch.Tensor | None  # [E_local] rows per expert; None on the gather path
    path: str  # "grouped_mm", "gather" or "loop"

    def linear(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rows [M, in], weight [E_local, out, in] -> [M, out]."""
        if self.path == "grouped_mm":
            offsets = torch.cumsum(self.counts, 0).to(torch.int32)
            out = torch._grouped_mm(rows, weight.transpose(-2, -1), offs=offsets)
            if out.requires_grad:  # the CPU backward rejects a broadcast gradient (e.g. of a .sum())
                out.register_hook(torch.Tensor.contiguous)
            return out
        if self.path == "gather":
            return torch.bmm(weight[self.expert_of_row], rows[:, :, None]).squeeze(-1)
        return _per_expert_loop(rows, weight, self.counts)


@torch.compiler.disable  # data-dependent shapes: stays eager inside a compiled region
def _per_expert_loop(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    outs = [xe @ weight[e].T for e, xe in enumerate(torch.split(rows, counts.tolist())) if xe.shape[0]]
    return torch.cat(outs) if outs else rows.new_zeros(0, weight.shape[1])


class StackedWeight(nn.Module):
    """Holds one [E, out, in] tensor under the release's name `<proj>.weight` and multiplies rows routed
    to experts with it. Called as a module so that FSDP's hooks gather a sharded weight first."""

    def __init__(self, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def local_weight(self) -> torch.Tensor:
        """[E_local, out, in]: the experts this device computes (all of them here)."""
        return self.weight

    def forward(self, rows: torch.Tensor, experts: ExpertRows) -> torch.Tensor:
        return experts.linear(rows, self.local_weight())


class LocalDispatcher:
    """Every expert lives on this device. Rows are grouped by expert (a stable sort) for the grouped
    paths; the gather path multiplies each row by its own expert's matrix and needs no grouping."""

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, path: str | None = None):
        """x [N, H], topk_idx [N, k] -> (rows [N*k, H] for the experts, their ExpertRows, handle for combine)."""
        flat = topk_idx.reshape(-1)  # [N*k], (token, slot) order
        token_of_row = torch.arange(flat.numel(), device=x.device) // topk_idx.shape[-1]
        path = path or choose_path(x, flat.numel(), num_experts)
        if path == "gather":
            return x[token_of_row], ExpertRows(flat, None, path), None
        order = torch.argsort(flat, stable=True)
        return x[token_of_row[order]], ExpertRows(flat[order], expert_counts(flat, num_experts), path), order

    def combine(self, rows: torch.Tensor, order) -> torch.Tensor:
        """Expert-side rows (outputs, or any per-row values) -> [N*k, ...] in (token, slot) order."""
        return rows if order is None else torch.empty_like(rows).index_copy_(0, order, rows)


# ---- the MoE block -----------------------------------------------------------------------------

class MoE(nn.Module):
    def __init__(self, cfg: Step35Config, layer_idx: int):
        super().__init__()
        e, h, i = cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.top_k = e, cfg.moe_top_k
        self.scaling = cfg.moe_router_scaling_factor
        self.limit = cfg.swiglu_limits[layer_idx]
        self.use_bias = cfg.use_moe_router_bias
        self.gate = nn.Linear(h, e, bias=False)
        # Selection-only bias moved by the loss-free balancer; not a gradient-trained parameter.
        self.register_buffer("router_bias", torch.zeros(e, dtype=torch.float32))
        self.gate_proj = StackedWeight(e, i, h)
        self.up_proj = StackedWeight(e, i, h)
        self.down_proj = StackedWeight(e, h, i)
        self.dispatcher = LocalDispatcher()
        self.expert_path: str | None = None  # None: chosen per forward (ExpertRows.of); tests force one
        # Set by the trainer: keep the last forward's routing for balance losses and monitors;
        # record_expert_stats adds per-expert output norms and activation RMS (stability monitors).
        self.record_routing = False
        self.record_expert_stats = False
        self.last_routing: dict | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> probs [N, E] fp32, top-k weights [N, k] fp32, top-k expert ids [N, k]."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 routing even under bf16 autocast
            probs = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))  # [N, E]
        scores = probs + self.router_bias if self.use_bias else probs
        topk_idx = torch.topk(scores, self.top_k, dim=-1).indices  # [N, k]
        topk_w = probs.gather(-1, topk_idx)
        topk_w = topk_w / topk_w.sum(-1, keepdim=True) * self.scaling
        return probs, topk_w, topk_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        probs, topk_w, topk_idx = self.route(x)
        rows, experts, handle = self.dispatcher.dispatch(x, topk_idx, self.num_experts, self.expert_path)
        hidden = swiglu(self.gate_proj(rows, experts), self.up_proj(rows, experts), self.limit)  # [M, inter]
        out = self.down_proj(hidden, experts)  # [M, H] on the experts' side
        out_rows = self.dispatcher.combine(out, handle)  # [N*k, H] in (token, slot) order
        if self.record_routing:
            self.last_routing = {"probs": probs, "topk_idx": topk_idx, "counts": expert_counts(topk_idx, self.num_experts)}
            if self.record_expert_stats:
                row_stats = self.dispatcher.combine(expert_row_stats(hidden, out), handle)
                self.last_routing.update(expert_stats(row_stats, topk_idx.reshape(-1), self.num_experts))
        weighted = out_rows.view(*topk_idx.shape, x.shape[-1]) * topk_w[..., None].to(out_rows.dtype)  # [N, k, H]
        return weighted.sum(1).reshape(shape)


@torch.no_grad()
def expert_row_stats(hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per row, where its expert ran: L2 norm of the expert output before the gating weight, and mean
    square of the SwiGLU activation. hidden [M, inter], out [M, H] -> [M, 2] fp32."""
    return torch.stack([out.float().norm(dim=-1), hidden.float().pow(2).mean(-1)], 1)


@torch.no_grad()
def expert_stats(row_stats: torch.Tensor, expert_of_row: torch.Tensor, num_experts: int) -> dict:
    """Per-expert sums of `expert_row_stats` (divide by counts for means)."""
    zeros = torch.zeros(num_experts, dtype=torch.float32, device=row_stats.device)
    return {"out_norm_sum": zeros.index_add(0, expert_of_row, row_stats[:, 0]),
            "act_sq_sum": zeros.index_add(0, expert_of_row, row_stats[:, 1])}


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Slow per-token loop straight from the formula; for tests and benchmarks only."""
    flat = x.reshape(-1, x.shape[-1])
    _, topk_w, topk_idx = moe.route(flat)
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for w, e in zip(topk_w[n], topk_idx[n]):
            g = flat[n] @ moe.gate_proj.weight[e].T
            u = flat[n] @ moe.up_proj.weight[e].T
            out[n] += w.to(x.dtype) * (swiglu(g, u, moe.limit) @ moe.down_proj.weight[e].T)
    return out.reshape(x.shape)
