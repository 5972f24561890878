"""Feed-forward blocks: clamped SwiGLU, the sigmoid router and the grouped routed experts.

Routing (fp32): p = sigmoid(x @ gate^T); the top-k experts are chosen by p + router_bias (the bias,
moved by the loss-free balancer, only selects); their weights are the unbiased p, renormalised to sum
to one and multiplied by `moe_router_scaling_factor`.

Experts are stored stacked, as in the release ([E, inter, hidden] for gate/up, [E, hidden, inter] for
down). Token-expert pairs are sorted by expert and each projection is one grouped matmul
(`torch._grouped_mm`) over the sorted rows, so the cost is that of the active experts only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stepflash.config import Step35Config


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up, with the release's clamp when limit > 0: silu clamped above, up clamped both sides."""
    a = F.silu(gate)
    if limit > 0:
        a = a.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return a * up


class SwiGLU(nn.Module):
    """Dense MLP (layers before the first MoE layer, MTP blocks) and the shared expert."""

    def __init__(self, hidden: int, inter: int, limit: float = 0.0):
        super().__init__()
        self.limit = limit
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class StackedWeight(nn.Module):
    """Holds one [E, out, in] tensor under the release's name `<proj>.weight`."""

    def __init__(self, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    # The CUDA kernel wants bf16 on sm90+.
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [rows, in] sorted by expert, weight [E, out, in], counts/offsets [E] -> [rows, out].

    Row block e (counts[e] rows ending at offsets[e]) is multiplied by weight[e]^T."""
    if _grouped_mm_ok(x):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    # Fallback: still grouped (one matmul per expert that received tokens), never a dense one-hot pass.
    outs = [xe @ weight[e].T for e, xe in enumerate(torch.split(x, counts.tolist())) if xe.shape[0]]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


def sort_by_expert(topk_idx: torch.Tensor, num_experts: int):
    """topk_idx [N, k] -> flat expert ids [N*k], the stable order sorting them by expert, the source token
    of each sorted row [N*k], and rows per expert [E]."""
    flat_idx = topk_idx.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)
    token_of_row = order // topk_idx.shape[-1]
    counts = torch.bincount(flat_idx, minlength=num_experts)
    return flat_idx, order, token_of_row, counts


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
        flat_idx, order, token_of_row, counts = sort_by_expert(topk_idx, self.num_experts)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        rows = x[token_of_row]  # [N*k, H], grouped by expert
        hidden = swiglu(grouped_linear(rows, self.gate_proj.weight, counts, offsets),
                        grouped_linear(rows, self.up_proj.weight, counts, offsets), self.limit)
        out_rows = grouped_linear(hidden, self.down_proj.weight, counts, offsets)  # [N*k, H]
        if self.record_routing:
            self.last_routing = {"probs": probs, "topk_idx": topk_idx, "counts": counts}
            if self.record_expert_stats:
                self.last_routing.update(expert_stats(hidden, out_rows, flat_idx[order], self.num_experts))
        out_rows = out_rows * topk_w.reshape(-1)[order, None].to(out_rows.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of_row, out_rows)
        return out.reshape(shape)


@torch.no_grad()
def expert_stats(hidden: torch.Tensor, out_rows: torch.Tensor, expert_of_row: torch.Tensor, num_experts: int) -> dict:
    """Per-expert sums over its rows (divide by counts for means): L2 norm of the expert's output before
    the gating weight, and mean square of its SwiGLU activation. hidden [R, inter], out_rows [R, H]."""
    zeros = torch.zeros(num_experts, dtype=torch.float32, device=hidden.device)
    return {"out_norm_sum": zeros.index_add(0, expert_of_row, out_rows.float().norm(dim=-1)),
            "act_sq_sum": zeros.index_add(0, expert_of_row, hidden.float().pow(2).mean(-1))}


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
