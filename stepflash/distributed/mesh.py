"""Process groups and the device mesh: who talks to whom when the model is spread over ranks.

Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); `runtime.init_distributed()`
reads that environment and starts the default process group, NCCL on CUDA and gloo on CPU.

The mesh is 2-D, `("dp", "ep")` with shape (dp, ep) and ep the inner (fastest-varying) dimension, so an
expert-parallel group is ep consecutive ranks (one node when ep <= GPUs per node: the all-to-all stays
on NVLink). Every rank of the world reads different data: the data-parallel degree of the *batch* is
dp * ep, while `dp` alone is the number of replicas of each expert slice. Concretely:

- dense parameters (attention, norms, router, shared expert, embeddings, heads) are FSDP-sharded over
  all dp * ep ranks (the flattened mesh);
- routed experts are split across the ranks of an EP group (rank r of the group holds experts
  [r * E/ep, (r+1) * E/ep)), and each slice is FSDP-sharded over the dp replicas that hold it.

`expert_groups(E, ep)` gives that expert-to-rank layout; it is also the grouping of the EP-group
balance loss (SPEC section 6: "split experts into G groups (expert-parallel ranks)").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from stepflash.errors import UserError

DP, EP, FLAT = "dp", "ep", "dp_ep"


def build_mesh(dp: int, ep: int = 1, device_type: str | None = None) -> DeviceMesh:
    """The 2-D ("dp", "ep") mesh over the whole world; dp * ep must equal the world size."""
    if dp < 1 or ep < 1:
        raise UserError(f"dp and ep must be >= 1, got dp={dp}, ep={ep}")
    if not dist.is_initialized():
        raise UserError("no process group: launch with torchrun and call init_distributed() before build_mesh()")
    world = dist.get_world_size()
    if dp * ep != world:
        raise UserError(f"dp * ep = {dp} * {ep} = {dp * ep} but the world has {world} processes; "
                        f"choose dp = world / ep")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dp, ep), mesh_dim_names=(DP, EP))


def flat_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh over all dp * ep ranks (the FSDP group of dense parameters and of the batch)."""
    # `_flatten` is the DeviceMesh way to get a 1-D view that stays tied to the same root mesh
    # (FSDP needs all meshes of one model to share a root); calling it again returns the cached view.
    return mesh._flatten(FLAT)


def data_shard(mesh: DeviceMesh | None = None) -> tuple[int, int]:
    """(index, count) of this rank's slice of the global batch: every rank reads different data."""
    if mesh is not None:
        return flat_mesh(mesh).get_local_rank(), mesh.size()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def expert_groups(num_experts: int, ep: int) -> list[list[int]]:
    """Expert ids held by each rank of an EP group: group g = [g * E/ep, (g+1) * E/ep)."""
    if ep < 1 or num_experts % ep:
        raise UserError(f"expert parallel size {ep} must divide the number of experts {num_experts}")
    per = num_experts // ep
    return [list(range(g * per, (g + 1) * per)) for g in range(ep)]


def ep_rank_groups(dp: int, ep: int) -> list[list[int]]:
    """Global ranks of each EP group for the ("dp", "ep") layout: group i = ranks [i*ep, (i+1)*ep)."""
    return [list(range(i * ep, (i + 1) * ep)) for i in range(dp)]
