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
and logged losses, and rank-0-only writes. Nothing here creates process groups.
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
from stepflash.training import checkpointing as ckpt
from stepflash.training.balance import ExpertLoad, apply_bias_updates
from stepflash.training.data import BatchSampler, TokenShards, validation_batches
from stepflash.training.monitors import ExpertStatsWindow, MetricsLog, SpikeDetector
from stepflash.training.objective import compute_loss, evaluate
from stepflash.training.optimizer import build_optimizer, lr_factor


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
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch (per rank)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    optimizer: str = field(default="muon", metadata={"help": "muon (Muon + AdamW) or adamw"})
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
    ep_groups: int = field(default=4, metadata={"help": "expert-parallel groups G of the balance loss"})
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


@dataclass
class Parallel:
    """Hooks a distributed launcher fills in; the defaults are a single process."""

    rank: int = 0
    world_size: int = 1
    parallelize: Callable | None = None  # model -> model (wrap for FSDP / expert parallel)
    all_reduce: Callable | None = None  # in-place sum of a tensor across ranks
    barrier: Callable | None = None
    export: Callable | None = None  # model -> plain single-device model to save (e.g. gathers FSDP shards)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sync(self) -> None:
        if self.barrier is not None:
            self.barrier()


def cache_dir() -> str:
    return os.environ.get("STEPFLASH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stepflash")


def default_data_dir(vocab_size: int, progress: bool = True, par: Parallel | None = None) -> str:
    """The built-in corpus tokenized with a tokenizer of `vocab_size`, prepared once and cached."""
    from stepflash.training.data import PrepareArgs, prepare

    par = par or Parallel()
    name = f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib-v{vocab_size}"
    path = os.path.join(cache_dir(), "data", name)
    if par.is_main and not os.path.isfile(os.path.join(path, "meta.json")):
        print(f"preparing the built-in corpus (Python standard library) in {path} (once)", file=sys.stderr)
        prepare(PrepareArgs(input=None, out=path, vocab_size=vocab_size, progress=progress))
    par.sync()
    return path


def _check_args(args: TrainArgs) -> None:
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "ep_groups", "log_every", "save_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.optimizer not in ("muon", "adamw"):
        raise UserError(f"--optimizer must be muon or adamw, got {args.optimizer!r}")
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


def _check_fits(cfg, device: torch.device) -> None:
    """Refuse a single-device run whose fp32 weights, grads and AdamW moments (16 B/param) cannot fit."""
    with torch.device("meta"):
        n = Step35ForCausalLM(cfg).num_parameters()
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 16 * n > have:
        raise UserError(f"this config has {n / 1e9:.1f}B parameters: training state needs ~{16 * n / 2**30:,.0f} GiB, "
                        f"this {device.type} device has {have / 2**30:,.0f} GiB; train it sharded (stepflash.distributed)")


def build_model(args: TrainArgs, device: torch.device) -> Step35ForCausalLM:
    try:
        cfg = resolve_config(args.preset)
    except ConfigError as e:
        raise UserError(str(e))
    _check_fits(cfg, device)
    torch.manual_seed(args.seed)
    if args.init_from:  # weights (fp32 for training) from a checkpoint of the same shape
        try:
            return load_model(args.init_from, dtype=torch.float32, device=device, config=cfg.replace(torch_dtype="float32"))
        except CheckpointError as e:
            raise UserError(f"--init-from {args.init_from} does not fit --preset {args.preset}: {e}")
    with torch.device(device):
        return Step35ForCausalLM(cfg.replace(torch_dtype="float32"))


def _open_data(args: TrainArgs, vocab_size: int, par: Parallel) -> tuple[TokenShards, TokenShards, str | None]:
    """Train and validation windows of the data dir (the built-in corpus by default), and its tokenizer.json."""
    data_dir = args.data or default_data_dir(vocab_size, args.progress, par)
    train_data = TokenShards(data_dir, "train", args.seq_len + 1)
    if train_data.meta["vocab_size"] > vocab_size:
        raise UserError(f"the data's tokenizer has {train_data.meta['vocab_size']} tokens but the model's vocab is "
                        f"{vocab_size}; prepare the data with --vocab-size {vocab_size} or less")
    tokenizer = os.path.join(data_dir, "tokenizer.json")
    return train_data, TokenShards(data_dir, "val", args.seq_len + 1), tokenizer if os.path.isfile(tokenizer) else None


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


