"""GPU decode speed vs the HBM roofline, and a training step, for `benchmarks/gpu_check.sh`.

    python benchmarks/gpu_bench.py decode --config small --batches 1 8 64 [--new-tokens 64]
    python benchmarks/gpu_bench.py train --config small [--batch 8 --seq 512]

decode: greedy decode tok/s after the prefill, eager and compiled (CUDA graphs), bf16, one engine per
batch size; the roofline is HBM bandwidth x batch / bytes one step reads (all weights but the MTP
layers and the unused embedding rows, routed experts counted by the expected number a batch touches
under uniform routing, plus the KV cache). Bandwidth: measured with a large device copy, and the
device's nominal figure when known. Rows print as they finish, so a timeout keeps what was measured.
train: seconds per optimizer step (AdamW, bf16 autocast, next-token + MTP loss) and tokens/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode import ours_decode  # noqa: E402
from stepflash.config import PRESETS, make_config  # noqa: E402
from stepflash.inference.engine import Engine  # noqa: E402
from stepflash.model import Step35ForCausalLM  # noqa: E402

NOMINAL_TB_S = {"H100 SXM": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H200": 4.8, "A100": 2.0}


def one_b():
    """~1.05B parameters (3 MTP layers included): 16 layers, hidden 1024, 32 experts top-4, vocab 32000."""
    return make_config(16, 1024, full_heads=16, sliding_heads=24, kv_heads=4, head_dim=64, window=512, vocab=32000,
                       inter=4096, experts=32, top_k=4, moe_inter=512, dense_layers=1, max_pos=4096,
                       rope_original=1024)


CONFIGS = {**PRESETS, "1b": one_b}


def bandwidth() -> tuple[float, float | None]:
    """(measured copy bandwidth, nominal) in bytes/s."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    measured = 2 * x.numel() * 10 / (time.perf_counter() - t)
    name = torch.cuda.get_device_name()
    nominal = next((v for k, v in NOMINAL_TB_S.items() if all(w in name for w in k.split())), None)
    return measured, nominal * 1e12 if nominal else None


def step_bytes(model: Step35ForCausalLM, batch: int, context: int) -> float:
    """Bytes a decode step of `batch` rows reads (module docstring)."""
    cfg, total = model.config, 0.0
    e, k = cfg.moe_num_experts, cfg.moe_top_k
    touched = e * (1 - (1 - k / e) ** batch)
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= cfg.num_hidden_layers:
            continue
        if ".moe." in name and name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
            size *= touched / e
        elif "embed_tokens" in name:
            size = batch * p.shape[1] * p.element_size()
        total += size
    kv = sum(2 * cfg.num_kv_heads(i) * cfg.head_dim_of(i) * min(context, cfg.sliding_window if cfg.is_sliding(i)
                                                               else context) for i in range(cfg.num_hidden_layers))
    return total + batch * kv * 2


def decode(args) -> None:
    torch.manual_seed(0)
    model = Step35ForCausalLM(CONFIGS[args.config]()).to("cuda", torch.bfloat16).eval()
    model.config.eos_token_id = []
    measured, nominal = bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {measured / 1e12:.2f} TB/s"
          + (f", nominal {nominal / 1e12:.2f} TB/s" if nominal else "") + f"; config {args.config} "
          f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters), bf16", flush=True)
    print("| config | batch | eager tok/s | compiled tok/s | roofline tok/s (measured bw) | compiled / roofline | "
          "compile s | same tokens |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    g = torch.Generator().manual_seed(0)
    for batch in args.batches:
        prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        rates, ids = {}, {}
        for name, compile in (("eager", False), ("compiled", True)):
            engine = Engine(model, max_batch_size=batch, compile=compile)
            t = time.perf_counter()
            ours_decode(engine, prompts, 4)  # warm-up, and the compilation
            warm = time.perf_counter() - t
            (wall, _), ids[name], _ = ours_decode(engine, prompts, args.new_tokens)
            rates[name] = wall
            if compile:
                note = engine.compile_note or f"{warm:.0f}"
        roof = measured * batch / step_bytes(model, batch, args.prompt_len + args.new_tokens)
        print(f"| {args.config} | {batch} | {rates['eager']:.0f} | {rates['compiled']:.0f} | {roof:.0f} | "
              f"{rates['compiled'] / roof:.2f} | {note} | {'yes' if ids['eager'] == ids['compiled'] else 'no'} |",
              flush=True)


def train(args) -> None:
    torch.manual_seed(0)
    model = Step35ForCausalLM(CONFIGS[args.config]()).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model.trunk(ids[:, :-1])
            logits = model.head(h)
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            mtp = model.mtp_logits(ids[:, :-1], h, depth=1)
            loss = loss + 0.3 * F.cross_entropy(mtp[0].float().flatten(0, 1), ids[:, 2:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t, n = time.perf_counter(), 10
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t) / n
    print(f"| train {args.config} | batch {args.batch} x {args.seq} | {sec * 1e3:.0f} ms / step | "
          f"{args.batch * args.seq / sec:.0f} tok/s | peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB |",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("decode", "train"))
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch")
    decode(args) if args.what == "decode" else train(args)


if __name__ == "__main__":
    main()
