"""Attention-layout ablation (the report's Table 1) at CPU scale: FFFF, S1F1, S3F1, S3F1 + more sliding heads.

Each layout is the same small MoE model (`ablation_config`) with a different full/sliding pattern,
trained from the same initial seed on the same token stream for the same number of tokens with
`stepflash.training.loop.train` (MTP off: the ablation is about the trunk). Reported per layout:
final validation loss, measured training tokens/s, and decode / prefill FLOPs per token at context
4096 relative to S3F1, computed with `stepflash.accounting.flops_per_token` (2 FLOPs per weight a token
touches + attention score/value products over the keys it sees) for this model and for the release's
shape; the report's Table 1 (30B-A3B) is printed next to them.

    python benchmarks/layout_ablation.py [--steps 60] [--batch-size 8] [--seq-len 256]

Writes benchmarks/layout_ablation.png (validation loss vs tokens) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from stepflash.accounting import REPORT_TABLE1, flops_per_token, layout_variants
from stepflash.config import flash, make_config
from stepflash.training.loop import TrainArgs, default_data_dir, train

REPORT_PRETRAIN_AVG = {"FFFF": 54.1, "S1F1": 54.6, "S3F1": 53.6, "S3F1+heads": 55.7}
CONTEXT = 4096


def ablation_config(vocab: int, window: int):
    """8 layers, hidden 128, 16 experts top-2; 4 heads on full layers, 6 on sliding ones (the '+heads' variant)."""
    return make_config(8, 128, full_heads=4, sliding_heads=6, kv_heads=2, head_dim=32, window=window, vocab=vocab,
                       inter=384, experts=16, top_k=2, moe_inter=64, dense_layers=1, mtp=0, max_pos=4096,
                       rope_original=1024)


def flops_ratios(cfg) -> dict[str, tuple[float, float]]:
    f = {name: flops_per_token(v, CONTEXT) for name, v in layout_variants(cfg).items()}
    base = f["S3F1"]
    return {n: (v["decode_flops"] / base["decode_flops"], v["prefill_flops"] / base["prefill_flops"]) for n, v in f.items()}


def run_layout(name, cfg, data, args, workdir) -> dict:
    cfg_path = os.path.join(workdir, f"{name}.json")
    cfg.save_json(cfg_path)
    targs = TrainArgs(preset=cfg_path, data=data, out=os.path.join(workdir, name), steps=args.steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup_steps=max(1, args.steps // 10),
                      mtp_weight=0.0, eval_every=args.eval_every, val_batches=args.val_batches, log_every=args.eval_every,
                      save_every=10**9, keep_checkpoints=1, seed=0, progress=False, device="cpu")
    t = time.time()
    h = train(targs)
    wall = time.time() - t
    with open(os.path.join(workdir, name, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    tokens_per_step = args.batch_size * args.seq_len
    return {"val": [(v["step"] * tokens_per_step, v["val_loss"]) for v in h["val"]], "final_val": h["val"][-1]["val_loss"],
            "tokens_per_s": sorted(tps)[len(tps) // 2], "wall_s": wall}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        xs, ys = zip(*r["val"])
        ax.plot(xs, ys, marker="o", ms=3, label=f"{name} ({r['final_val']:.3f})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("attention layout ablation (same model, data, tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--window", type=int, default=64, help="sliding window of the ablation model")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192, help="vocab of the built-in corpus tokenizer")
    ap.add_argument("--data", default=None, help="prepared data dir (default: the cached built-in corpus)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "layout_ablation.png"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or default_data_dir(args.vocab)
    base = ablation_config(args.vocab, args.window)
    ours, release = flops_ratios(base), flops_ratios(flash())
    workdir = tempfile.mkdtemp(prefix="layout_ablation_")
    results = {}
    try:
        for name, cfg in layout_variants(base).items():
            print(f"training {name} ...", file=sys.stderr, flush=True)
            results[name] = run_layout(name, cfg, data, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    plot(results, args.plot)

    tokens = args.steps * args.batch_size * args.seq_len
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {tokens:,} training tokens per layout "
          f"({args.steps} steps of {args.batch_size}x{args.seq_len}); window {args.window}; FLOPs at context {CONTEXT}")
    print()
    print("| layout | val loss | train tok/s | decode / S3F1 (this model) | prefill / S3F1 (this model) "
          "| decode / prefill (release shape) | report Table 1 decode / prefill | report pre-train avg |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rep = REPORT_TABLE1[name]
        print(f"| {name} | {r['final_val']:.3f} | {r['tokens_per_s']:,.0f} | {ours[name][0]:.2f} | {ours[name][1]:.2f} "
              f"| {release[name][0]:.2f} / {release[name][1]:.2f} | {rep[0]:.2f} / {rep[1]:.2f} | {REPORT_PRETRAIN_AVG[name]} |")
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
