"""Training throughput on this machine: tokens/s and model FLOPs utilisation (MFU) of one optimizer step.

One step is what `stepflash train` (and the demo) does: the objective (next token + MTP + balance loss)
forward and backward, clipping, the Muon + AdamW step. Same weights and tokens for every variant:
- eager, grouped MoE (torch._grouped_mm), 1 and 2 torch threads;
- eager, per-expert loop (the model's own fallback: one matmul per expert that received tokens), 1 thread;
- torch.compile of each layer's dense parts (attention, dense MLP / shared expert), MoE eager, 1 thread;
  the compile time is reported apart (compiling whole layers fails on CPU in fp32: the fake kernel of
  torch._grouped_mm accepts only bf16, FINDINGS.md);
- 2 processes (torchrun-style, gloo, FSDP2 + Muon on the shards, 1 thread each) on the same global batch.
Single-process variants are interleaved, one step each per round, best of the rounds after a warm-up step;
the 2-process run follows them (its own warm-up). MFU = model FLOPs/s over the measured fp32 matmul peak of
this machine at the same thread count (model FLOPs: 3 x forward, the forward being the trunk + head at this
sequence length, `accounting.flops_per_token`, plus the MTP modules' matmuls).

    python benchmarks/train.py [--preset small] [--batch-size 8] [--seq-len 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp

import stepflash.model.moe as moe_module
from stepflash.accounting import flops_per_token, param_counts
from stepflash.config import resolve_config
from stepflash.model import Step35ForCausalLM
from stepflash.training.objective import compute_loss
from stepflash.training.optimizer import build_optimizer


def matmul_peak(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n x n matmul at this thread count."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def train_flops_per_token(cfg, seq_len: int) -> float:
    """Model FLOPs of one training token: 3 x (trunk + head forward at seq_len + the MTP modules' matmuls)."""
    mtp = 2 * param_counts(cfg)["mtp_params_per_module"] * cfg.num_nextn_predict_layers
    return 3 * (flops_per_token(cfg, seq_len)["prefill_flops"] + mtp)


@contextlib.contextmanager
def per_expert_loop(enabled: bool):
    """Route the MoE through its per-expert matmul fallback instead of torch._grouped_mm."""
    saved = getattr(moe_module, "_grouped_mm_ok", None)
    if enabled and saved is not None:
        moe_module._grouped_mm_ok = lambda x: False
    try:
        yield
    finally:
        if saved is not None:
            moe_module._grouped_mm_ok = saved


def build(preset: str, compile_dense: bool = False):
    torch.manual_seed(0)
    model = Step35ForCausalLM(resolve_config(preset).replace(torch_dtype="float32"))
    for m in model.moe_modules:
        m.record_routing = True
    if compile_dense:
        for layer in model.model.layers:
            layer.self_attn.compile()
            (layer.share_expert if layer.is_moe else layer.mlp).compile()
    return model, build_optimizer(model, "muon", 2e-3, 0.1)


def one_step(model, opt, window) -> float:
    t = time.perf_counter()
    compute_loss(model, window, ep_groups=4, moe_modules=model.moe_modules).total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t


# ---- 2 processes ------------------------------------------------------------------------------------

def _rank(rank: int, world: int, port: int, args, out: str) -> None:
    from stepflash.distributed.launch import torchrun_session

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with torchrun_session(backend="gloo") as rt:
        model, _ = build(args.preset)
        model = rt.parallelize(model)
        opt = build_optimizer(model, "muon", 2e-3, 0.1)
        g = torch.Generator().manual_seed(0)
        window = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
        per = args.batch_size // world
        mine = window[rank * per:(rank + 1) * per]
        times = []
        for _ in range(args.rounds + 1):
            rt.barrier()
            times.append(one_step(model, opt, mine))
        times = rt.all_gather(torch.tensor(times[1:]))  # a step lasts until the slowest rank is done
        if rank == 0:
            torch.save(times.view(world, -1).max(0).values.tolist(), out)


def two_processes(args) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "times.pt")
    mp.spawn(_rank, args=(2, port, args, out), nprocs=2, join=True)
    return torch.load(out)


# ---- the table ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-two-processes", action="store_true")
    args = ap.parse_args()
    cfg = resolve_config(args.preset)
    tokens = args.batch_size * args.seq_len
    flops = train_flops_per_token(cfg, args.seq_len)
    peak = {t: matmul_peak(t) for t in (1, 2)}
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
    # name -> (threads, per-expert loop, model, optimizer)
    variants = {"eager, grouped MoE": (1, False, *build(args.preset)),
                "eager, grouped MoE, 2 threads": (2, False, *build(args.preset)),
                "eager, per-expert loop": (1, True, *build(args.preset))}
    compile_s = None
    if not args.skip_compile:
        model, opt = build(args.preset, compile_dense=True)
        torch.set_num_threads(1)
        compile_s = one_step(model, opt, window)  # the first step compiles
        variants["torch.compile (dense parts), grouped MoE"] = (1, False, model, opt)
    times = {name: [] for name in variants}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (threads, loop, model, opt) in variants.items():
            torch.set_num_threads(threads)
            with per_expert_loop(loop):
                dt = one_step(model, opt, window)
            if r:
                times[name].append(dt)
    rows = [(name, variants[name][0], 1, min(t)) for name, t in times.items()]
    if not args.skip_two_processes:
        del variants
        rows.append(("2 processes (FSDP2 + Muon on shards), grouped MoE", 1, 2, min(two_processes(args))))
    load = os.getloadavg()
    print(f"{args.preset} preset ({param_counts(cfg)['total_params'] / 1e6:.1f}M parameters), batch {args.batch_size} x "
          f"{args.seq_len} tokens, fp32, torch {torch.__version__}, {os.cpu_count()} CPUs; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; measured fp32 matmul peak {peak[1]:.1f} GFLOP/s (1 thread), "
          f"{peak[2]:.1f} (2 threads); {flops / 1e6:.1f} MFLOP per training token")
    if compile_s is not None:
        print(f"compile time (first step of the compiled variant): {compile_s:.0f} s")
    base = rows[0][3]
    print("| variant | threads | processes | s/step (best of %d) | tokens/s | MFU | speed vs eager grouped, 1 thread |"
          % args.rounds)
    print("|---|---|---|---|---|---|---|")
    for name, threads, procs, s in rows:
        used = threads * procs
        print(f"| {name} | {threads} | {procs} | {s:.2f} | {tokens / s:,.0f} | {tokens / s * flops / (peak[used] * 1e9):.1%} "
              f"| {base / s:.2f}x |")
    print(f"fastest for one process: {min(rows[:-1] if not args.skip_two_processes else rows, key=lambda r: r[3])[0]}")


if __name__ == "__main__":
    main()
