"""`python -m stepflash.demo`: the whole pipeline on one CPU in about eight minutes.

1. prepare the built-in corpus (the Python standard library's sources: no download), tokenized with a
   byte-level BPE trained to the `small` preset's vocabulary; cached in ~/.cache/stepflash after the
   first run;
2. measure the validation loss of the freshly initialised `small` model (every feature of the release:
   hybrid sliding/full attention, sigmoid-routed MoE with a shared expert, 3 MTP modules);
3. pre-train it for the remaining time budget (Muon + AdamW, MTP loss, loss-free router bias, EP-group
   balance loss, stability monitors in RUN_DIR/metrics.jsonl), the step count chosen from a short
   throughput measurement so the cosine schedule ends when the budget does;
4. report the validation loss after training, and where the checkpoint + tokenizer were saved;
5. generate code from a prompt with MTP self-speculative decoding (`speculative_tokens=3`): greedy, checked
   against plain greedy decoding (they must agree), and sampled, printed with the MTP acceptance.
"""

from __future__ import annotations

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
    prompt: str = field(default="import os\n\n\ndef main():\n", metadata={"help": "code prompt for the generation at the end"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    temperature: float = field(default=0.8, metadata={"help": "temperature of the sampled generation"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    device: str = field(default="cpu", metadata={"help": "cpu (the demo's target) or cuda"})


RESERVE_S = 45.0  # final validation, checkpoint, generation


def _measure_step_s(args: DemoArgs, train_args, steps: int = 1) -> float:
    """Seconds per optimizer step of this model and batch shape, after one warm-up step.

    Also picks the torch thread count: on a CPU shared with other jobs, intra-op threads that wait on
    each other can make a step many times slower than one thread, so the faster of torch's default and
    one thread is kept (the choice stays set for the training that follows)."""
    from stepflash.training.loop import build_model
    from stepflash.training.objective import compute_loss
    from stepflash.training.optimizer import build_optimizer

    device = torch.device(args.device)
    model = build_model(train_args, device)
    for m in model.moe_modules:
        m.record_routing = True
    opt = build_optimizer(model, train_args.optimizer, train_args.lr, train_args.weight_decay)
    window = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    best = (float("inf"), torch.get_num_threads())
    # One thread first: under contention it is the fast one, and it bounds how long the other may take.
    for threads in dict.fromkeys([1, torch.get_num_threads()]) if device.type == "cpu" else [best[1]]:
        torch.set_num_threads(threads)
        times = []
        for _ in range(steps + 1):
            t = time.time()
            compute_loss(model, window, ep_groups=train_args.ep_groups, moe_modules=model.moe_modules).total.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.time() - t)
            if times[-1] > (1.5 if len(times) > 1 else 3.0) * best[0]:  # the first step also warms up
                break  # clearly slower: stop paying for the measurement
        if len(times) > 1:
            best = min(best, (min(times[1:]), threads))
    torch.set_num_threads(best[1])
    return best[0]


def _generate(ckpt_path: str, prompt: str, max_new_tokens: int, temperature: float) -> None:
    """Greedy: speculative must equal plain decoding. Sampled: the text shown, with MTP acceptance."""
    from stepflash import load_model
    from stepflash.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt_path)
    model = load_model(ckpt_path, dtype=torch.float32)
    ids = tok.encode(prompt).ids
    try:
        from stepflash.inference.engine import Engine
    except ImportError as e:  # the engine is a separate part of the package
        print(f"(generation skipped: the inference engine is not available: {e})")
        return
    engine = Engine(model, max_batch_size=1)
    t = time.time()
    plain = engine.generate([ids], max_new_tokens, temperature=0.0)[0]
    t_plain = time.time() - t
    t = time.time()
    spec = engine.generate([ids], max_new_tokens, temperature=0.0, speculative_tokens=3)[0]
    t_spec = time.time() - t
    print(f"greedy: speculative == plain decoding: {spec.token_ids == plain.token_ids}; "
          f"accepted drafts per step {spec.stats.get('mean_accepted', 0.0):.2f}; "
          f"{len(spec.token_ids) / max(t_spec, 1e-9):.1f} tok/s vs plain {len(plain.token_ids) / max(t_plain, 1e-9):.1f} tok/s")
    sampled = engine.generate([ids], max_new_tokens, temperature=temperature, top_p=0.95, seed=0,
                              speculative_tokens=3)[0]
    per_pos = ", ".join(f"{a:.2f}" for a in sampled.stats.get("acceptance_per_position", []))
    print(f"\n--- sampled (temperature {temperature}, top-p 0.95, MTP speculative decoding with 3 drafts) ---")
    print(prompt + tok.decode(sampled.token_ids))
    print(f"--- accepted drafts per step {sampled.stats.get('mean_accepted', 0.0):.2f} "
          f"(acceptance by draft position: {per_pos})")


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
    before = evaluate(build_model(train_args, device), val, device)
    left = budget - (time.time() - t0) - RESERVE_S
    if left < 5 * step_s:
        raise UserError(f"--minutes {args.minutes} leaves {max(left, 0):.0f} s for training after preparation; "
                        f"one step takes {step_s:.1f} s here: raise --minutes")
    train_args.steps = max(10, int(left / step_s * 0.9))
    train_args.warmup_steps = min(10, train_args.steps // 5)
    train_args.time_limit_s = left
    print(f"[3/5] training {args.preset} for ~{left / 60:.1f} min: {train_args.steps} steps of "
          f"{args.batch_size}x{args.seq_len} tokens ({step_s:.1f} s/step measured, {torch.get_num_threads()} threads)")
    h = train(train_args)

    after = h["val"][-1]
    print(f"[4/5] validation loss {before['val_loss']:.3f} -> {after['val_loss']:.3f} after {h['step']} steps "
          f"(MTP module 0: {before.get('val_mtp_loss_0', float('nan')):.3f} -> "
          f"{after.get('val_mtp_loss_0', float('nan')):.3f}); checkpoint + tokenizer in {h['checkpoint']}")
    print(f"[5/5] generating from {args.prompt!r}")
    _generate(h["checkpoint"], args.prompt, args.max_new_tokens, args.temperature)
    print(f"done in {(time.time() - t0) / 60:.1f} min; plots: stepflash plot {args.out}")
    return {"before": before, "after": after, "checkpoint": h["checkpoint"], "steps": h["step"]}


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
