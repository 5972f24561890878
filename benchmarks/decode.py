"""Decode speed of the stepflash engine vs transformers' Step3p7TextModel, on the same weights.

    python benchmarks/decode.py [--config small] [--checkpoint DIR] [--new-tokens 48] [--threads 1]

Prints markdown tables:
1. decode tokens/s at batch 1 and 8 (greedy, equal-length prompts, prefill excluded) for stepflash and
   for transformers with its own DynamicCache in a manual loop, beside the memory-bandwidth bound
   (bytes of the weights a decode step must read / bandwidth measured with a large tensor copy);
2. MTP-3 self-speculative decoding vs plain decoding at batch 1, with acceptance per draft position
   (random weights accept almost nothing; pass --checkpoint to measure a trained model);
3. KV-cache bytes per sequence at 8k and 32k tokens: the release layout (S3F1) vs all layers full.
Rates are given by wall clock and per CPU-second of this process (see `Clock`); "oracle drafts"
replaces every draft by the true greedy token, i.e. the speed MTP reaches when every draft is accepted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stepflash.config import PRESETS, flash  # noqa: E402
from stepflash.inference.engine import Engine, SamplingParams  # noqa: E402
from stepflash.inference.kv_cache import cache_bytes  # noqa: E402
from stepflash.checkpoint.hf import release_to_hf  # noqa: E402
from stepflash.model import Step35ForCausalLM  # noqa: E402


class Clock:
    """Wall-clock and process-CPU seconds of a block. With one thread on a shared machine the CPU time
    is the fairer comparison: other processes stretch the wall clock, not the work done."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, tokens: int) -> tuple[float, float]:
        return tokens / self.wall, tokens / max(self.cpu, 1e-9)


def copy_bandwidth(n_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (read + write), best of `repeats`."""
    x = torch.empty(n_bytes // 4, dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def step_bytes(model: Step35ForCausalLM, batch: int) -> float:
    """Weight bytes one decode step reads: everything but embeddings and MTP layers (one embedding row per
    token), routed experts counted by the expected number touched by `batch` tokens under uniform routing."""
    cfg, total = model.config, 0.0
    e, k = cfg.moe_num_experts, cfg.moe_top_k
    touched = e * (1 - (1 - k / e) ** batch)
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) >= cfg.num_hidden_layers:
                continue
            if ".moe." in name and name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
                size *= touched / e
        elif "embed_tokens" in name:
            size = batch * p.shape[1] * p.element_size()
        total += size
    return total


@torch.inference_mode()
def gemv_floor(model: Step35ForCausalLM, steps: int = 30) -> tuple[float, float]:
    """(wall, CPU) tokens/s of the matrix-vector products alone of one batch-1 decode step: q/k/v/g as one
    product, o, dense MLP or shared expert + router, top-k experts, lm_head. Nothing else is computed,
    so no implementation of this model can decode faster on this machine with these kernels."""
    cfg, h = model.config, model.config.hidden_size
    x, gens = torch.randn(1, h), torch.Generator().manual_seed(0)
    mats = []
    for layer in model.model.layers[: cfg.num_hidden_layers]:
        a = layer.self_attn
        mats += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.g_proj.weight]), a.o_proj.weight]
        if layer.is_moe:
            s, m = layer.share_expert, layer.moe
            mats += [torch.cat([m.gate.weight, s.gate_proj.weight, s.up_proj.weight]), s.down_proj.weight]
            for e in torch.randperm(cfg.moe_num_experts, generator=gens)[: cfg.moe_top_k].tolist():
                mats += [m.gate_proj.weight[e], m.up_proj.weight[e], m.down_proj.weight[e]]
        else:
            mats += [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight]
    mats.append(model.lm_head.weight)
    inputs = [torch.randn(1, w.shape[1]) for w in mats]
    for _ in range(3):
        for w, v in zip(mats, inputs):
            torch.nn.functional.linear(v, w)
    with Clock() as clock:
        for _ in range(steps):
            for w, v in zip(mats, inputs):
                torch.nn.functional.linear(v, w)
    return clock.rates(steps)


def hf_twin(model: Step35ForCausalLM):
    from transformers.models.step3p7 import Step3p7TextConfig, Step3p7TextModel

    cfg = model.config
    hf_cfg = Step3p7TextConfig(**cfg.to_dict())
    hf = Step3p7TextModel(hf_cfg).eval()
    state = release_to_hf(model.state_dict(), cfg.num_hidden_layers)
    lm_head = state.pop("lm_head.weight")
    hf.load_state_dict(state)
    return hf, lm_head


@torch.inference_mode()
def hf_decode(hf, lm_head, prompts: torch.Tensor, new_tokens: int):
    """(wall tok/s, CPU tok/s) of greedy decode after the prefill, and the generated ids."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    out = hf(input_ids=prompts, past_key_values=cache, use_cache=True)
    nxt = (out.last_hidden_state[:, -1] @ lm_head.T).argmax(-1)
    tokens = [nxt]
    with Clock() as clock:
        for _ in range(new_tokens - 1):
            out = hf(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            nxt = (out.last_hidden_state[:, -1] @ lm_head.T).argmax(-1)
            tokens.append(nxt)
    return clock.rates(prompts.shape[0] * (new_tokens - 1)), torch.stack(tokens, 1).tolist()


@torch.inference_mode()
def ours_decode(engine: Engine, prompts: list[list[int]], new_tokens: int, mtp: int = 0):
    """(wall tok/s, CPU tok/s) after the prefill step, the generated ids and the requests' stats."""
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=new_tokens, speculative_tokens=mtp)) for p in prompts]
    reqs = [engine.scheduler.requests[r] for r in rids]
    first = engine.step()  # prefill: the first token of every request (and its first drafts)
    with Clock() as clock:
        while engine.has_unfinished():
            engine.step()
    decoded = sum(len(r.output) for r in reqs) - len(first)
    return clock.rates(decoded), [r.output for r in reqs], [r.stats() for r in reqs]


