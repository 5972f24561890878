"""`stepflash train`: the pre-training loop.

One step = `grad_accum` micro-batches of [batch_size, seq_len + 1] token windows, each contributing
the objective of `objective.py` (next token + MTP + EP-group balance), then gradient clipping, a
skip check (non-finite grad norm, or a loss spike when --skip-spikes), the optimizer step under the
warmup+cosine schedule, and the loss-free router-bias update from the step's global expert counts.

Stops early with a one-line error naming the step when the loss is NaN/inf: nothing is stepped or
saved after it, so the last checkpoint stays the last good state. Resuming (--resume) restores weights,
router biases, optimizer, data position, RNG, spike detector and monitor window, so the losses after a
resume equal those of an uninterrupted run.

Distributed training wraps this loop from outside through `Parallel`: `parallelize(model)` (FSDP /
expert parallel), rank-aware data sharding, `all_reduce` (in-place sum) for the global expert counts
and logged losses, clipping across meshes, DCP checkpoints and rank-0-only writes. Launched by torchrun
(WORLD_SIZE > 1), `train` builds those hooks itself (`stepflash.distributed.launch`): process group,
("dp", "ep") mesh from --expert-parallel, and the group is destroyed at the end. --batch-size is the
global micro-batch, so the same flags train the same run at any world size (docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from stepflash.checkpoint import CheckpointError, load_model
from stepflash.config import ConfigError, resolve_config
from stepflash.errors import UserError
from stepflash.model import Step35ForCausalLM
from stepflash.checkpoint import run as ckpt
from stepflash.training.balance import ExpertLoad, apply_bias_updates
from stepflash.training.data import BatchSampler, open_training_data, validation_batches
from stepflash.training.data import default_data_dir  # noqa: F401  (re-exported: demo, benchmarks)
from stepflash.training.monitors import ExpertStatsWindow, MetricsLog, SpikeDetector
from stepflash.training.objective import compute_loss, evaluate
from stepflash.training.optimizer import build_optimizer, lr_factor, resolve_optimizer


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the message names the step."""


