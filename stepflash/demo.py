"""`python -m stepflash.demo`: the whole pipeline on one CPU in about eight minutes.

1. prepare the built-in corpus (the Python standard library's sources: no download), tokenized with a
   byte-level BPE trained to the `small` preset's vocabulary; cached in ~/.cache/stepflash after the
   first run;
2. measure the validation loss of the freshly initialised `small` model (every feature of the release:
   hybrid sliding/full attention, sigmoid-routed MoE with a shared expert, 3 MTP modules);
3. pre-train it for the remaining time budget (Muon + AdamW, MTP loss, loss-free router bias, EP-group
   balance loss, stability monitors and a validation loss every ~1/8 of the run in RUN_DIR/metrics.jsonl),
   the step count planned from timed training steps (which also settle the thread count,
   stepflash/threads.py) so the cosine schedule ends when the budget does; the rate training actually ran
   at is printed beside the plan;
4. report the validation loss after training, and where the checkpoint + tokenizer were saved;
5. generate from a prompt: the greedy continuation (whitespace made visible when that is all it is),
   checked against MTP self-speculative decoding (`speculative_tokens=3`, must give the same tokens), the
   speed of both with a warning when speculation is the slower, and a sampled continuation with the MTP
   acceptance per draft position.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch

from stepflash.errors import UserError


@dataclass
class DemoArgs:
    """Prepare the corpus, pre-train the small preset on CPU for a bounded time, then generate with MTP."""

    minutes: float = field(default=8.0, metadata={"help": "total wall-clock budget, preparation included"})
    out: str = field(default="runs/demo", metadata={"help": "run directory (checkpoints, metrics.jsonl)"})
    preset: str = field(default="small", metadata={"help": "model preset"})
    prompt: str = field(default="import os\n\n\ndef main():\n    ", metadata={"help": "code prompt for the generation at the end"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    temperature: float = field(default=0.8, metadata={"help": "temperature of the sampled generation"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    device: str = field(default="cpu", metadata={"help": "cpu (the demo's target) or cuda"})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads (0: time a training step at 1 thread and at torch's default, keep the faster)"})


RESERVE_S = 45.0  # checkpoint, loading it back, generation
VAL_POINTS = 8  # validations over the run (the loss curve of `stepflash plot`), the last at the final step


def _step_timer(args: DemoArgs, train_args):
    """steps(threads, n) -> seconds of each of n optimizer steps of this model and batch shape."""
    from stepflash.training.loop import build_model
    from stepflash.training.objective import compute_loss
    from stepflash.training.optimizer import build_optimizer

    device = torch.device(args.device)
    model = build_model(train_args, device)
    for m in model.moe_modules:
        m.record_routing = True
    opt = build_optimizer(model, train_args.optimizer, train_args.lr, train_args.weight_decay)
    window = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)

    def steps(threads: int, n: int) -> list[float]:
        torch.set_num_threads(threads)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            compute_loss(model, window, ep_groups=train_args.ep_groups, moe_modules=model.moe_modules).total.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        return times

    return steps


def _measure_step_s(args: DemoArgs, train_args) -> float:
    """Seconds per optimizer step, after settling the thread count (stepflash.threads, timing the real
    training step): the median of three timed steps at the chosen count. A count whose probe is clearly
    slower is not timed (under load one step at 2 threads has taken 6x one thread's, over a minute)."""
    from stepflash.threads import apply_threads, measure

    steps = _step_timer(args, train_args)
    timed: dict[int, list[float]] = {}

    def per_count(counts: list[int]) -> dict[int, float]:
        probe = measure("train", counts)
        for n in counts:
            if probe[n] <= 1.5 * min(probe.values()):
                steps(n, 1)  # the first step at a count also warms up
                timed[n] = steps(n, 1)
        return {n: min(timed[n]) if n in timed else float("inf") for n in counts}

    choice = apply_threads(args.threads, "train", args.device, measure_fn=per_count)
    samples = timed.get(choice.threads) or steps(choice.threads, 1)[1:]  # (a warm-up when nothing was timed)
    samples = samples + steps(choice.threads, 3 - len(samples))
    return sorted(samples)[len(samples) // 2]


def plan_steps(seconds: float, step_s: float, val_s: float) -> tuple[int, int]:
    """(steps, eval_every) that fit `seconds`: the most steps whose time plus their validations' does, a
    validation every ~1/VAL_POINTS of the run but not more often than every 5 steps, the last at the end."""
    steps = int(seconds / step_s)
    while steps > 0:
        eval_every = max(5, math.ceil(steps / VAL_POINTS))
        if steps * step_s + math.ceil(steps / eval_every) * val_s <= seconds:
            return steps, eval_every
        steps -= 1
    return 0, 5


def _train_timed(train, train_args) -> dict:
    """Train, timing every step: the median step time, validations (and the final save) left out."""
    ends: list[tuple[float, bool]] = []  # (time the step ended, whether it also validated)
    t0 = time.perf_counter()
    h = train(train_args, on_step=lambda step, model, record: ends.append(
        (time.perf_counter(), bool(record and "val_loss" in record))))
    gaps = sorted(b - a for (a, _), (b, validated) in zip(ends, ends[1:]) if not validated)
    return {"history": h, "minutes": (time.perf_counter() - t0) / 60,
            "step_s": gaps[len(gaps) // 2] if gaps else float("nan")}


def _show_text(label: str, prompt: str, continuation: str) -> None:
    """Print a continuation so that whitespace shows (a barely trained model often emits only newlines)."""
    print(f"--- {label} ---")
    print(prompt + continuation)
    if not continuation.strip():
        print(f"(that is {len(continuation)} characters of whitespace only: {continuation[:40]!r}"
              f"{'...' if len(continuation) > 40 else ''})")


def speed_report(plain_tps: float, spec_tps: float, accepted: float) -> list[str]:
    """The speed line, and a plain warning when MTP speculation was the slower."""
    lines = [f"decoding speed: plain {plain_tps:.1f} tok/s, MTP speculation {spec_tps:.1f} tok/s "
             f"({accepted:.2f} of 3 drafts accepted per step)"]
    if spec_tps < plain_tps:
        lines.append(f"warning: MTP speculation was {plain_tps / max(spec_tps, 1e-9):.1f}x slower than plain decoding "
                     f"here: with {accepted:.2f} drafts accepted per step it does not pay for drafting 3 tokens and "
                     "verifying them; the MTP modules draft better with more training (`stepflash recipe` ends with "
                     "an MTP phase)")
    return lines


def _generate(ckpt_path: str, prompt: str, max_new_tokens: int, temperature: float, steps: int) -> dict:
    """Greedy: MTP speculation must give plain decoding's tokens; its speed is compared with plain
    decoding's and a slower speculation is said so. Sampled: the text, with MTP acceptance."""
    from stepflash import load_model
    from stepflash.inference.engine import Engine
    from stepflash.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt_path)
    model = load_model(ckpt_path, dtype=torch.float32)
    ids = tok.encode(prompt).ids
    engine = Engine(model, max_batch_size=1)
    engine.generate([ids], 4, temperature=0.0, speculative_tokens=3)  # warm-up: neither timed run pays it

    def timed(**kw):
        t = time.perf_counter()
        out = engine.generate([ids], max_new_tokens, **kw)[0]
        return out, len(out.token_ids) / max(time.perf_counter() - t, 1e-9)

    runs = [(timed(temperature=0.0), timed(temperature=0.0, speculative_tokens=3)) for _ in range(2)]  # interleaved
    (plain, _), (spec, _) = runs[0]
    plain_tps, spec_tps = (max(r[i][1] for r in runs) for i in (0, 1))  # the best of two of each
    accepted = spec.stats.get("mean_accepted", 0.0)
    _show_text(f"greedy continuation (temperature 0) after {steps} training steps", prompt, tok.decode(plain.token_ids))
    print(f"greedy with MTP speculation (3 drafts) gives the same tokens as plain decoding: "
          f"{spec.token_ids == plain.token_ids}")
    print("\n".join(speed_report(plain_tps, spec_tps, accepted)))
    sampled = engine.generate([ids], max_new_tokens, temperature=temperature, top_p=0.95, seed=0,
                              speculative_tokens=3)[0]
    per_pos = ", ".join(f"{a:.2f}" for a in sampled.stats.get("acceptance_per_position", []))
    _show_text(f"sampled (temperature {temperature}, top-p 0.95, MTP speculation): what the model writes after "
               f"{steps} steps, Python-shaped text rather than working code", prompt, tok.decode(sampled.token_ids))
    print(f"--- accepted drafts per step {sampled.stats.get('mean_accepted', 0.0):.2f} "
          f"(acceptance by draft position: {per_pos})")
    return {"plain_tok_s": plain_tps, "mtp_tok_s": spec_tps, "greedy_mean_accepted": accepted,
            "greedy_equal": spec.token_ids == plain.token_ids}


def demo(args: DemoArgs) -> dict:
    from stepflash.config import resolve_config
    from stepflash.checkpoint import run as ckpt
    from stepflash.training.data import TokenShards, validation_batches
    from stepflash.training.loop import TrainArgs, build_model, default_data_dir, train
    from stepflash.training.objective import evaluate

    t0 = time.time()
    budget = args.minutes * 60
    cfg = resolve_config(args.preset)
    if ckpt.latest_checkpoint(args.out) is not None:  # the demo's own scratch run directory
        print(f"replacing the previous demo run in {args.out}")
        shutil.rmtree(args.out)
    print(f"[1/5] corpus: the Python standard library, vocab {cfg.vocab_size}")
    data_dir = default_data_dir(cfg.vocab_size)
    train_args = TrainArgs(preset=args.preset, data=data_dir, out=args.out, batch_size=args.batch_size,
                           seq_len=args.seq_len, lr=args.lr, warmup_steps=10, eval_every=0, val_batches=4,
                           log_every=5, save_every=10**9, device=args.device)

    step_s = _measure_step_s(args, train_args)  # also settles the thread count
    print("[2/5] validation loss before training")
    device = torch.device(args.device)
    val = validation_batches(TokenShards(data_dir, "val", args.seq_len + 1), args.batch_size, train_args.val_batches)
    t_val = time.perf_counter()
    before = evaluate(build_model(train_args, device), val, device)
    val_s = time.perf_counter() - t_val
    left = budget - (time.time() - t0) - RESERVE_S
    steps, eval_every = plan_steps(left, step_s, val_s)
    if steps < 5:
        need = (time.time() - t0 + RESERVE_S + 5 * step_s + val_s) / 60
        raise UserError(f"--minutes {args.minutes:g} leaves {max(left, 0):.0f} s for training after preparation; "
                        f"one step takes {step_s:.1f} s here: five steps need --minutes {math.ceil(need)} or more")
    train_args.steps, train_args.eval_every, train_args.time_limit_s = steps, eval_every, left
    train_args.warmup_steps = min(10, steps // 5)
    print(f"[3/5] training {args.preset} for ~{left / 60:.1f} min: {steps} steps of {args.batch_size}x{args.seq_len} "
          f"tokens ({step_s:.1f} s/step measured, {torch.get_num_threads()} thread(s); validation every "
          f"{eval_every} steps, {val_s:.1f} s each)")
    timing = _train_timed(train, train_args)
    h = timing["history"]
    print(f"      trained {h['step']} of {steps} planned steps in {timing['minutes']:.1f} min: "
          f"{timing['step_s']:.1f} s/step (median, validations excluded) against the {step_s:.1f} s/step planned")

    after = h["val"][-1]
    print(f"[4/5] validation loss {before['val_loss']:.3f} -> {after['val_loss']:.3f} after {h['step']} steps "
          f"(MTP module 0: {before.get('val_mtp_loss_0', float('nan')):.3f} -> "
          f"{after.get('val_mtp_loss_0', float('nan')):.3f}); checkpoint + tokenizer in {h['checkpoint']}")
    print(f"[5/5] generating from {args.prompt!r}")
    speeds = _generate(h["checkpoint"], args.prompt, args.max_new_tokens, args.temperature, h["step"])
    print(f"done in {(time.time() - t0) / 60:.1f} min (budget {args.minutes:g} min); plots: stepflash plot {args.out}")
    return {"before": before, "after": after, "checkpoint": h["checkpoint"], "steps": h["step"],
            "planned_steps": steps, "planned_step_s": step_s, "step_s": timing["step_s"], **speeds}


def main(argv: list[str] | None = None) -> int:
    from stepflash.cli import build_parser

    ns = build_parser("demo", DemoArgs).parse_args(sys.argv[1:] if argv is None else argv)
    try:
        demo(DemoArgs(**vars(ns)))
    except UserError as e:
        print(f"stepflash demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