def _check_finite_weights(model, step: int) -> None:
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise TrainingDiverged(f"weights of {bad} became non-finite at step {step}; not saved")


def train(args: TrainArgs, par: Parallel | None = None, on_step: Callable | None = None) -> dict:
    """Run (or resume) training. `on_step(step, model, record)` is called after every step (tests, tools).
    Returns {"losses": [(step, loss)], "val": [{"step", "val_loss", ...}], "skipped": [...], "checkpoint", "step"}."""
    par = par or Parallel()
    _check_args(args)
    device = _device(args.device)
    model = build_model(args, device)
    cfg = model.config
    if cfg.moe_layers and cfg.moe_num_experts % args.ep_groups:
        raise UserError(f"--ep-groups {args.ep_groups} must divide the {cfg.moe_num_experts} experts")
    train_data, val_data, tokenizer_src = _open_data(args, cfg.vocab_size, par)
    state = None
    if args.resume:
        path = ckpt.latest_checkpoint(args.out)
        if path is None:
            raise UserError(f"--resume: no checkpoint in {ckpt.checkpoints_root(args.out)}")
        state = ckpt.load_checkpoint(path, model)  # weights go in before any wrapping
    elif ckpt.latest_checkpoint(args.out) is not None:
        raise UserError(f"{args.out} already holds checkpoints: pass --resume to continue, or choose another --out")

    if par.parallelize is not None:
        model = par.parallelize(model)
    moe_modules = model.moe_modules
    moe_layer_ids = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    for m in moe_modules:
        m.record_routing = True
    opt = build_optimizer(model, args.optimizer, args.lr, args.weight_decay)
    sampler = BatchSampler(train_data, args.batch_size, args.seed, par.rank, par.world_size)
    val_set = validation_batches(val_data, args.batch_size, args.val_batches, par.rank, par.world_size)
    spikes = SpikeDetector(z=args.spike_z)
    window_stats = ExpertStatsWindow(moe_modules)
    load = ExpertLoad(len(moe_modules), cfg.moe_num_experts if moe_modules else 0, device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    step, tokens_seen = 0, 0
    if state is not None:
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

    def save() -> str | None:
        _check_finite_weights(model, step)
        if not par.is_main:
            return None
        trainer_state = {
            "step": step, "tokens_seen": tokens_seen, "optimizer": opt.state_dict(), "sampler": sampler.state_dict(),
            "spikes": spikes.state_dict(), "monitor_window": window_stats.state_dict(), "rng": _rng_state(device),
            "args": {k: v for k, v in dataclasses.asdict(args).items() if isinstance(v, (int, float, str, bool))}}
        to_save = par.export(model) if par.export is not None else model
        return ckpt.save_checkpoint(args.out, step, to_save, trainer_state, tokenizer_src, args.keep_checkpoints)

    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * par.world_size
    history: dict = {"losses": [], "val": [], "checkpoint": None, "skipped": []}
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
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf")))
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
        timed_out = args.time_limit_s > 0 and time.time() - t_start >= args.time_limit_s
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
            history["checkpoint"], last_saved = save(), step
        if timed_out:
            break
    bar.close()
    log.close()
    if last_saved != step:
        history["checkpoint"] = save()
    history["step"] = step
    history["checkpoint"] = history["checkpoint"] or ckpt.latest_checkpoint(args.out)
    return history


def run(args: TrainArgs) -> int:
    h = train(args)
    val = h["val"][-1]["val_loss"] if h["val"] else float("nan")
    last = f"last loss {h['losses'][-1][1]:.4f}, " if h["losses"] else ""
    print(f"trained to step {h['step']}: {last}validation loss {val:.4f}; checkpoint {h['checkpoint']}")
    return 0
