"""Muon, the report's optimiser for hidden weight matrices, on one process or over FSDP2 / expert-parallel shards.

Muon keeps heavy-ball momentum and replaces each update by its orthogonal factor U V^T (of its SVD),
approximated by a quintic polynomial iteration, scaled by 0.2 * sqrt(max(rows, cols)) so its RMS matches a
typical AdamW update (one learning rate and weight decay then serve both optimisers). Two iterations:
- `newton-schulz`: Jordan's fixed coefficients (3.4445, -4.7750, 2.0315) five times; singular values land
  in roughly [0.7, 1.2], not exactly 1 (the default, and what every earlier run used);
- `polar-express`: the per-step coefficients of Amsel et al., "The Polar Express" (arXiv 2505.16932,
  Algorithm 1, safety factor 1.01), which converge to U V^T; the report runs this one in fp16.
The iteration runs in `dtype` after normalising the matrix to unit Frobenius norm, which keeps every
intermediate in range in fp16 and bf16 (`--muon-precision`).

Stacked expert weights [E, out, in] are one matrix per expert (the iteration is batched over E). A fused
projection (q/k/v/gate as one weight, `stepflash.model.fused`) holds several release matrices stacked by
rows: `row_splits` names them, and each is orthogonalised and scaled on its own, as if unfused.

Sharded parameters (DTensors) need whole matrices, and FSDP2 gives each rank a block of rows:
- a stacked expert tensor is sharded on the expert dimension (by FSDP, and by expert parallelism), so a
  rank's block holds whole experts: it orthogonalises them where they are, with no communication;
- a dense matrix sharded by rows has one owner rank (matrices spread over the ranks by size). One
  `all_to_all` sends every rank's rows of each matrix to its owner, the owner orthogonalises the whole
  matrices it owns, and a second `all_to_all` returns each rank its rows of the result. Momentum and
  weight decay stay element-wise on the local shards. Rows travel in the iteration's dtype (the cast is
  the iteration's first step anyway), so the sharded step computes exactly what one process computes.
"""

from __future__ import annotations

import math
from itertools import repeat

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

NEWTON_SCHULZ = [(3.4445, -4.7750, 2.0315)]  # repeated every step
_POLAR_EXPRESS = [  # arXiv 2505.16932, Algorithm 1; steps past the list repeat the last one
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
# The paper's safety factor for half precision: every polynomial but the last is evaluated at x / 1.01.
POLAR_EXPRESS = [(a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5) for a, b, c in _POLAR_EXPRESS[:-1]] + [_POLAR_EXPRESS[-1]]
ITERATIONS = ("newton-schulz", "polar-express")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def muon_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The iteration's dtype for `--muon-precision`: auto is fp32 on CPU (half-precision matmuls are slow
    there) and the report's fp16 on GPUs."""
    if precision == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return PRECISIONS[precision]


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None,
                  iteration: str = "newton-schulz", eps: float = 1e-7, out_dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """g [..., m, n] -> approximately U V^T of each matrix, in `out_dtype` (default g's dtype)."""
    dtype = dtype or (torch.float32 if g.device.type == "cpu" else torch.bfloat16)
    x = g.to(dtype)
    wide = x.shape[-2] > x.shape[-1]
    if wide:  # iterate on the side with the smaller Gram matrix
        x = x.mT
    if iteration == "polar-express":
        x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + eps)
        coeffs = POLAR_EXPRESS[:steps] + list(repeat(POLAR_EXPRESS[-1], steps - len(POLAR_EXPRESS)))
    else:
        x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
        coeffs = NEWTON_SCHULZ * steps
    for a, b, c in coeffs:
        gram = x @ x.mT  # [..., m, m]
        x = a * x + (b * gram + c * gram @ gram) @ x
    if wide:
        x = x.mT
    return x.to(out_dtype or g.dtype)


