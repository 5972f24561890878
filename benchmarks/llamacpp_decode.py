"""llama.cpp's side of benchmarks/decode.py: a stepflash checkpoint exported to GGUF and decoded by llama.cpp
(through llama-cpp-python, built from source by `make install-test`), timed like the stepflash engine.

    from llamacpp_decode import export_ggufs, llamacpp_decode_tok_s, make_checkpoint

`export_ggufs(ckpt, out_dir)` runs `stepflash convert CKPT X.gguf --dtype f32|f16` on the same weights the
engine loads; `llamacpp_decode_tok_s(gguf_path, prompt_ids, n_new, threads)` is one llama.cpp cell of the
decode table: tokens/s after the prefill (the prefill yields the first token and is not timed), greedy,
batch 1, the prompt fed as token ids. `make_checkpoint` writes a random preset checkpoint with the
tokenizer a GGUF needs. Run `python benchmarks/decode.py` for the comparison table (this file has no main:
one place for the timing loop).
"""

from __future__ import annotations

import glob
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODELS: dict = {}  # (gguf path, threads) -> (llama_cpp.Llama, its n_ctx), loaded once: loading is not decoding


def llamacpp_missing() -> str | None:
    """None when llama-cpp-python imports, else why not (the table's llama.cpp columns then say "-")."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); `make install-test` builds it"
    return None


def _llama(gguf_path: str, threads: int, n_ctx: int):
    from llama_cpp import Llama

    key = (os.path.abspath(gguf_path), threads)
    if key not in _MODELS or _MODELS[key][1] < n_ctx:  # (Llama.n_ctx() may be padded past the score rows)
        n_ctx = max(n_ctx, 256)
        _MODELS[key] = Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                             n_threads_batch=threads, verbose=False), n_ctx
    return _MODELS[key][0]


def llamacpp_decode_tok_s(gguf_path: str, prompt_ids: list[int], n_new: int, threads: int,
                          tokens: list[int] | None = None) -> tuple[float, float]:
    """(wall, process-CPU) tokens/s of llama.cpp's greedy decode after the prefill, batch 1, `threads` CPU
    threads. The generated ids (the prefill's token first) are appended to `tokens` when given."""
    llm = _llama(gguf_path, threads, len(prompt_ids) + n_new + 8)
    # The newest position's logits, read from the context (llama-cpp-python keeps `scores` only with logits_all).
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    llm.reset()
    llm.eval(prompt_ids)  # prefill: its logits give the first new token
    out = [int(np.argmax(logits))]
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n_new - 1):
        llm.eval([out[-1]])
        out.append(int(np.argmax(logits)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if tokens is not None:
        tokens.extend(out)
    return (n_new - 1) / wall, (n_new - 1) / max(cpu, 1e-9)


def export_ggufs(checkpoint: str, out_dir: str, dtypes=("f32", "f16")) -> dict[str, str]:
    """{dtype: path} of the checkpoint exported by `stepflash convert` (it needs the tokenizer.json)."""
    from stepflash.cli import main as cli

    paths = {}
    for dtype in dtypes:
        paths[dtype] = os.path.join(out_dir, f"model-{dtype}.gguf")
        cli(["convert", checkpoint, paths[dtype], "--dtype", dtype])
    return paths


def make_checkpoint(preset: str, out: str) -> str:
    """A random checkpoint of `preset` (seed 0) with a byte-level tokenizer trained on this repository's sources."""
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
