"""Decode speed of the stepflash engine (eager and compiled) vs transformers' Step3p7TextModel, same weights.

    python benchmarks/decode.py [--config small | --checkpoint DIR [--prompts JSONL]] [--threads 1 2]
                                [--batches 1 8] [--new-tokens 64] [--prompt-len 32] [--repeats 3] [--skip-hf]
                                [--skip-llamacpp] [--no-mtp] [--no-speed]

Prints markdown tables:
1. decode tokens/s after the prefill (greedy, equal-length prompts) at each thread count and batch size for
   the engine eager, the engine compiled (`Engine(compile=True)`), transformers with its own DynamicCache
   in a manual loop, and llama.cpp (batch 1) on f32 and f16 GGUF exports of the same weights
   (`stepflash convert`, `benchmarks/llamacpp_decode.py`; a random --config is first saved as a
   checkpoint with a tokenizer; without llama-cpp-python the columns say "-"). Each cell is the best of
   --repeats runs, the implementations interleaved; rates per wall second and per CPU-second of this
   process (`Clock`; llama.cpp's threads run in this process too);
2. MTP self-speculative decoding vs plain decoding at batch 1 on the compiled engine, drafting K tokens
   every step ("fixed") and as many as the engine's draft policy finds worth it ("adaptive"), with
   acceptance per draft position (random weights accept nothing: pass --checkpoint for a trained model);
   "oracle drafts" replaces every draft by the true greedy token (the speed when all are accepted); then
   the step costs the policy measured (whole step cycles, and the verify and draft parts);
3. KV-cache bytes per sequence at 8k and 32k tokens: the release layout (S3F1) vs all layers full.
The load average is printed beside the tables: on a shared machine, compare ratios, not absolute rates.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stepflash.checkpoint import load_model  # noqa: E402
from stepflash.checkpoint.hf import release_to_hf  # noqa: E402
from stepflash.config import PRESETS, flash  # noqa: E402
from stepflash.inference.engine import Engine, SamplingParams  # noqa: E402
from stepflash.inference.kv_cache import cache_bytes  # noqa: E402
from stepflash.model import Step35ForCausalLM  # noqa: E402
from llamacpp_decode import export_ggufs, llamacpp_decode_tok_s, llamacpp_missing, make_checkpoint  # noqa: E402


class Clock:
    """Wall-clock and process-CPU seconds of a block. On a shared machine the CPU time is the fairer
    comparison: other processes stretch the wall clock, not the work done."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, tokens: int) -> tuple[float, float]:
        return tokens / self.wall, tokens / max(self.cpu, 1e-9)


def hf_twin(model: Step35ForCausalLM):
    from transformers.models.step3p7 import Step3p7TextConfig, Step3p7TextModel

    cfg = model.config
    hf = Step3p7TextModel(Step3p7TextConfig(**cfg.to_dict())).eval()
    state = release_to_hf(model.state_dict(), cfg.num_hidden_layers)
    lm_head = state.pop("lm_head.weight")
    hf.load_state_dict(state)
    return hf, lm_head


@torch.inference_mode()
def hf_decode(hf, lm_head, prompts: torch.Tensor, new_tokens: int):
    """((wall, CPU) tok/s of greedy decode after the prefill, generated ids)."""
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
    """((wall, CPU) tok/s after the prefill step, generated ids, the requests' stats)."""
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=new_tokens, speculative_tokens=mtp)) for p in prompts]
    reqs = [engine.scheduler.requests[r] for r in rids]
    first = engine.step()  # prefill: the first token of every request (and its first drafts)
    with Clock() as clock:
        while engine.has_unfinished():
            engine.step()
    decoded = sum(len(r.output) for r in reqs) - len(first)
    return clock.rates(decoded), [r.output for r in reqs], [r.stats() for r in reqs]


def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return max(r[0] for r in runs), max(r[1] for r in runs)


def oracle(prompt: list[int], continuation: list[int]):
    """A draft hook that replaces every draft by the true greedy token: the speed if all were accepted."""
    full = list(prompt) + list(continuation)
    return lambda row, j, drafted: full[row.n + 1 + j] if row.n + 1 + j < len(full) else drafted


def fmt(rate) -> str:
    return "-" if rate is None else f"{rate[0]:.1f} / {rate[1]:.1f}"


