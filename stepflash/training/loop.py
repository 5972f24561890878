"""`stepflash train`: the pre-training loop, as three pieces: `setup`, `train_step`, `log_and_checkpoint`.

One step = `grad_accum` micro-batches of [batch_size, seq_len + 1] token windows, each contributing
the objective of `objective.py` (next token + MTP + EP-group balance), then gradient clipping, a
skip check (non-finite grad norm, or a loss spike when --skip-spikes), the optimizer step under the
warmup+cosine schedule, and the loss-free router-bias update from the step's global expert counts.

Stops early with a one-line error naming the step when the loss is NaN/inf: nothing is stepped or
saved after it, so the last checkpoint stays the last good state. Resuming (--resume) restores weights,
router biases, optimizer, data position, RNG, spike detector and monitor window, so the losses after a
resume equal those of an uninterrupted run; --steps is the schedule's total, so a resume continues to it
(fewer steps than are done is refused; as many trains nothing and says so).

Distributed training wraps this loop from outside through the `Runtime`: FSDP2 / expert parallelism
(`rt.parallelize`), rank-aware data sharding, sums of the global expert counts and logged losses,
clipping across meshes, DCP checkpoints and rank-0-only writes; Muon works on the shards
(`muon.py`). Launched by torchrun (WORLD_SIZE > 1), `train` builds that runtime itself
(`stepflash.distributed.launch`). --batch-size is the global micro-batch, so the same flags train the
same run at any world size (docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from stepflash.checkpoint import run as ckpt
from stepflash.distributed.runtime import Runtime
from stepflash.errors import UserError
from stepflash.training.args import TrainArgs, check_args
from stepflash.training.balance import apply_bias_updates
from stepflash.training.data import default_data_dir  # noqa: F401  (re-exported: demo, benchmarks)
from stepflash.training.objective import compute_loss, evaluate
from stepflash.training.schedule import lr_factor
from stepflash.training.setup import Run, build_model, device_for, resume_state, rng_state, setup

__all__ = ["Run", "TrainArgs", "TrainingDiverged", "build_model", "run", "setup", "train"]


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the message names the step."""


# ---- one step -------------------------------------------------------------------------------------

@dataclass
class StepStats:
    """Means over a step's micro-batches (and ranks) of what the objective reports, and what the step did."""

    loss: float = 0.0
    main: float = 0.0
    ep: float = 0.0
    max_logit: float = float("-inf")
    mtp: list[float] = field(default_factory=list)
    grad_norm: float = 0.0
    lr: float = 0.0
    spike: bool = False
    skipped: bool = False


def forward_backward(run: Run, batches: list[torch.Tensor]) -> StepStats:
    """Accumulate gradients of the objective over the step's micro-batches; collect expert counts."""
    a, st, n = run.args, StepStats(), len(batches)
    for batch in batches:
        with torch.autocast(batch.device.type, dtype=run.autocast_dtype or torch.bfloat16,
                            enabled=run.autocast_dtype is not None):
            parts = compute_loss(run.model, batch, a.mtp_weight, a.mtp_depth_weights, a.ep_loss_coef, a.ep_groups,
                                 run.moe_modules)
        (parts.total / n).backward()
        st.loss += float(parts.total.detach()) / n
        st.main += parts.main / n
        st.ep += parts.ep / n
        st.max_logit = max(st.max_logit, parts.max_logit)
        st.mtp = [x + y / n for x, y in zip(st.mtp or [0.0] * len(parts.mtp), parts.mtp)]
        if run.moe_modules:
            run.load.add(run.moe_modules)
            run.window_stats.add()
    if run.rt.distributed:  # logged values are means over ranks
        st.loss, st.main, st.ep, *st.mtp = [v / run.rt.world_size for v in run.rt.sum([st.loss, st.main, st.ep, *st.mtp])]
    return st


