"""Running a verb under torchrun: the process group and mesh a training verb needs, set up and torn down.

`torchrun --nproc-per-node N -m stepflash train|sft|rl ...` starts N copies of the verb with RANK /
WORLD_SIZE / LOCAL_RANK in the environment. `under_torchrun()` tells a verb it was launched that way
(WORLD_SIZE > 1; a plain `python -m stepflash` run never is), and `torchrun_session(ep)` starts the
default process group (gloo on CPU, NCCL on CUDA), builds the ("dp", "ep") mesh with dp = world / ep,
yields this rank's `Runtime` and destroys the group when the verb is done, also when it fails.

A user error (a bad flag or path) is raised on every rank alike. Only rank 0 lets it through to the
CLI's one-line message; the other ranks exit with the same status without printing, and every rank
writes the message into torchrun's error file, so torchrun's own failure report (which it always
prints when a worker exits non-zero) names it as the root cause instead of a pointer to its docs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import torch.distributed as dist

from stepflash.distributed.mesh import build_mesh
from stepflash.distributed.runtime import init_distributed
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


def _record_for_torchrun(message: str) -> None:
    """Write `message` where torchrun reads a failed worker's root cause (TORCHELASTIC_ERROR_FILE)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:  # the layout torch's own ErrorHandler writes, with the one line where it puts a traceback
        data = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                              "timestamp": str(int(time.time()))}}}
        with contextlib.suppress(OSError), open(path, "w") as f:
            json.dump(data, f)


@contextlib.contextmanager
def torchrun_session(ep: int = 1, backend: str | None = None):
    """Start the process group (`backend`: default NCCL with CUDA, else gloo) and the (world / ep, ep) mesh,
    yield this rank's Runtime; destroy the group on the way out. A group the caller started already is
    used and left running (a script that runs several jobs in one launch: re-creating the default group
    reuses its rendezvous keys, a race)."""
    started_here = not dist.is_initialized()
    try:
        check_expert_parallel(ep, int(os.environ.get("WORLD_SIZE", "1")))
        rt = init_distributed(backend)
        rt.mesh = build_mesh(rt.world_size // ep, ep)
        yield rt
    except UserError as e:
        _record_for_torchrun(f"UserError: {e}")
        if int(os.environ.get("RANK", "0")) != 0:
            raise SystemExit(2) from None  # rank 0 prints the one line
        raise
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()
