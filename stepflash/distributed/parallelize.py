"""Spread a single-device Step35ForCausalLM over a ("dp", "ep") mesh with FSDP2 and expert parallelism.

`parallelize(model, mesh)` works in place, bottom-up as FSDP2 wants:
1. with ep > 1, every MoE becomes an `ExpertParallelMoE` holding this rank's E/ep experts, and the three
   stacked expert projections of each layer form one FSDP group over the "dp" mesh (the replicas of
   that slice); their gradient is divided by dp * ep, the number of ranks whose tokens it has seen,
   like every dense gradient;
2. each decoder layer (trunk and MTP) becomes an FSDP unit over all dp * ep ranks, holding its dense
   parameters (attention, norms, shared expert or dense MLP, and the router, which stays replicated in
   compute: FSDP only shards its storage);
3. the root (embedding, final norm, lm_head) is the last unit.

With `param_dtype=bfloat16` (`train --precision bf16`) the gathered weights and the saved activations are
bf16 while the sharded master weights, the optimizer state and the gradient reduction stay fp32; the
norms and the router keep fp32 weights too (their own FSDP unit per layer), as the release computes them.
`activation_checkpointing` recomputes every decoder layer in backward (`full`) or every second one
(`selective`).

Parameters become DTensors with their global shapes, so `model.state_dict()` names and shapes are the
release's. Every rank then trains on its own slice of the batch (`mesh.data_shard`); gradients are
averaged over the dp * ep ranks by FSDP's reduce-scatter. The loss-free router bias is a replicated
buffer: update it from `global_expert_counts(model)` so all ranks take the same step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from stepflash.distributed.expert_parallel import ExpertParallelMoE, apply_expert_parallel
from stepflash.distributed.mesh import DP, EP, flat_mesh
from stepflash.errors import UserError
from stepflash.model import Step35ForCausalLM
from stepflash.model.norm import RMSNorm


ROOT_METHODS = ("trunk", "head", "mtp")
CHECKPOINTING = ("none", "selective", "full")



def _checkpoint_forward(layer: nn.Module) -> None:
    """Recompute the layer's activations in backward instead of keeping them (non-reentrant autograd
    checkpointing); the module tree and parameter names are unchanged."""
    inner = layer.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    layer.forward = forward


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpoint decoder layers (trunk and MTP) in place: `full` every layer, `selective` every second one
    (layer-selective, as torchtitan's `selective_ac_option=2`: about half the saving for half the
    recomputation), `none` nothing. (Op-level selective checkpointing, which keeps matmul outputs, does not
    compose in torch 2.13 with the FSDP units nested in a layer, the expert slices and fp32 norm groups:
    their hooks run a different number of ops in the recomputation.)"""
    if mode not in CHECKPOINTING:
        raise UserError(f"--activation-checkpointing must be one of {', '.join(CHECKPOINTING)}, got {mode!r}")
    for i, layer in enumerate(model.model.layers):
        if mode == "full" or (mode == "selective" and i % 2 == 0):
            _checkpoint_forward(layer)


def _fp32_modules(layer: nn.Module) -> list[nn.Module]:
    """The modules of a decoder layer whose weights stay fp32 under bf16 mixed precision, as the release keeps
    them: every RMSNorm and the MoE router."""
    mods = [m for m in layer.modules() if isinstance(m, RMSNorm)]
    moe = getattr(layer, "moe", None)
    return mods + ([moe.gate] if moe is not None else [])


