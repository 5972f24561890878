"""Setting up a pre-training run: the model (built, loaded from a checkpoint, sharded), the optimizer, the data
and the monitors, restored from the trainer state when resuming. `setup` returns the `Run` that
`loop.train_step` advances and `loop.log_and_checkpoint` records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from stepflash.checkpoint import CheckpointError, load_model
from stepflash.checkpoint import run as ckpt
from stepflash.config import ConfigError, resolve_config
from stepflash.distributed.runtime import Runtime
from stepflash.errors import UserError
from stepflash.model import Step35ForCausalLM
from stepflash.training.args import TrainArgs
from stepflash.training.balance import ExpertLoad
from stepflash.training.data import BatchSampler, open_training_data, validation_batches
from stepflash.training.monitors import ExpertStatsWindow, MetricsLog, SpikeDetector
from stepflash.training.muon import muon_dtype
from stepflash.training.optimizer import build_optimizer, resolve_optimizer


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _check_fits(cfg, device: torch.device, world_size: int = 1) -> bool:
    """Refuse a run whose fp32 weights, grads and AdamW moments (16 B/param, sharded over the world) cannot
    fit; return whether the whole model's training state fits one device (else it is built on meta)."""
    with torch.device("meta"):
        n = Step35ForCausalLM(cfg).num_parameters()
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 16 * n / world_size > have:
        raise UserError(f"this config has {n / 1e9:.1f}B parameters: training state needs ~{16 * n / 2**30:,.0f} GiB, "
                        f"{world_size} x {have / 2**30:,.0f} GiB of {device.type} memory is not enough; train it "
                        "sharded over more devices (torchrun, docs/scaling.md)")
    return 16 * n <= have


def build_model(args: TrainArgs, device: torch.device, world_size: int = 1) -> Step35ForCausalLM:
    """The model to train, fp32 and seeded. Under torchrun a model too big for one device is built on the
    meta device: `Runtime.parallelize` then materialises each rank's shards."""
    try:
        cfg = resolve_config(args.preset)
    except ConfigError as e:
        raise UserError(str(e))
    whole = _check_fits(cfg, device, world_size)
    torch.manual_seed(args.seed)
    if args.init_from:  # weights (fp32 for training) from a checkpoint of the same shape
        try:
            return load_model(args.init_from, dtype=torch.float32, device=device, config=cfg.replace(torch_dtype="float32"))
        except CheckpointError as e:
            raise UserError(f"--init-from {args.init_from} does not fit --preset {args.preset}: {e}")
    with torch.device(device if whole else "meta"):
        return Step35ForCausalLM(cfg.replace(torch_dtype="float32"))


@dataclass
class Run:
    """What a training run holds between steps; built by `setup`, advanced by `train_step`."""

    args: TrainArgs
    rt: Runtime
    model: torch.nn.Module
    opt: object  # CombinedOptimizer
    kind: str  # "muon" or "adamw"
    sampler: BatchSampler
    val_set: list
    spikes: SpikeDetector
    window_stats: ExpertStatsWindow
    load: ExpertLoad
    metrics: MetricsLog
    autocast_dtype: torch.dtype | None  # bf16 in one process with --precision bf16 (FSDP casts when sharded)
    tokenizer_src: str | None
    moe_layer_ids: list[int]
    step: int = 0
    tokens_seen: int = 0
    last_saved: int = -1

    @property
    def moe_modules(self) -> list:
        return self.model.moe_modules

    @property
    def device(self) -> torch.device:
        return self.rt.device


def resume_state(args: TrainArgs) -> tuple[str | None, dict | None]:
    """The checkpoint and trainer state to resume from; refuses --steps below the steps already done."""
    path, state = ckpt.resume_point(args.out, args.resume)
    if state is not None and args.steps < state["step"]:
        raise UserError(f"{args.out} is already at step {state['step']}: --steps is the schedule's total, so pass "
                        f"--steps {state['step']} or more to continue it (got --steps {args.steps})")
    return path, state