def train_step(run: Run, log_now: bool) -> StepStats:
    """Forward/backward over the step's micro-batches, clip, maybe skip, optimizer step, router-bias update."""
    a = run.args
    run.window_stats.record_stats(log_now)
    run.load.reset()
    st = forward_backward(run, [run.sampler.next_batch().to(run.device) for _ in range(a.grad_accum)])
    if not math.isfinite(st.loss):
        run.metrics.write({"step": run.step + 1, "error": f"non-finite loss {st.loss}"})
        run.opt.zero_grad()
        raise TrainingDiverged(f"loss became {st.loss} at step {run.step + 1}; stopped without updating or saving "
                               f"(last checkpoint: {ckpt.latest_checkpoint(a.out)})")
    st.grad_norm = float(run.rt.clip_grad_norm(run.model, a.grad_clip))
    st.spike = run.spikes.check(st.loss)
    st.skipped = not math.isfinite(st.grad_norm) or (st.spike and a.skip_spikes)
    st.lr = a.lr * lr_factor(run.step, a.warmup_steps, a.steps, a.min_lr_ratio)
    if not st.skipped:
        run.opt.set_lr_factor(st.lr / a.lr)
        run.opt.step()
        if a.bias_update_rate > 0 and run.moe_modules:
            apply_bias_updates(run.moe_modules, run.load.global_counts(run.rt.all_reduce), a.bias_update_rate)
    run.opt.zero_grad()
    run.step += 1
    run.tokens_seen += a.batch_size * a.seq_len * a.grad_accum  # global: batch_size is over all ranks
    return st


# ---- logging, validation, checkpoints -------------------------------------------------------------

def _check_finite_weights(run: Run) -> None:
    # Sharded parameters: each rank checks its own shard, then all agree.
    bad = next((name for name, p in run.model.named_parameters()
                if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()), None)
    if run.rt.any(bad is not None):
        raise TrainingDiverged(f"weights of {bad or 'a parameter on another rank'} became non-finite at step "
                               f"{run.step}; not saved")


def save(run: Run, final: bool = False) -> str | None:
    """Checkpoint the run (collective under torchrun: DCP shards from every rank); the path on rank 0."""
    a = run.args
    _check_finite_weights(run)
    trainer_state = {
        "step": run.step, "tokens_seen": run.tokens_seen, "optimizer_kind": run.kind,
        "sampler": run.sampler.state_dict(), "spikes": run.spikes.state_dict(),
        "monitor_window": run.window_stats.state_dict(), "rng": rng_state(run.device),
        "args": {k: v for k, v in dataclasses.asdict(a).items() if isinstance(v, (int, float, str, bool))}}
    run.last_saved = run.step
    if run.rt.distributed:  # the optimizer state goes into the DCP shards
        return ckpt.save_sharded_checkpoint(a.out, run.step, run.model, run.opt, trainer_state, run.tokenizer_src,
                                            a.keep_checkpoints, export=final and a.export)
    trainer_state["optimizer"] = run.opt.state_dict()
    return ckpt.save_checkpoint(a.out, run.step, run.model, trainer_state, run.tokenizer_src, a.keep_checkpoints)


def validate(run: Run) -> dict[str, float]:
    """Validation losses, means over ranks."""
    val = evaluate(run.model, run.val_set, run.device, run.autocast_dtype)
    if run.rt.distributed:
        val = dict(zip(val, [v / run.rt.world_size for v in run.rt.sum(list(val.values()))]))
    return val


class Clock:
    """Wall time since the start and the token rate since the last log line."""

    def __init__(self, tokens_seen: int):
        self.start = self.last = time.time()
        self.tokens_at_last = tokens_seen

    def tokens_per_s(self, tokens_seen: int) -> float:
        now = time.time()
        rate = (tokens_seen - self.tokens_at_last) / max(now - self.last, 1e-9)
        self.last, self.tokens_at_last = now, tokens_seen
        return rate


def _timed_out(run: Run, clock: Clock) -> bool:
    """--time-limit-s reached; under torchrun rank 0's clock decides, so every rank stops at the same step."""
    limit = run.args.time_limit_s
    return limit > 0 and run.rt.any(run.rt.is_main and time.time() - clock.start >= limit)


