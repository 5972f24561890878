"""Scale-out on PyTorch's own distributed stack, applied from outside the single-device model.

- `runtime`: `Runtime`, the one object a training verb holds (rank, device, mesh, collectives that are
  the identity in one process, FSDP2 / DDP placement of a model) and `init_distributed()`;
- `launch`: `torchrun_session()`, the process group and mesh of a verb started by torchrun;
- `mesh`: the ("dp", "ep") `build_mesh`, data sharding and the expert-to-rank layout (also the groups of
  the EP-group balance loss);
- `expert_parallel`: the MoE with E/ep local experts and all-to-all token dispatch / combine;
- `parallelize`: FSDP2 `fully_shard` per decoder layer + root, experts over the EP group, bf16 mixed
  precision, activation checkpointing, global expert counts for the router-bias update, gradient
  clipping across meshes;
- `plan` (verb `plan`): memory per GPU.
Sharded (DCP) checkpoints live with the other formats in `stepflash.checkpoint`; Muon over sharded
parameters in `stepflash.training.muon`.
"""

from stepflash.distributed.expert_parallel import ExpertParallelMoE, apply_expert_parallel
from stepflash.distributed.mesh import build_mesh, data_shard, ep_rank_groups, expert_groups, flat_mesh
from stepflash.distributed.parallelize import (apply_activation_checkpointing, clip_grad_norm_, full_state_dict,
                                               gather_model, global_expert_counts, is_parallelized, parallelize)
from stepflash.distributed.runtime import Runtime, init_distributed

__all__ = ["ExpertParallelMoE", "Runtime", "apply_activation_checkpointing", "apply_expert_parallel", "build_mesh",
           "clip_grad_norm_", "data_shard", "ep_rank_groups", "expert_groups", "flat_mesh", "full_state_dict",
           "gather_model", "global_expert_counts", "init_distributed", "is_parallelized", "parallelize"]
