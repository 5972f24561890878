"""Threads: 1 vs torch's default for the verbs' real work, and whether stepflash.threads' probe picks the winner.

    python benchmarks/threads.py [--rounds 3] [--new-tokens 48] [--preset small]

Work measured, on the same random-init weights, thread counts interleaved round by round, best of rounds:
- generate: the engine decoding one sequence (32-token prompt), as `stepflash generate` does;
- eval: the engine decoding 8 sequences at once, as `stepflash eval` and RL rollouts do;
- train: one optimizer step (Muon + AdamW, MTP loss) on 8 x 256 tokens, the demo's batch;
- the `decode` and `train` probes of stepflash/threads.py.
Prints a markdown table and `uptime`: the right count depends on how busy the machine is, so run it
while the machine is in the state you care about.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stepflash.config import resolve_config  # noqa: E402
from stepflash.inference.engine import Engine  # noqa: E402
from stepflash.model import Step35ForCausalLM  # noqa: E402
from stepflash.threads import PROBES  # noqa: E402
from stepflash.training.objective import compute_loss  # noqa: E402
from stepflash.training.optimizer import build_optimizer  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def workloads(preset: str, new_tokens: int) -> dict:
    torch.manual_seed(0)
    cfg = resolve_config(preset)
    cfg.eos_token_id = []  # random weights: never stop early, every run decodes the same number of tokens
    model = Step35ForCausalLM(cfg)
    engine = Engine(model, max_batch_size=8)
    prompt = torch.randint(2, cfg.vocab_size, (32,)).tolist()
    train_model = Step35ForCausalLM(cfg).train()
    for m in train_model.moe_modules:
        m.record_routing = True  # the EP-group balance loss reads the routing
    opt = build_optimizer(train_model, "auto", 1e-3, 0.1)
    window = torch.randint(0, cfg.vocab_size, (8, 257))

    def train_step():
        compute_loss(train_model, window, moe_modules=train_model.moe_modules).total.backward()
        opt.step()
        opt.zero_grad()

    return {
        "generate (batch 1)": (lambda: engine.generate([prompt], new_tokens), new_tokens),
        "eval (batch 8)": (lambda: engine.generate([prompt] * 8, new_tokens), 8 * new_tokens),
        "train step (8x256)": (train_step, None),
        "probe: decode": (lambda: None, None),
        "probe: train": (lambda: None, None),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--preset", default="small")
    a = p.parse_args()
    counts = sorted({1, torch.get_num_threads()})
    work = workloads(a.preset, a.new_tokens)
    best = {(name, n): float("inf") for name in work for n in counts}
    for r in range(a.rounds):
        for n in counts if r % 2 == 0 else counts[::-1]:  # alternate the order: neither always goes first
            for name, (fn, _) in work.items():
                if name.startswith("probe: "):
                    dt = PROBES[name.split(": ")[1]](n)
                else:
                    torch.set_num_threads(n)
                    if r == 0:
                        fn()  # warm-up
                    dt = _timed(fn)
                best[name, n] = min(best[name, n], dt)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    print("| work | " + " | ".join(f"{n} thread{'s' if n > 1 else ''}" for n in counts)
          + " | faster | ratio |")
    print("|---|" + "---|" * len(counts) + "---|---|")
    for name, (_, tokens) in work.items():
        row = [best[name, n] for n in counts]
        cells = [f"{tokens / t:.1f} tok/s" if tokens else f"{t * 1e3:.0f} ms" for t in row]
        fast = counts[row.index(min(row))]
        print(f"| {name} | " + " | ".join(cells) + f" | {fast} | {max(row) / min(row):.2f}x |")
    print("\n" + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
