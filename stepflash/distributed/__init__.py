"""Scale-out on PyTorch's own distributed stack, applied from outside the single-device model.

- `mesh`: `init_distributed()` from torchrun's environment, the ("dp", "ep") `build_mesh`, data sharding
  and the expert-to-rank layout (also the groups of the EP-group balance loss);
- `expert_parallel`: the MoE with E/ep local experts and all-to-all token dispatch / combine;
- `parallelize`: FSDP2 `fully_shard` per decoder layer + root, experts over the EP group, global expert
  counts for the router-bias update, gradient clipping across meshes;
- `plan` (verb `plan`): memory per GPU.
Sharded (DCP) checkpoints live with the other formats in `stepflash.checkpoint`.
"""

from stepflash.distributed.expert_parallel import ExpertParallelMoE, apply_expert_parallel
from stepflash.distributed.mesh import (DistInfo, build_mesh, data_shard, ep_rank_groups, expert_groups, flat_mesh,
                                        init_distributed)
from stepflash.distributed.parallelize import (clip_grad_norm_, full_state_dict, gather_model, global_expert_counts,
                                               is_parallelized, parallelize)

__all__ = ["DistInfo", "ExpertParallelMoE", "apply_expert_parallel", "build_mesh", "clip_grad_norm_", "data_shard",
           "ep_rank_groups", "expert_groups", "flat_mesh", "full_state_dict", "gather_model", "global_expert_counts",
           "init_distributed", "is_parallelized", "parallelize"]
