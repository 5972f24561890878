"""Running a verb under torchrun: the process group and mesh a training verb needs, set up and torn down.

`torchrun --nproc-per-node N -m stepflash train|sft|rl ...` starts N copies of the verb with RANK /
WORLD_SIZE / LOCAL_RANK in the environment. `under_torchrun()` tells a verb it was launched that way
(WORLD_SIZE > 1; a plain `python -m stepflash` run never is), and `torchrun_session(ep)` starts the
default process group (gloo on CPU, NCCL on CUDA), builds the ("dp", "ep") mesh with dp = world / ep,
and destroys the group when the verb is done, also when it fails.

`Session` is what a training loop needs from that: the rank and device, `parallelize` (FSDP2 plus
expert parallelism, from outside the model), the sum all-reduce and barrier, the gradient clipping that
spans the dense and expert meshes, and `token_weight`, the factor that turns a rank's per-token mean
loss into its share of the global per-token mean (FSDP averages gradients over ranks with equal weight,
but ranks may hold different numbers of loss tokens). `sum_grads` and `all_gather` serve verbs that keep
a whole replicated model on every rank instead (`stepflash rl`: its rollout engine needs the whole model).
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
    def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        dist.all_reduce(t, op=op)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (the same shape on all) concatenated along dim 0 in rank order (collective)."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def sum_grads(params, bucket_numel: int = 1 << 24) -> None:
        """Sum the gradients of replicated (not FSDP-sharded) parameters over ranks, in place, in buckets of
        about `bucket_numel` values. A parameter without a gradient on this rank counts as zeros; one
        without a gradient on every rank keeps none, as in one process (AdamW then skips it)."""
        params = list(params)
        start = 0
        while start < len(params):
            stop, numel = start, 0
            while stop < len(params) and (numel == 0 or numel + params[stop].numel() <= bucket_numel):
                numel += params[stop].numel()
                stop += 1
            bucket = params[start:stop]
            flat = torch.cat([p.grad.reshape(-1).float() if p.grad is not None else
                              torch.zeros(p.numel(), device=p.device) for p in bucket] +
                             [torch.tensor([float(p.grad is not None) for p in bucket], device=bucket[0].device)])
            dist.all_reduce(flat)
            offset = 0
            for i, p in enumerate(bucket):
                if flat[numel + i] > 0:  # some rank had a gradient
                    p.grad = flat[offset: offset + p.numel()].view_as(p).to(p.dtype).clone()
                offset += p.numel()
            start = stop

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
    destroy the group on the way out. A group the caller started already is used and left running (a script
    that runs several jobs in one launch: re-creating the default group reuses its rendezvous keys, a race)."""
    check_expert_parallel(ep, int(os.environ.get("WORLD_SIZE", "1")))
    started_here = not dist.is_initialized()
    info = init_distributed(backend)
    try:
        yield Session(info, build_mesh(info.world_size // ep, ep), ep)
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()