def _place_model(args: TrainArgs, rt: Runtime, path: str | None, state: dict | None, kind: str):
    """Build the model, load a single-process checkpoint into it, shard it. Returns (model, optimizer state to
    load after sharding: a full portable one, the checkpoint's own, or None)."""
    model = build_model(args, rt.device, rt.world_size)
    opt_state = None
    if state is not None and not ckpt.is_sharded(path):
        if next(model.parameters()).is_meta:
            raise UserError(f"{path} is a single-process checkpoint of a model too big for one device: convert it "
                            "to DCP with `stepflash convert` and resume from that")
        ckpt.load_checkpoint(path, model)  # weights go in before any wrapping
        opt_state = state["optimizer"]
        if rt.distributed:  # its optimizer state is re-sharded after wrapping
            opt_state = ckpt.portable_optimizer_state(
                model, build_optimizer(model, kind, args.lr, args.weight_decay), opt_state)
    sharded_bf16 = rt.distributed and _precision(args, rt.device) == torch.bfloat16
    model = rt.parallelize(model, param_dtype=torch.bfloat16 if sharded_bf16 else None,
                           activation_checkpointing=args.activation_checkpointing)
    return model, opt_state


def _precision(args: TrainArgs, device: torch.device) -> torch.dtype:
    if args.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if args.precision == "bf16" else torch.float32


def setup(args: TrainArgs, rt: Runtime, path: str | None, state: dict | None) -> Run:
    """Model (sharded under torchrun), optimizer, data, monitors, all restored from `state` when resuming."""
    from stepflash.distributed.launch import check_expert_parallel

    kind = resolve_optimizer(args.optimizer, ckpt.saved_optimizer(state))
    model, opt_state = _place_model(args, rt, path, state, kind)
    cfg = model.config
    if cfg.moe_layers and cfg.moe_num_experts % args.ep_groups:
        raise UserError(f"--ep-groups {args.ep_groups} must divide the {cfg.moe_num_experts} experts")
    if args.expert_parallel > 1:
        check_expert_parallel(args.expert_parallel, rt.world_size, cfg.moe_num_experts if cfg.moe_layers else 0)
    train_data, val_data, tokenizer_src = open_training_data(args, cfg.vocab_size, rt)
    for m in model.moe_modules:
        m.record_routing = True
    opt = build_optimizer(model, kind, args.lr, args.weight_decay,
                          muon_dtype=muon_dtype(args.muon_precision, rt.device), muon_iteration=args.muon_iteration)
    per_rank = args.batch_size // rt.world_size
    moe_modules = model.moe_modules
    run = Run(args=args, rt=rt, model=model, opt=opt, kind=kind,
              sampler=BatchSampler(train_data, per_rank, args.seed, rt.rank, rt.world_size),
              val_set=validation_batches(val_data, per_rank, args.val_batches, rt.rank, rt.world_size),
              spikes=SpikeDetector(z=args.spike_z), window_stats=ExpertStatsWindow(moe_modules),
              load=ExpertLoad(len(moe_modules), cfg.moe_num_experts if moe_modules else 0, rt.device),
              metrics=MetricsLog(args.out, enabled=rt.is_main),
              autocast_dtype=None if rt.distributed or _precision(args, rt.device) == torch.float32 else torch.bfloat16,
              tokenizer_src=tokenizer_src,
              moe_layer_ids=[i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)])
    if state is not None:
        _restore(run, path, state, opt_state)
    if rt.is_main:
        os.makedirs(args.out, exist_ok=True)
    run.metrics.truncate_after(run.step)  # a fresh run starts a fresh log; a resumed one drops what it will redo
    return run


def _restore(run: Run, path: str, state: dict, opt_state: dict | None) -> None:
    if ckpt.is_sharded(path):  # weights and optimizer, from whatever layout saved them into this one
        from stepflash.checkpoint.dcp import load_checkpoint as load_dcp

        load_dcp(path, run.model, run.opt)
    elif run.rt.distributed:
        ckpt.load_portable_optimizer_state(run.model, run.opt, opt_state)
    else:
        run.opt.load_state_dict(opt_state)
    run.sampler.load_state_dict(state["sampler"])
    run.spikes.load_state_dict(state["spikes"])
    run.window_stats.load_state_dict(state["monitor_window"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], run.device)
    run.step, run.tokens_seen = state["step"], state["tokens_seen"]
    run.last_saved = run.step
