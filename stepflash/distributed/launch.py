"""Running a verb under torchrun: the process group and mesh a training verb needs, set up and torn down.

`torchrun --nproc-per-node N -m stepflash train|sft ...` starts N copies of the verb with RANK /
WORLD_SIZE / LOCAL_RANK in the environment. `under_torchrun()` tells a verb it was launched that way
(WORLD_SIZE > 1; a plain `python -m stepflash` run never is), and `torchrun_session(ep)` starts the
default process group (gloo on CPU, NCCL on CUDA), builds the ("dp", "ep") mesh with dp = world / ep,
and destroys the group when the verb is done, also when it fails.

`Session` is what a training loop needs from that: the rank and device, `parallelize` (FSDP2 plus
expert parallelism, from outside the model), the sum all-reduce and barrier, the gradient clipping that
spans the dense and expert meshes, and `token_weight`, the factor that turns a rank's per-token mean
loss into its share of the global per-token mean (FSDP averages gradients over ranks with equal weight,
but ranks may hold different numbers of loss tokens).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from stepflash.distributed.mesh import DistInfo, build_mesh, init_distributed
from stepflash.distributed.parallelize import clip_grad_norm_, gather_model, parallelize
from stepflash.errors import UserError


def under_torchrun() -> bool:
    """True in a process that torchrun started as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def check_expert_parallel(ep: int, world_size: int, num_experts: int | None = None) -> None:
    """Refuse an expert-parallel size that cannot split the world or the experts, in one sentence."""
    if ep < 1:
        raise UserError(f"--expert-parallel must be >= 1, got {ep}")
    if ep > 1 and world_size == 1:
        raise UserError(f"--expert-parallel {ep} needs several processes: launch with "
                        f"torchrun --nproc-per-node N (N a multiple of {ep})")
    if world_size % ep:
        raise UserError(f"--expert-parallel {ep} must divide the number of processes ({world_size})")
    if num_experts is not None and ep > 1 and (num_experts == 0 or num_experts % ep):
        raise UserError(f"--expert-parallel {ep} must divide the model's {num_experts} routed experts")


@dataclass
class Session:
    """This process's place in a torchrun launch and the collective operations a training loop uses."""

    info: DistInfo
    mesh: DeviceMesh
    ep: int

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def device(self) -> torch.device:
        return self.info.device

    def parallelize(self, model: torch.nn.Module, **options) -> torch.nn.Module:
        """FSDP2 + expert parallelism in place. A model built on the meta device (too big for one rank)
        is materialised shard by shard on this rank's device and initialised there (its initial values
        then differ from a single-process run's; a resumed run loads them from the checkpoint anyway)."""
        on_meta = next(model.parameters()).is_meta
        parallelize(model, self.mesh, ep=self.ep, **options)
        if on_meta:
            model.to_empty(device=self.device)
            model.init_weights()
        return model

    @staticmethod
    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t)

    @staticmethod
    def barrier() -> None:
        dist.barrier()

    @staticmethod
    def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(model, max_norm)

    def token_weight(self, local_tokens: torch.Tensor | float) -> float:
        """world * local / global count of loss tokens: multiply a rank's per-token mean loss by it so
        that FSDP's average over ranks is the per-token mean over the whole batch (collective)."""
        t = torch.as_tensor(local_tokens, dtype=torch.float64, device=self.device).reshape(1).clone()
        local = float(t)
        dist.all_reduce(t)
        return self.world_size * local / max(float(t), 1.0)

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of a global batch (len(items) must be a multiple of the world size)."""
        per = len(items) // self.world_size
        return items[self.rank * per:(self.rank + 1) * per]

    def mean(self, value: float) -> float:
        """The mean of `value` over ranks (collective)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    @staticmethod
    def gather(model: torch.nn.Module) -> torch.nn.Module | None:
        """A plain copy of the whole model on rank 0, None elsewhere (collective), e.g. to `save_model`."""
        return gather_model(model)


@contextlib.contextmanager
def torchrun_session(ep: int = 1, backend: str | None = None):
    """Start the process group (`backend`: default NCCL with CUDA, else gloo) and the (world / ep, ep) mesh;
    destroy the group on the way out."""
    check_expert_parallel(ep, int(os.environ.get("WORLD_SIZE", "1")))
    info = init_distributed(backend)
    try:
        yield Session(info, build_mesh(info.world_size // ep, ep), ep)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