def parallelize(model: nn.Module, mesh: DeviceMesh, ep: int | None = None, *,
                param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
                activation_checkpointing: str = "none", reshard_after_forward: bool = True) -> nn.Module:
    """Apply expert parallelism and FSDP2 to `model` in place and return it.

    mesh: from `build_mesh(dp, ep)`; `ep`, when given, must match its "ep" size (a guard for callers
    that carry the flag separately). param_dtype: compute dtype of gathered parameters (e.g. bf16,
    with fp32 sharded master weights; norms and the router are then gathered in fp32, each layer's as one
    extra FSDP unit); reduce_dtype: dtype of gradient reduction (fp32 recommended)."""
    ep_size, dp_size = mesh[EP].size(), mesh[DP].size()
    if ep is not None and ep != ep_size:
        raise UserError(f"expert parallel size {ep} does not match the mesh's ep dimension {ep_size}")
    num_experts = getattr(model.config, "moe_num_experts", 0)
    if ep_size > 1 and num_experts % ep_size:
        raise UserError(f"expert parallel size {ep_size} must divide the number of experts {num_experts}")
    world = flat_mesh(mesh)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    full_precision = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    if ep_size > 1:
        apply_expert_parallel(model, mesh[EP])
    apply_activation_checkpointing(model, activation_checkpointing)
    for layer in model.model.layers:
        moe = getattr(layer, "moe", None)
        if isinstance(moe, ExpertParallelMoE):
            experts = fully_shard([moe.gate_proj, moe.up_proj, moe.down_proj], mesh=mesh[DP], mp_policy=mp,
                                  reshard_after_forward=reshard_after_forward)
            # Each slice saw the tokens of all ep ranks of its group: average over dp * ep, not dp.
            experts[0].set_gradient_divide_factor(float(dp_size * ep_size))
            if dp_size > 1 and dist.get_backend(mesh[DP].get_group()) == "gloo":
                # A custom factor becomes a pre-multiplied sum, which gloo lacks: sum, then divide.
                # (Not with dp == 1: torch 2.13 then divides twice on that path.)
                experts[0].set_force_sum_reduction_for_comms(True)
        if param_dtype is not None and param_dtype != torch.float32:
            # One fp32 unit per layer. The router is read as `gate.weight`, never called as a module: FSDP
            # gathers it with the first norm of the group and completes the group at the root's post-forward.
            fully_shard(_fp32_modules(layer), mesh=world, mp_policy=full_precision,
                        reshard_after_forward=reshard_after_forward)
        fully_shard(layer, mesh=world, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if param_dtype is not None and param_dtype != torch.float32:
        fully_shard(model.model.norm, mesh=world, mp_policy=full_precision)
    fully_shard(model, mesh=world, mp_policy=mp)
    # The training code calls these parts directly (trunk -> head, trunk -> MTP chain), not only
    # forward(); each must gather the root's parameters (embedding, final norm, heads) first.
    for method in ROOT_METHODS:
        register_fsdp_forward_method(model, method)
    return model


def is_parallelized(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@torch.no_grad()
def global_expert_counts(model: nn.Module, group=None) -> list[torch.Tensor]:
    """Per MoE layer, the routed-token counts [E] of the last forward summed over all ranks (the whole
    dp * ep world by default): the load the loss-free bias update must see. Needs `record_routing`."""
    counts = []
    for moe in model.moe_modules:
        if moe.last_routing is None:
            raise RuntimeError("no routing recorded: set moe.record_routing = True before the forward")
        counts.append(moe.last_routing["counts"].to(torch.float32))
    if not counts:
        return []
    stacked = torch.stack(counts)  # [moe_layers, E], one all-reduce for all layers
    if dist.is_initialized():
        dist.all_reduce(stacked, group=group)
    return list(stacked.unbind(0))


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip gradients to a total L2 norm of max_norm; returns the norm before clipping.

    torch.nn.utils.clip_grad_norm_ cannot combine DTensors that live on different meshes (dense
    parameters on the flat mesh, experts on (dp, ep)); here each mesh's norm is reduced on its own."""
    params = [p for p in model.parameters() if p.grad is not None]
    by_spec: dict[object, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        by_spec.setdefault(key, []).append(g)
    total_sq = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    for grads in by_spec.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq += norm.float() ** 2
    total = total_sq.sqrt()
    coef = min(1.0, float(max_norm) / (float(total) + 1e-6))
    if coef < 1.0:
        for grads in by_spec.values():  # one foreach per mesh: DTensor ops do not mix meshes
            torch._foreach_mul_(grads, coef)
    return total


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of the whole model's state dict as plain CPU tensors on rank 0 (empty on other ranks;
    collective). For small models and tests: it gathers everything."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # Copies: buffers (router bias) and plain parameters would otherwise alias the live tensors.
    return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}


def gather_model(model: nn.Module) -> nn.Module | None:
    """A plain single-device copy of a parallelized model on rank 0 (None on the other ranks), e.g. for
    `stepflash.save_model`. Collective: call it on every rank. Holds the whole model on rank 0's CPU."""
    state = full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = Step35ForCausalLM(model.config)
    plain.load_state_dict(state, assign=True)
    return plain
