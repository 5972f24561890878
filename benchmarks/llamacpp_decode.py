"""Batch-1 greedy decode speed of llama.cpp (through llama-cpp-python) on a stepflash checkpoint exported to
GGUF, beside the stepflash engine on the same weights.

    python benchmarks/llamacpp_decode.py [--checkpoint DIR] [--config small] [--new-tokens 64] [--repeats 5]

`llamacpp_decode_tok_s(gguf_path, prompt_ids, n_new, threads)` is the llama.cpp column for
benchmarks/decode.py: tokens/s after the prefill (the prefill yields the first token and is not timed),
greedy, the prompt fed as token ids. Run standalone, this script exports the checkpoint (default: a random
`small` checkpoint with a tokenizer trained on this repository's sources) to f32 and f16 GGUF, then measures
stepflash's engine and llama.cpp f32 / f16 at 1 and 2 threads, interleaved, best of --repeats, and prints a
markdown table with the load average beside it. Ratios are the result; absolute rates move with the load.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODELS: dict = {}  # (gguf path, threads) -> llama_cpp.Llama, loaded once: loading is not decoding


def _llama(gguf_path: str, threads: int, n_ctx: int):
    from llama_cpp import Llama

    key = (os.path.abspath(gguf_path), threads)
    if key not in _MODELS or _MODELS[key].n_ctx() < n_ctx:
        _MODELS[key] = Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                             n_threads_batch=threads, verbose=False)
    return _MODELS[key]


def llamacpp_decode_tok_s(gguf_path: str, prompt_ids: list[int], n_new: int, threads: int) -> float:
    """Greedy decode tokens/s of llama.cpp after the prefill, batch 1, `threads` CPU threads."""
    llm = _llama(gguf_path, threads, len(prompt_ids) + n_new + 8)
    llm.reset()
    llm.eval(prompt_ids)  # prefill: its logits give the first new token
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return (n_new - 1) / (time.perf_counter() - start)


@torch.inference_mode()
def stepflash_decode_tok_s(engine, prompt_ids: list[int], n_new: int, threads: int) -> float:
    """The same measurement for stepflash's engine: first step (prefill) untimed, then every decode step."""
    from stepflash.inference.engine import SamplingParams

    torch.set_num_threads(threads)
    rid = engine.add_request(list(prompt_ids), SamplingParams(max_new_tokens=n_new))
    req = engine.scheduler.requests[rid]
    engine.step()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (len(req.output) - 1) / (time.perf_counter() - start)


def make_checkpoint(preset: str, out: str) -> str:
    """A random checkpoint of `preset` with a byte-level tokenizer trained on this repository's sources."""
    from stepflash import Step35ForCausalLM, save_model
    from stepflash.config import PRESETS
    from stepflash.tokenizer import train_tokenizer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "stepflash", "**", "*.py"), recursive=True))
    cfg = PRESETS[preset]()
    tok = train_tokenizer(files, cfg.vocab_size)
    torch.manual_seed(0)
    model = Step35ForCausalLM(cfg)
    model.init_weights()
    save_model(model, out, tokenizer=tok)
    return out


def main() -> None:
    from stepflash.checkpoint import load_model
    from stepflash.cli import main as cli
    from stepflash.inference.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="a checkpoint directory with its tokenizer.json")
    ap.add_argument("--config", default="small", help="preset for the random checkpoint made without --checkpoint")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="llamacpp-decode-")
    ckpt = args.checkpoint or make_checkpoint(args.config, os.path.join(work, "ckpt"))
    ggufs = {}
    for dtype in ("f32", "f16"):
        ggufs[dtype] = os.path.join(work, f"model-{dtype}.gguf")
        cli(["convert", ckpt, ggufs[dtype], "--dtype", dtype])
    model = load_model(ckpt, dtype=torch.float32).eval()
    model.config.eos_token_id = []  # every run decodes exactly --new-tokens
    engine = Engine(model, max_batch_size=1)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    runs = {("stepflash engine", t): (lambda t=t: stepflash_decode_tok_s(engine, prompt, args.new_tokens, t))
            for t in (1, 2)}
    for dtype, path in ggufs.items():
        for t in (1, 2):
            runs[(f"llama.cpp {dtype} GGUF", t)] = (lambda p=path, t=t: llamacpp_decode_tok_s(p, prompt, args.new_tokens, t))
    for run in runs.values():  # warm-up: allocations, thread pools, page cache
        run()
    load_before = os.getloadavg()
    best = {k: 0.0 for k in runs}
    for _ in range(args.repeats):  # interleaved, so a burst of load hits every row alike
        for key, run in runs.items():
            time.sleep(0.2)  # let the other runtime's OpenMP threads stop spinning (torch and llama.cpp each have one)
            best[key] = max(best[key], run())
    load_after = os.getloadavg()
    base = {t: best[("stepflash engine", t)] for t in (1, 2)}
    print(f"checkpoint: {args.checkpoint or 'random ' + args.config} ({model.num_parameters() / 1e6:.1f}M parameters), "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, batch 1, best of {args.repeats} "
          f"interleaved; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (1 min)\n")
    print("| implementation | 1 thread tok/s | 2 threads tok/s | vs stepflash (1 / 2 threads) |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(k[0] for k in runs):
        r1, r2 = best[(name, 1)], best[(name, 2)]
        print(f"| {name} | {r1:.0f} | {r2:.0f} | {r1 / base[1]:.2f}x / {r2 / base[2]:.2f}x |")


if __name__ == "__main__":
    main()