def oracle(prompt: list[int], continuation: list[int]):
    """A draft hook that replaces every draft by the true greedy token: the speed if all were accepted."""
    full = list(prompt) + list(continuation)
    return lambda row, j, drafted: full[row.n + 1 + j] if row.n + 1 + j < len(full) else drafted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small", choices=sorted(PRESETS))
    ap.add_argument("--checkpoint", default=None, help="use a trained checkpoint instead of random weights")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both implementations")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        from stepflash.checkpoint import load_model

        model = load_model(args.checkpoint, dtype=torch.float32)
    else:
        model = Step35ForCausalLM(PRESETS[args.config]())
    model.eval()
    cfg = model.config
    cfg.eos_token_id = []  # every run decodes exactly --new-tokens
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.checkpoint or args.config} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.moe_num_experts} experts top-{cfg.moe_top_k}, vocab {cfg.vocab_size}, window {cfg.sliding_window}; "
          f"{n_params / 1e6:.1f}M parameters incl. {cfg.num_nextn_predict_layers} MTP layers), fp32, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s\n")

    g = torch.Generator().manual_seed(0)
    engine = Engine(model, max_batch_size=8)
    hf = lm_head = None
    if not args.skip_hf:
        hf, lm_head = hf_twin(model)
    fw, fc = gemv_floor(model)
    print(f"batch-1 floor, the step's matrix-vector products alone: {fw:.1f} / {fc:.1f} tok/s (wall / CPU)\n")
    print("| batch | stepflash tok/s (wall / CPU) | transformers tok/s (wall / CPU) | speedup (CPU) | "
          "bandwidth bound tok/s | same tokens |")
    print("|---|---|---|---|---|---|")
    for batch in (1, 8):
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=g)
        ours_decode(engine, prompts.tolist(), 4)  # warm-up
        (ow, oc), ours_ids, _ = ours_decode(engine, prompts.tolist(), args.new_tokens)
        bound = bw * batch / step_bytes(model, batch)
        if hf is not None:
            hf_decode(hf, lm_head, prompts, 4)
            (hw, hc), hf_ids = hf_decode(hf, lm_head, prompts, args.new_tokens)
            same = sum(a == b for a, b in zip(ours_ids, hf_ids))
            print(f"| {batch} | {ow:.1f} / {oc:.1f} | {hw:.1f} / {hc:.1f} | {oc / hc:.1f}x | {bound:.0f} | {same}/{batch} |")
        else:
            print(f"| {batch} | {ow:.1f} / {oc:.1f} | - | - | {bound:.0f} | - |")

    print("\n| batch 1 | decode tok/s (wall / CPU) | vs plain (CPU) | mean accepted drafts / step | "
          "acceptance per draft position | same tokens |")
    print("|---|---|---|---|---|---|")
    prompts = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).tolist()
    (bw_, bc), base_ids, _ = ours_decode(engine, prompts, args.new_tokens)
    print(f"| plain | {bw_:.1f} / {bc:.1f} | 1.00x | - | - | - |")
    runs = [(f"--mtp {k}", k, None) for k in range(1, cfg.num_nextn_predict_layers + 1)]
    runs.append((f"--mtp {cfg.num_nextn_predict_layers}, oracle drafts", cfg.num_nextn_predict_layers,
                 oracle(prompts[0], base_ids[0])))
    for label, k, hook in runs:
        engine.drafter.draft_hook = hook
        ours_decode(engine, prompts, 4, mtp=k)
        (rw, rc), ids, stats = ours_decode(engine, prompts, args.new_tokens, mtp=k)
        acc = ", ".join(f"{a:.2f}" for a in stats[0]["acceptance_per_position"])
        print(f"| {label} | {rw:.1f} / {rc:.1f} | {rc / bc:.2f}x | {stats[0]['mean_accepted']:.2f} | {acc} | "
              f"{'yes' if ids == base_ids else 'no'} |")
    engine.drafter.draft_hook = None

    print("\n| KV cache per sequence (bf16, release config) | 8k tokens | 32k tokens |")
    print("|---|---|---|")
    rel = flash()
    L = rel.num_hidden_layers
    for label, types_ in (("S3F1 (12 full + 33 sliding, window 512)", None), ("all 45 layers full", ["full_attention"] * L)):
        sizes = [cache_bytes(rel, n, layer_types=types_, mtp=False) / 2**30 for n in (8192, 32768)]
        print(f"| {label} | {sizes[0]:.2f} GiB | {sizes[1]:.2f} GiB |")
    ratio = [cache_bytes(rel, n, layer_types=["full_attention"] * L, mtp=False) / cache_bytes(rel, n, mtp=False)
             for n in (8192, 32768)]
    print(f"| all-full / S3F1 | {ratio[0]:.2f}x | {ratio[1]:.2f}x |")


if __name__ == "__main__":
    main()