@dataclass
class TrainArgs:
    """Pre-train a Step 3.5 Flash-style model (MoE balancing, MTP loss, stability monitors)."""

    preset: str = field(default="small", metadata={"help": "preset (tiny, small, flash) or config.json / checkpoint dir"})
    data: str | None = field(default=None, metadata={
        "help": "prepared data dir (stepflash data prepare); default: the Python stdlib, prepared once and cached"})
    out: str = field(default="runs/train", metadata={"help": "run directory (checkpoints, metrics.jsonl)"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps (the schedule's length)"})
    resume: bool = field(default=False, metadata={"help": "continue from the run directory's latest checkpoint"})
    init_from: str | None = field(default=None, metadata={"help": "start from this checkpoint's weights"})
    batch_size: int = field(default=8, metadata={
        "help": "sequences per micro-batch over all processes (global); under torchrun each of N processes "
                "takes batch_size / N, so a step is batch_size * grad_accum sequences at any world size"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    optimizer: str = field(default="auto", metadata={
        "help": "muon (Muon + AdamW), adamw, or auto: muon on one process, adamw under torchrun (Muon needs "
                "whole matrices, FSDP shards them), the checkpoint's own when resuming"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of the peak (cosine)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: off)"})
    mtp_weight: float = field(default=0.3, metadata={"help": "weight of the MTP loss (0: do not train MTP)"})
    mtp_depth_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0],
                                           metadata={"help": "relative weight of each MTP module"})
    bias_update_rate: float = field(default=1e-3, metadata={"help": "loss-free router-bias step (0: off)"})
    ep_loss_coef: float = field(default=1e-3, metadata={"help": "EP-group balance loss coefficient (0: off)"})
    ep_groups: int = field(default=0, metadata={
        "help": "expert groups G of the EP-group balance loss (0: --expert-parallel when > 1, else 4)"})
    expert_parallel: int = field(default=1, metadata={
        "help": "under torchrun: split the routed experts over groups of this many processes (must divide the "
                "process count and the experts); the rest of the model is FSDP-sharded over all processes"})
    export: bool = field(default=True, metadata={
        "help": "under torchrun: also write the release safetensors into the final checkpoint (gathers the whole "
                "model on rank 0; --no-export for models that do not fit, then `stepflash convert`)"})
    eval_every: int = field(default=100, metadata={"help": "validate every N steps (0: only at the end)"})
    val_batches: int = field(default=8, metadata={"help": "validation batches per evaluation"})
    log_every: int = field(default=10, metadata={"help": "write metrics every N steps"})
    save_every: int = field(default=200, metadata={"help": "checkpoint every N steps (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (0: all)"})
    spike_z: float = field(default=6.0, metadata={"help": "loss spike threshold in running std (0: off)"})
    skip_spikes: bool = field(default=False, metadata={"help": "skip the optimizer step on a loss spike"})
    time_limit_s: float = field(default=0.0, metadata={"help": "stop (and save) after this many seconds (0: none)"})
    seed: int = field(default=0, metadata={"help": "initialisation and data-order seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:i]"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        if self.ep_groups == 0:  # the balance loss's groups are the expert-parallel ranks (SPEC section 6)
            self.ep_groups = self.expert_parallel if self.expert_parallel > 1 else 4


@dataclass
class Parallel:
    """Hooks a distributed launcher fills in; the defaults are a single process."""

    rank: int = 0
    world_size: int = 1
    parallelize: Callable | None = None  # model -> model (wrap for FSDP / expert parallel)
    all_reduce: Callable | None = None  # in-place sum of a tensor across ranks
    barrier: Callable | None = None
    export: Callable | None = None  # model -> plain single-device model to save (e.g. gathers FSDP shards)
    clip_grad_norm: Callable | None = None  # (model, max_norm) -> norm; default torch's
    sharded_checkpoints: bool = False  # save DCP checkpoints from every rank (collective) instead of rank 0's
    device: torch.device | None = None  # this rank's device; default from --device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sync(self) -> None:
        if self.barrier is not None:
            self.barrier()


def _check_args(args: TrainArgs, world_size: int = 1) -> None:
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "ep_groups", "log_every", "save_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.optimizer not in ("auto", "muon", "adamw"):
        raise UserError(f"--optimizer must be auto, muon or adamw, got {args.optimizer!r}")
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is the global micro-batch: it must be a multiple of the "
                        f"{world_size} processes")
    if args.expert_parallel > 1 and args.ep_groups != args.expert_parallel:
        raise UserError(f"--ep-groups {args.ep_groups} must equal --expert-parallel {args.expert_parallel} (the balance "
                        "loss groups are the expert-parallel ranks); leave it at 0")
    if args.lr <= 0 or args.mtp_weight < 0 or args.ep_loss_coef < 0 or args.bias_update_rate < 0:
        raise UserError("--lr must be positive and --mtp-weight, --ep-loss-coef, --bias-update-rate non-negative")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _rng_state(device: torch.device) -> dict:
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
    meta device: `parallelize` then materialises each rank's shards (stepflash.distributed.launch)."""
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
class StepStats:
    """Means over a step's micro-batches (and ranks) of what the objective reports."""

    loss: float = 0.0
    main: float = 0.0
    ep: float = 0.0
    max_logit: float = float("-inf")
    mtp: list[float] = field(default_factory=list)


def forward_backward(model, batches, args: TrainArgs, moe_modules, load: ExpertLoad, window_stats: ExpertStatsWindow,
                     autocast_dtype, par: Parallel) -> StepStats:
    """Accumulate gradients of the objective over the step's micro-batches; collect expert counts."""
    st, n = StepStats(), len(batches)
    for batch in batches:
        with torch.autocast(batch.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            parts = compute_loss(model, batch, args.mtp_weight, args.mtp_depth_weights, args.ep_loss_coef,
                                 args.ep_groups, moe_modules)
        (parts.total / n).backward()
        st.loss += float(parts.total.detach()) / n
        st.main += parts.main / n
        st.ep += parts.ep / n
        st.max_logit = max(st.max_logit, parts.max_logit)
        st.mtp = [a + b / n for a, b in zip(st.mtp or [0.0] * len(parts.mtp), parts.mtp)]
        if moe_modules:
            load.add(moe_modules)
            window_stats.add()
    if par.all_reduce is not None:  # logged values are means over ranks
        t = torch.tensor([st.loss, st.main, st.ep] + st.mtp, dtype=torch.float64, device=batches[0].device)
        par.all_reduce(t)
        st.loss, st.main, st.ep, *st.mtp = (t / par.world_size).tolist()
    return st


def _validate(model, val_set, device, autocast_dtype, par: Parallel) -> dict[str, float]:
    val = evaluate(model, val_set, device, autocast_dtype)
    if par.all_reduce is not None:
        t = torch.tensor(list(val.values()), dtype=torch.float64, device=device)
        par.all_reduce(t)
        val = dict(zip(val, (t / par.world_size).tolist()))
    return val


def _check_finite_weights(model, step: int, par: Parallel) -> None:
    # Sharded parameters: each rank checks its own shard, then all agree.
    bad = next((name for name, p in model.named_parameters()
                if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()), None)
    if par.all_reduce is not None:
        flag = torch.tensor([float(bad is not None)], device=next(model.parameters()).device)
        par.all_reduce(flag)
        bad = bad or ("a parameter on another rank" if flag.item() > 0 else None)
    if bad is not None:
        raise TrainingDiverged(f"weights of {bad} became non-finite at step {step}; not saved")


def train(args: TrainArgs, par: Parallel | None = None, on_step: Callable | None = None) -> dict:
    """Run (or resume) training. `on_step(step, model, record)` is called after every step (tests, tools).
    Returns {"losses": [(step, loss)], "val": [{"step", "val_loss", ...}], "skipped": [...], "checkpoint", "step",
    "rank"}. Without `par`, a process started by torchrun (WORLD_SIZE > 1) trains sharded with its peers."""
    from stepflash.distributed.launch import check_expert_parallel, torchrun_session, under_torchrun

    if par is None and under_torchrun():
        with torchrun_session(args.expert_parallel, backend="gloo" if args.device == "cpu" else None) as s:
            par = Parallel(rank=s.rank, world_size=s.world_size, parallelize=s.parallelize, all_reduce=s.all_reduce,
                           barrier=s.barrier, clip_grad_norm=s.clip_grad_norm, sharded_checkpoints=True,
                           device=s.device)
            return _train(args, par, on_step)
    if par is None:
        check_expert_parallel(args.expert_parallel, 1)
    return _train(args, par or Parallel(), on_step)


def _train(args: TrainArgs, par: Parallel, on_step: Callable | None) -> dict:
    from stepflash.distributed.launch import check_expert_parallel

    _check_args(args, par.world_size)
    device = par.device or _device(args.device)
    model = build_model(args, device, par.world_size)
    cfg = model.config
    if cfg.moe_layers and cfg.moe_num_experts % args.ep_groups:
        raise UserError(f"--ep-groups {args.ep_groups} must divide the {cfg.moe_num_experts} experts")
    if args.expert_parallel > 1:
        check_expert_parallel(args.expert_parallel, par.world_size, cfg.moe_num_experts if cfg.moe_layers else 0)
    train_data, val_data, tokenizer_src = open_training_data(args, cfg.vocab_size, par)
    path, state = ckpt.resume_point(args.out, args.resume)
    kind = resolve_optimizer(args.optimizer, par.world_size, ckpt.saved_optimizer(state))
    if par.is_main and par.world_size > 1 and args.optimizer == "auto" and state is None:
        print("note: training sharded with AdamW (--optimizer auto; Muon needs whole matrices)", file=sys.stderr)
    sharded_ckpt = path is not None and ckpt.is_sharded(path)
    portable_opt = None
    if state is not None and not sharded_ckpt:
        if next(model.parameters()).is_meta:
            raise UserError(f"{path} is a single-process checkpoint of a model too big for one device: convert it "
                            "to DCP with `stepflash convert` and resume from that")
        ckpt.load_checkpoint(path, model)  # weights go in before any wrapping
        if par.parallelize is not None:  # its optimizer state is re-sharded after wrapping
            portable_opt = ckpt.portable_optimizer_state(
                model, build_optimizer(model, kind, args.lr, args.weight_decay), state["optimizer"])

    if par.parallelize is not None:
        model = par.parallelize(model)
    moe_modules = model.moe_modules
    moe_layer_ids = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    for m in moe_modules:
        m.record_routing = True
    opt = build_optimizer(model, kind, args.lr, args.weight_decay)
    per_rank = args.batch_size // par.world_size
    sampler = BatchSampler(train_data, per_rank, args.seed, par.rank, par.world_size)
    val_set = validation_batches(val_data, per_rank, args.val_batches, par.rank, par.world_size)
    spikes = SpikeDetector(z=args.spike_z)
    window_stats = ExpertStatsWindow(moe_modules)
    load = ExpertLoad(len(moe_modules), cfg.moe_num_experts if moe_modules else 0, device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    clip = par.clip_grad_norm or (lambda m, max_norm: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm))

    step, tokens_seen = 0, 0
    if state is not None:
        if sharded_ckpt:  # weights and optimizer, from whatever layout saved them into this one
            from stepflash.checkpoint.dcp import load_checkpoint as load_dcp

            load_dcp(path, model, opt)
        elif portable_opt is not None:
            ckpt.load_portable_optimizer_state(model, opt, portable_opt)
        else:
            opt.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        spikes.load_state_dict(state["spikes"])
        window_stats.load_state_dict(state["monitor_window"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step, tokens_seen = state["step"], state["tokens_seen"]
    if par.is_main:
        os.makedirs(args.out, exist_ok=True)
    log = MetricsLog(args.out, enabled=par.is_main)
    log.truncate_after(step)  # a fresh run starts a fresh log; a resumed one drops what it will redo

    def save(final: bool = False) -> str | None:
        _check_finite_weights(model, step, par)
        trainer_state = {
            "step": step, "tokens_seen": tokens_seen, "optimizer_kind": kind, "sampler": sampler.state_dict(),
            "spikes": spikes.state_dict(), "monitor_window": window_stats.state_dict(), "rng": _rng_state(device),
            "args": {k: v for k, v in dataclasses.asdict(args).items() if isinstance(v, (int, float, str, bool))}}
        if par.sharded_checkpoints:  # collective: the optimizer state goes into the DCP shards
            return ckpt.save_sharded_checkpoint(args.out, step, model, opt, trainer_state, tokenizer_src,
                                                args.keep_checkpoints, export=final and args.export)
        if not par.is_main:
            return None
        trainer_state["optimizer"] = opt.state_dict()
        to_save = par.export(model) if par.export is not None else model
        return ckpt.save_checkpoint(args.out, step, to_save, trainer_state, tokenizer_src, args.keep_checkpoints)

    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum  # global: batch_size is over all ranks
    history: dict = {"losses": [], "val": [], "checkpoint": None, "skipped": [], "rank": par.rank}
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step", disable=not (args.progress and par.is_main))
    t_start = t_log = time.time()
    tokens_at_log, last_saved = tokens_seen, step if state is not None else -1
    model.train()
    while step < args.steps:
        log_now = (step + 1) % args.log_every == 0 or step + 1 == args.steps
        window_stats.record_stats(log_now)
        load.reset()
        batches = [sampler.next_batch().to(device) for _ in range(args.grad_accum)]
        st = forward_backward(model, batches, args, moe_modules, load, window_stats, autocast_dtype, par)
        if not math.isfinite(st.loss):
            bar.close()
            log.write({"step": step + 1, "error": f"non-finite loss {st.loss}"})
            opt.zero_grad()
            raise TrainingDiverged(f"loss became {st.loss} at step {step + 1}; stopped without updating or saving "
                                   f"(last checkpoint: {ckpt.latest_checkpoint(args.out)})")
        grad_norm = float(clip(model, args.grad_clip or float("inf")))
        spike = spikes.check(st.loss)
        skip = not math.isfinite(grad_norm) or (spike and args.skip_spikes)
        lr_now = args.lr * lr_factor(step, args.warmup_steps, args.steps, args.min_lr_ratio)
        if skip:
            history["skipped"].append(step + 1)
        else:
            opt.set_lr_factor(lr_now / args.lr)
            opt.step()
            if args.bias_update_rate > 0 and moe_modules:
                apply_bias_updates(moe_modules, load.global_counts(par.all_reduce), args.bias_update_rate)
        opt.zero_grad()
        step += 1
        tokens_seen += tokens_per_step
        history["losses"].append((step, st.loss))
        bar.update(1)

        record = None
        if log_now:
            now = time.time()
            tps = (tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
            t_log, tokens_at_log = now, tokens_seen
            record = {"step": step, "loss": st.loss, "main_loss": st.main, "ep_loss": st.ep, "max_logit": st.max_logit,
                      "grad_norm": grad_norm, "lr": lr_now, "tokens_per_s": tps, "tokens_seen": tokens_seen,
                      "spike": spike, "skipped": skip, **{f"mtp_loss_{j}": v for j, v in enumerate(st.mtp)},
                      **window_stats.metrics(moe_layer_ids)}
            window_stats.reset()
            bar.set_postfix(loss=f"{st.loss:.3f}", tok_s=f"{tps:,.0f}")
        timed_out = _timed_out(args, t_start, par, device)
        last = step == args.steps or timed_out
        if (args.eval_every > 0 and step % args.eval_every == 0) or last:
            val = _validate(model, val_set, device, autocast_dtype, par)
            history["val"].append({"step": step, **val})
            record = {**(record or {"step": step}), **val}
        if record is not None:
            log.write(record)
        if on_step is not None:
            on_step(step, model, record)
        if step % args.save_every == 0 or last:
            history["checkpoint"], last_saved = save(final=last), step
        if timed_out:
            break
    bar.close()
    log.close()
    if last_saved != step:
        history["checkpoint"] = save(final=True)
    history["step"] = step
    history["checkpoint"] = history["checkpoint"] or ckpt.latest_checkpoint(args.out)
    return history


def _timed_out(args: TrainArgs, t_start: float, par: Parallel, device) -> bool:
    """--time-limit-s reached; under torchrun rank 0's clock decides, so every rank stops at the same step."""
    if args.time_limit_s <= 0:
        return False
    out = torch.tensor([float(par.is_main and time.time() - t_start >= args.time_limit_s)], device=device)
    if par.all_reduce is not None:
        par.all_reduce(out)
    return bool(out.item() > 0)


def run(args: TrainArgs) -> int:
    h = train(args)
    if h["rank"] != 0:  # under torchrun only rank 0 reports
        return 0
    val = h["val"][-1]["val_loss"] if h["val"] else float("nan")
    last = f"last loss {h['losses'][-1][1]:.4f}, " if h["losses"] else ""
    print(f"trained to step {h['step']}: {last}validation loss {val:.4f}; checkpoint {h['checkpoint']}")
    return 0