def speed_table(args, model, engines: dict, hf, ggufs: dict) -> None:
    """ggufs: {"f32": path, "f16": path} of the same weights for llama.cpp (batch 1), or {}."""
    cfg, g = model.config, torch.Generator().manual_seed(0)
    print("| threads | batch | stepflash eager | stepflash compiled | transformers | llama.cpp f32 | llama.cpp f16 | "
          "compiled / eager | compiled / transformers | compiled / llama.cpp f32 | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        for batch in args.batches:
            torch.set_num_threads(threads)
            prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=g)
            runs = {name: [] for name in [*engines, "hf", *(ggufs if batch == 1 else ())]}
            ids: dict[str, list] = {}
            for name, engine in engines.items():
                ours_decode(engine, prompts.tolist(), 4)  # warm-up (compiles this batch bucket once)
            for path in ggufs.values() if batch == 1 else ():
                llamacpp_decode_tok_s(path, prompts[0].tolist(), 4, threads)  # warm-up: load, thread pool
            for _ in range(args.repeats):  # interleaved: a burst of load hits every column alike
                for name, engine in engines.items():
                    rate, ids[name], _ = ours_decode(engine, prompts.tolist(), args.new_tokens)
                    runs[name].append(rate)
                if hf is not None:
                    rate, ids["hf"] = hf_decode(*hf, prompts, args.new_tokens)
                    runs["hf"].append(rate)
                for dtype, path in ggufs.items() if batch == 1 else ():
                    time.sleep(0.2)  # let torch's OpenMP threads stop spinning before llama.cpp's start
                    ids[dtype] = []
                    runs[dtype].append(llamacpp_decode_tok_s(path, prompts[0].tolist(), args.new_tokens, threads,
                                                             ids[dtype]))
                    time.sleep(0.2)
            rate = {name: best(r) if r else None for name, r in runs.items()}
            comp = rate["compiled"]
            same = [ids["compiled"] == ids["eager"]] + ([ids["compiled"] == ids["hf"]] if rate["hf"] else [])
            f32 = ""
            if rate.get("f32"):
                f32 = f"{sum(a == b for a, b in zip(ids['f32'], ids['compiled'][0]))}/{args.new_tokens}"
            print(f"| {threads} | {batch} | {fmt(rate['eager'])} | {fmt(comp)} | {fmt(rate['hf'])} | "
                  f"{fmt(rate.get('f32'))} | {fmt(rate.get('f16'))} | {ratio(comp, rate['eager'])} | "
                  f"{ratio(comp, rate['hf'])} | {ratio(comp, rate.get('f32'))} | {'yes' if all(same) else 'NO'}"
                  f"{f' (llama.cpp f32: {f32})' if f32 else ''} |")


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def ratio(a, b) -> str:
    """a / b of (wall, CPU) rates, as 'wall / CPU'."""
    return "-" if a is None or b is None else f"{a[0] / b[0]:.2f}x / {a[1] / b[1]:.2f}x"


def chat_prompts(path: str, checkpoint: str, n: int) -> list[list[int]]:
    """The first n lines of a JSONL of {"prompt_ids": [...]}, or {"messages": [...]} / {"problem": ...}
    rendered with the checkpoint's chat template and tokenizer, generation prompt on."""
    import json

    from stepflash.chat import ChatTemplate
    from stepflash.tokenizer import load_tokenizer

    tok, template = load_tokenizer(checkpoint), ChatTemplate.from_checkpoint(checkpoint)
    out = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "prompt_ids" in row:
                out.append(row["prompt_ids"])
                if len(out) == n:
                    break
                continue
            messages = row.get("messages") or [{"role": "user", "content": row["problem"]}]
            out.append(tok.encode(template.render(messages, tools=row.get("tools")), add_special_tokens=False).ids)
            if len(out) == n:
                break
    return out


def mtp_table(args, model, engine: Engine, prompts: list[list[int]]) -> None:
    """Plain vs --mtp K with fixed drafting (K drafts every step) and with the engine's draft policy, on
    the model's own drafts and on oracle drafts; then the step-cost breakdown the policy measured.
    Batch 1, each prompt in turn; rates over all of them."""
    cfg = model.config
    torch.set_num_threads(args.threads[0])
    print(f"\n| batch 1, compiled, {args.threads[0]} thread(s), {len(prompts)} prompt(s) | decode tok/s (wall / CPU) | "
          "vs plain (CPU) | mean accepted drafts / verify step | verify steps | acceptance per draft position | "
          "same tokens |")
    print("|---|---|---|---|---|---|---|")
    base = [ours_decode(engine, [p], args.new_tokens)[1][0] for p in prompts]
    n, policy = cfg.num_nextn_predict_layers, engine.policy
    # Oracle drafts get a policy of their own: their acceptance and their (hooked, slower) drafting
    # must not become what the policy believes of the model's own drafts.
    oracle_policy = copy.deepcopy(policy)
    runs = [("plain", 0, False, policy), (f"--mtp {n}, fixed", n, False, None), (f"--mtp {n}, adaptive", n, False, policy),
            (f"--mtp {n}, fixed, oracle drafts", n, True, None),
            (f"--mtp {n}, adaptive, oracle drafts", n, True, oracle_policy)]
    results: dict[str, list] = {label: [] for label, *_ in runs}
    # The first round, as long as the others, warms up: it compiles every verify, draft and catch-up shape
    # the runs meet (a shape first met in a timed round would time its compilation).
    for rep in range(args.repeats + 1):
        for label, k, use_oracle, pol in runs:
            engine.policy, wall, cpu, ids, stats = pol, 0.0, 0.0, [], []
            for p, b in zip(prompts, base):
                engine.drafter.draft_hook = oracle(p, b) if use_oracle else None
                (w, c), out, st = ours_decode(engine, [p], args.new_tokens, mtp=k)
                tokens = len(out[0]) - 1
                wall, cpu, ids, stats = wall + tokens / w, cpu + tokens / c, ids + out, stats + st
            if rep:
                tokens = sum(len(i) - 1 for i in ids)
                results[label].append(((tokens / wall, tokens / cpu), ids, stats))
    engine.drafter.draft_hook, engine.policy = None, policy
    plain = best([r[0] for r in results["plain"]])
    for label, k, *_ in runs:
        rate = best([r[0] for r in results[label]])
        _, ids, stats = results[label][-1]
        steps = sum(s["verify_steps"] for s in stats)
        accepted = sum(s["mean_accepted"] * s["verify_steps"] for s in stats) / max(steps, 1)
        tried = [sum(s["acceptance_per_position"][j] * s["verify_steps"] for s in stats) / max(steps, 1)
                 for j in range(k)]
        acc = ", ".join(f"{a:.2f}" for a in tried) or "-"
        print(f"| {label} | {fmt(rate)} | {rate[1] / plain[1]:.2f}x | {accepted:.2f} | {steps} | {acc} | "
              f"{'yes' if ids == base else 'NO'} |")
    cost = {key: min(v) * 1e3 for key, v in policy.seconds.items() if key[1] == 1 and len(v) >= 3}  # as the policy
    print("\nstep costs the draft policy measured at batch 1 (ms, minimum of the last 16, where measured 3 times; "
          "a cycle is a whole "
          "step with k drafts, what the policy compares): "
          + ", ".join(f"{kind} k={k}: {ms:.2f}" for (kind, _, k), ms in sorted(cost.items(), key=lambda x: (x[0][0], x[0][2]))))


