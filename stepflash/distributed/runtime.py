"""The one distributed runtime: where this process sits and the collectives a training verb uses.

Every verb that trains (`train`, `sft`, `rl`, the MTP phase) takes a `Runtime`. `Runtime()` is one
plain process: every collective is then the identity (a sum over one rank is the value itself), so the
training code has no "if distributed" branches. Under torchrun, `torchrun_session()` (launch.py) starts
the process group and yields the runtime of this rank, with the ("dp", "ep") mesh when the verb shards
its model.

Two ways to place a model, both applied from outside it:
- `parallelize(model)`: FSDP2 over all ranks plus expert parallelism over "ep" (pre-training, SFT); in
  one process only the activation checkpointing it is asked for;
- `replicate(module)`: a whole copy on every rank with torch's DistributedDataParallel averaging the
  gradients (RL, whose rollout engine needs the whole model); the module itself in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from stepflash.distributed.mesh import EP
from stepflash.errors import UserError
from stepflash.distributed.parallelize import (apply_activation_checkpointing, clip_grad_norm_, gather_model,
                                               parallelize)


@dataclass
class Runtime:
    """This process's rank, world and device, the mesh when sharded, and collectives that work at any size."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: DeviceMesh | None = None  # ("dp", "ep"), from torchrun_session

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def ep(self) -> int:
        return self.mesh[EP].size() if self.mesh is not None else 1

    # ---- collectives (the identity in one process) --------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In place over all ranks; returns t."""
        if self.distributed:
            dist.all_reduce(t, op=op)
        return t

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (fp64)."""
        return self.all_reduce(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def mean(self, value: float) -> float:
        return self.sum([float(value)])[0] / self.world_size

    def max(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self.all_reduce(t, op=dist.ReduceOp.MAX))

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank."""
        return self.max(float(flag)) > 0

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (the same shape on all) concatenated along dim 0 in rank order."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ---- splitting work -------------------------------------------------------------------------
    def span(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of n items (sizes differ by at most one)."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def token_weight(self, local_tokens: torch.Tensor | float) -> float:
        """world * local / global count of loss tokens: multiply a rank's per-token mean loss by it so that
        an average of gradients over ranks (FSDP's, DDP's) is the gradient of the whole batch's token mean."""
        local = float(local_tokens)
        return self.world_size * local / max(self.sum([local])[0], 1.0)

    # ---- placing a model --------------------------------------------------------------------------
    def parallelize(self, model: nn.Module, *, param_dtype: torch.dtype | None = None,
                    activation_checkpointing: str = "none") -> nn.Module:
        """FSDP2 + expert parallelism in place under torchrun (`parallelize.parallelize`); in one process only
        the activation checkpointing. A model built on the meta device (too big for one rank) is
        materialised shard by shard on this rank's device and initialised there."""
        if self.mesh is None:
            apply_activation_checkpointing(model, activation_checkpointing)
            return model
        on_meta = next(model.parameters()).is_meta
        parallelize(model, self.mesh, ep=self.ep, param_dtype=param_dtype,
                    reduce_dtype=torch.float32 if param_dtype is not None else None,
                    activation_checkpointing=activation_checkpointing)
        if on_meta:
            model.to_empty(device=self.device)
            model.init_weights()
        return model

    def replicate(self, module: nn.Module) -> nn.Module:
        """A whole copy per rank whose gradients torch's DDP averages over ranks during backward (train
        through the returned module); the module itself in one process."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a forward uses the trunk and one head, never the MTP modules; parameters
        # unused on every rank keep no gradient, as in one process. Buffers (router bias) are equal on all
        # ranks already, so DDP need not broadcast them each forward.
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=True, broadcast_buffers=False)

    def clip_grad_norm(self, params_or_model, max_norm: float) -> torch.Tensor:
        """Clip to a total L2 norm (inf: measure only); returns the norm before clipping. Sharded (DTensor)
        gradients use the mesh-aware `clip_grad_norm_`, plain ones torch's."""
        max_norm = max_norm if max_norm > 0 else float("inf")
        if isinstance(params_or_model, nn.Module) and self.mesh is not None:
            return clip_grad_norm_(params_or_model, max_norm)
        params = params_or_model.parameters() if isinstance(params_or_model, nn.Module) else params_or_model
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)

    def gather_model(self, model: nn.Module) -> nn.Module | None:
        """A plain whole copy of a parallelized model on rank 0, None elsewhere (collective); the model
        itself when it is not sharded."""
        return gather_model(model) if self.mesh is not None else model


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> Runtime:
    """Start the default process group from torchrun's environment (no-op when already started) and return
    this rank's runtime (without a mesh: `torchrun_session` builds one).

    Without torchrun's variables this is one plain process. On CUDA the process is pinned to GPU
    LOCAL_RANK before the group starts, as NCCL requires."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if dist.is_initialized():
            return Runtime(dist.get_rank(), dist.get_world_size(), 0, device)
        return Runtime(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                            "set --nproc-per-node to the number of GPUs on the node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    return Runtime(rank, world, local_rank, device)
