"""Grouped MoE (sort by expert + torch._grouped_mm) vs a naive loop over every expert with masks.

Same weights, same tokens, one machine, one run. The naive path is the common reference pattern: for each
expert, find its tokens with a mask, run the expert, scatter back. Usage:
    python benchmarks/moe.py [--tokens 8 512] [--hidden 256] [--repeats 20]
"""

import argparse
import time

import torch

from stepflash.config import tiny
from stepflash.model.moe import MoE, swiglu


def naive_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    _, w, idx = moe.route(x)
    out = torch.zeros_like(x)
    for e in range(moe.num_experts):  # every expert, hit or not
        mask = idx == e  # [N, k]
        tok, slot = torch.where(mask)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = swiglu(xe @ moe.gate_proj.weight[e].T, xe @ moe.up_proj.weight[e].T, moe.limit)
        out.index_add_(0, tok, (h @ moe.down_proj.weight[e].T) * w[tok, slot, None])
    return out


def bench(fn, repeats):
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 512])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--moe-inter", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, hidden {a.hidden}, moe_inter {a.moe_inter}, fp32 CPU")
    print(f"| experts | top-k | tokens | grouped (ms) | naive loop (ms) | speedup | max abs diff |")
    print(f"|---|---|---|---|---|---|---|")
    for experts, top_k in ((8, 2), (64, 8), (288, 8)):
        cfg = tiny().replace(hidden_size=a.hidden, moe_num_experts=experts, moe_top_k=top_k,
                             moe_intermediate_size=a.moe_inter)
        moe = MoE(cfg, 1)
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(0, 0.05)
        for n in a.tokens:
            x = torch.randn(n, a.hidden)
            with torch.inference_mode():
                diff = (moe(x) - naive_loop(moe, x)).abs().max().item()
                tg = bench(lambda: moe(x), a.repeats)
                tn = bench(lambda: naive_loop(moe, x), a.repeats)
            print(f"| {experts} | {top_k} | {n} | {tg:.2f} | {tn:.2f} | {tn / tg:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