def orthogonalize_parts(g: torch.Tensor, splits: list[int] | None, **ns) -> torch.Tensor:
    """orthogonalize() of each block of rows of g (the matrices of a fused weight), concatenated."""
    if not splits or len(splits) == 1:
        return orthogonalize(g, **ns)
    return torch.cat([orthogonalize(part, **ns) for part in g.split(splits, dim=-2)], dim=-2)


def row_scales(shape: torch.Size, splits: list[int] | None, device: torch.device) -> torch.Tensor:
    """[rows, 1] Muon's RMS-matching scale 0.2 * sqrt(max(rows, cols)) of the matrix each row belongs to
    (shape: the parameter's global shape)."""
    rows, cols = shape[-2], shape[-1]
    return torch.cat([torch.full((n, 1), 0.2 * math.sqrt(max(n, cols)), device=device) for n in splits or [rows]])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _whole_matrices_local(p: torch.Tensor) -> bool:
    """A plain tensor, or a DTensor whose local block holds whole matrices (only the leading dim of a
    stack of matrices is sharded, or nothing is)."""
    if not isinstance(p, DTensor):
        return True
    return all(pl.is_replicate() or (p.ndim >= 3 and getattr(pl, "dim", None) == 0) for pl in p.placements)


def _row_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor) and p.ndim == 2 and p.device_mesh.ndim == 1 and p.placements[0].is_shard(0)


def _owners(sizes: list[int], ranks: int) -> list[int]:
    """Owner rank of each matrix: largest first, each to the least loaded rank (ties: the lower rank)."""
    load, owner = [0] * ranks, [0] * len(sizes)
    for m in sorted(range(len(sizes)), key=lambda m: -sizes[m]):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[m], load[r] = r, load[r] + sizes[m]
    return owner


def _orthogonalize_row_shards(params: list[DTensor], updates: list[torch.Tensor], splits: list, **ns
                              ) -> list[torch.Tensor]:
    """Each rank's rows of U V^T for matrices sharded by rows over one mesh (module docstring)."""
    mesh = params[0].device_mesh
    group, ranks, me = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    dtype = ns["dtype"]
    rows = [p.shape[0] for p in params]
    cols = [p.shape[1] for p in params]
    chunk = [math.ceil(r / ranks) for r in rows]  # FSDP2's (torch.chunk's) rows per rank, the last may be short

    def rows_of(rank: int, m: int) -> int:
        return max(0, min(chunk[m], rows[m] - rank * chunk[m]))

    def padded(x: torch.Tensor, m: int) -> torch.Tensor:  # [<= chunk, cols] -> flat [chunk * cols]
        out = x.new_zeros(chunk[m], cols[m])
        out[: x.shape[0]] = x
        return out.reshape(-1)

    owner = _owners([r * c for r, c in zip(rows, cols)], ranks)
    mine = [m for m in range(len(params)) if owner[m] == me]
    to_owner = [sum(chunk[m] * cols[m] for m in range(len(params)) if owner[m] == r) for r in range(ranks)]
    from_each = [sum(chunk[m] * cols[m] for m in mine)] * ranks
    send = [padded(updates[m].to(dtype), m) for r in range(ranks) for m in range(len(params)) if owner[m] == r]
    received = torch.empty(sum(from_each), dtype=dtype, device=updates[0].device)
    dist.all_to_all_single(received, torch.cat(send) if send else received.new_zeros(0), from_each, to_owner,
                           group=group)
    # The whole matrices this rank owns, orthogonalised, then cut back into every rank's rows.
    blocks = [part.split([chunk[m] * cols[m] for m in mine]) for part in received.split(from_each)]
    back = []
    for i, m in enumerate(mine):
        whole = torch.cat([blocks[s][i].view(chunk[m], cols[m])[: rows_of(s, m)] for s in range(ranks)])  # [rows, cols]
        back.append(orthogonalize_parts(whole, splits[m], out_dtype=dtype, **ns))
    send_back = [padded(back[i][s * chunk[m]: s * chunk[m] + rows_of(s, m)], m)
                 for s in range(ranks) for i, m in enumerate(mine)]
    returned = torch.empty(sum(to_owner), dtype=dtype, device=updates[0].device)
    dist.all_to_all_single(returned, torch.cat(send_back) if send_back else returned.new_zeros(0), to_owner,
                           from_each, group=group)
    out: list[torch.Tensor | None] = [None] * len(params)
    for r, part in enumerate(returned.split(to_owner)):
        theirs = [m for m in range(len(params)) if owner[m] == r]
        for m, piece in zip(theirs, part.split([chunk[m] * cols[m] for m in theirs])):
            first, n = me * chunk[m], rows_of(me, m)
            scale = row_scales(params[m].shape, splits[m], piece.device)[first: first + n]
            out[m] = piece.view(chunk[m], cols[m])[:n].to(updates[m].dtype) * scale
    return out