def log_and_checkpoint(run: Run, st: StepStats, log_now: bool, clock: Clock, history: dict) -> tuple[dict | None, bool]:
    """After a step: the metrics record (on log steps), validation (every eval_every and at the end), and a
    checkpoint (every save_every and at the end). Returns (record or None, whether the run stops here)."""
    a = run.args
    record = None
    if log_now:
        record = {"step": run.step, "loss": st.loss, "main_loss": st.main, "ep_loss": st.ep,
                  "max_logit": st.max_logit, "grad_norm": st.grad_norm, "lr": st.lr,
                  "tokens_per_s": clock.tokens_per_s(run.tokens_seen), "tokens_seen": run.tokens_seen,
                  "spike": st.spike, "skipped": st.skipped, **{f"mtp_loss_{j}": v for j, v in enumerate(st.mtp)},
                  **run.window_stats.metrics(run.moe_layer_ids)}
        run.window_stats.reset()
    timed_out = _timed_out(run, clock)
    last = run.step == a.steps or timed_out
    eval_every = a.eval_every if a.eval_every >= 0 else -(-a.steps // 10)  # ceil(steps / 10)
    if (eval_every > 0 and run.step % eval_every == 0) or last:
        val = validate(run)
        history["val"].append({"step": run.step, **val})
        record = {**(record or {"step": run.step}), **val}
    if record is not None:
        run.metrics.write(record)
    if run.step % a.save_every == 0 or last:
        history["checkpoint"] = save(run, final=last)
    return record, timed_out


# ---- the run ----------------------------------------------------------------------------------------

def train(args: TrainArgs, rt: Runtime | None = None, on_step: Callable | None = None) -> dict:
    """Run (or resume) training. `on_step(step, model, record)` is called after every step (tests, tools).
    Returns {"losses": [(step, loss)], "val": [{"step", "val_loss", ...}], "skipped": [...], "checkpoint", "step",
    "rank"}. Without `rt`, a process started by torchrun (WORLD_SIZE > 1) trains sharded with its peers."""
    from stepflash.distributed.launch import check_expert_parallel, torchrun_session, under_torchrun

    if rt is None and under_torchrun():
        with torchrun_session(args.expert_parallel, backend="gloo" if args.device == "cpu" else None) as rt:
            return _train(args, rt, on_step)
    if rt is None:
        check_expert_parallel(args.expert_parallel, 1)
        rt = Runtime(device=device_for(args.device))
    return _train(args, rt, on_step)


def _train(args: TrainArgs, rt: Runtime, on_step: Callable | None) -> dict:
    check_args(args, rt.world_size)
    path, state = resume_state(args)
    history: dict = {"losses": [], "val": [], "checkpoint": path, "skipped": [], "rank": rt.rank,
                     "step": state["step"] if state else 0}
    if state is not None and state["step"] == args.steps:
        return history  # nothing to train: `run` says so
    run = setup(args, rt, path, state)
    bar = tqdm(total=args.steps, initial=run.step, desc="train", unit="step", disable=not (args.progress and rt.is_main))
    clock = Clock(run.tokens_seen)
    run.model.train()
    while run.step < args.steps:
        log_now = (run.step + 1) % args.log_every == 0 or run.step + 1 == args.steps
        try:
            st = train_step(run, log_now)
        except TrainingDiverged:
            bar.close()
            raise
        history["losses"].append((run.step, st.loss))
        if st.skipped:
            history["skipped"].append(run.step)
        bar.update(1)
        record, timed_out = log_and_checkpoint(run, st, log_now, clock, history)
        if record is not None and "loss" in record:
            bar.set_postfix(loss=f"{st.loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if on_step is not None:
            on_step(run.step, run.model, record)
        if timed_out:
            break
    bar.close()
    run.metrics.close()
    if run.last_saved != run.step:
        history["checkpoint"] = save(run, final=True)
    history["step"] = run.step
    history["checkpoint"] = history["checkpoint"] or ckpt.latest_checkpoint(args.out)
    return history


def run(args: TrainArgs) -> int:
    h = train(args)
    if h["rank"] != 0:  # under torchrun only rank 0 reports
        return 0
    if not h["losses"]:
        print(f"nothing to train: {args.out} is already at step {h['step']} of --steps {args.steps} "
              f"(pass a larger --steps to continue); checkpoint {h['checkpoint']}")
        return 0
    val = f", validation loss {h['val'][-1]['val_loss']:.4f}" if h["val"] else ""
    print(f"trained to step {h['step']}: last loss {h['losses'][-1][1]:.4f}{val}; checkpoint {h['checkpoint']}")
    return 0