def kv_table() -> None:
    print("\n| KV cache per sequence (bf16, release config) | 8k tokens | 32k tokens |")
    print("|---|---|---|")
    rel = flash()
    L = rel.num_hidden_layers
    for label, types_ in (("S3F1 (12 full + 33 sliding, window 512)", None), ("all 45 layers full", ["full_attention"] * L)):
        sizes = [cache_bytes(rel, n, layer_types=types_, mtp=False) / 2**30 for n in (8192, 32768)]
        print(f"| {label} | {sizes[0]:.2f} GiB | {sizes[1]:.2f} GiB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small", choices=sorted(PRESETS))
    ap.add_argument("--checkpoint", default=None, help="use a trained checkpoint instead of random weights")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--no-mtp", action="store_true", help="skip the MTP table")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed table")
    ap.add_argument("--prompts", default=None, help="with --checkpoint: JSONL of prompts for the MTP table "
                    "({\"prompt_ids\": [...]}, or {\"messages\": [...]} / {\"problem\": ...} rendered with the "
                    "checkpoint's template and tokenizer); generation then stops at the model's stop tokens")
    ap.add_argument("--mtp-prompts", type=int, default=8,
                    help="prompts the MTP table decodes (of --prompts, or random)")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="decode-bench-")
    ggufs, missing = {}, None if args.skip_llamacpp or args.no_speed else llamacpp_missing()
    checkpoint = args.checkpoint
    if not (args.skip_llamacpp or args.no_speed or missing):  # llama.cpp reads a checkpoint's GGUF export
        checkpoint = checkpoint or make_checkpoint(args.config, os.path.join(work, "ckpt"))
        ggufs = export_ggufs(checkpoint, work)
    if checkpoint:
        model = load_model(checkpoint, dtype=torch.float32)
    else:
        model = Step35ForCausalLM(PRESETS[args.config]())
    model.eval()
    cfg = model.config
    if not args.prompts:
        cfg.eos_token_id = []  # every run decodes exactly --new-tokens (chat prompts stop at the reply's end)
    n_params = sum(p.numel() for p in model.parameters())
    name = args.checkpoint or f"random {args.config}"
    print(f"model: {name} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.moe_num_experts} experts top-{cfg.moe_top_k}, vocab {cfg.vocab_size}, window {cfg.sliding_window}; "
          f"{n_params / 1e6:.1f}M parameters incl. {cfg.num_nextn_predict_layers} MTP layers), fp32, "
          f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens, best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} at start" + (f"; no llama.cpp: {missing}" if missing else ""))
    engines = {"eager": Engine(model, max_batch_size=max(args.batches)),
               "compiled": Engine(model, max_batch_size=max(args.batches), compile=True)}
    if engines["compiled"].compiled is None:
        sys.exit(f"no compiled engine: {engines['compiled'].compile_note}")
    hf = None if args.skip_hf or args.no_speed else hf_twin(model)
    if not args.no_speed:
        speed_table(args, model, engines, hf, ggufs)
        print(f"\nload average after the speed table: {load_average()}")
    if not args.no_mtp:
        if args.prompts:
            prompts = chat_prompts(args.prompts, args.checkpoint, args.mtp_prompts)
        else:
            prompts = torch.randint(0, cfg.vocab_size, (args.mtp_prompts, args.prompt_len),
                                    generator=torch.Generator().manual_seed(1))
            prompts = prompts.tolist()
        mtp_table(args, model, engines["compiled"], prompts)
        print(f"\nload average after the MTP table: {load_average()}")
    print(f"\ncompile time (all shapes above, this process): {engines['compiled'].compile_seconds:.0f} s; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    kv_table()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