def orthogonalize_updates(params: list[torch.Tensor], updates: list[torch.Tensor], splits: list | None = None,
                          **ns) -> list[torch.Tensor]:
    """U V^T of every update (of each of its matrices: `splits[i]` rows each, None for one matrix) times
    Muon's scale, as this rank's local block of each parameter (plain tensors: the whole). Every path
    scales after the cast back to the update's dtype, so sharded and single-process steps agree exactly."""
    splits = splits or [None] * len(params)
    out: list[torch.Tensor | None] = [None] * len(params)
    by_mesh: dict[object, list[int]] = {}
    for i, (p, u) in enumerate(zip(params, updates)):
        if _whole_matrices_local(p):
            out[i] = orthogonalize_parts(u, splits[i], **ns) * row_scales(p.shape, splits[i], u.device)
        elif _row_sharded(p):
            by_mesh.setdefault(p.device_mesh, []).append(i)
        else:  # any other layout: every rank orthogonalises the whole matrix and keeps its block
            from torch.distributed.tensor import distribute_tensor

            whole = DTensor.from_local(u, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
            scaled = orthogonalize_parts(whole, splits[i], **ns) * row_scales(p.shape, splits[i], u.device)
            out[i] = distribute_tensor(scaled, p.device_mesh, p.placements,
                                       src_data_rank=None).to_local()
    for idx in by_mesh.values():
        for i, o in zip(idx, _orthogonalize_row_shards([params[i] for i in idx], [updates[i] for i in idx],
                                                       [splits[i] for i in idx], **ns)):
            out[i] = o
    return out


class Muon(torch.optim.Optimizer):
    """Momentum + orthogonalised update for 2D matrices (or stacks of them, one matrix per leading index),
    plain or sharded (DTensor) parameters alike."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype | None = None,
                 iteration: str = "newton-schulz", row_splits: dict[int, list[int]] | None = None):
        """row_splits: id(parameter) -> row counts of the release matrices a fused parameter holds
        (`stepflash.model.fused.fused_row_splits`, taken after sharding: the ids are the parameters'
        own); each matrix is orthogonalised and scaled on its own."""
        if iteration not in ITERATIONS:
            raise ValueError(f"iteration must be one of {ITERATIONS}, got {iteration!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))
        self.ns_dtype, self.iteration = ns_dtype, iteration
        self.row_splits = row_splits or {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params, updates = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                assert p.ndim >= 2, "Muon only takes matrices; route vectors to AdamW"
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                grad, buf = _local(p.grad), _local(state["momentum_buffer"])
                buf.mul_(group["momentum"]).add_(grad)
                params.append(p)
                updates.append(grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf)
            # Collective when parameters are sharded: every rank takes this step with the same groups.
            orth = orthogonalize_updates(params, updates, steps=group["ns_steps"],
                                         dtype=self.ns_dtype or (torch.float32 if not params or params[0].device.type
                                                                 == "cpu" else torch.bfloat16),
                                         iteration=self.iteration,
                                         splits=[self.row_splits.get(id(p)) for p in params])
            for p, o in zip(params, orth):  # o: already scaled
                local = _local(p)
                local.mul_(1 - group["lr"] * group["weight_decay"])
                local.add_(o, alpha=-group["lr"])
        return loss
