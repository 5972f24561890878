"""Serving throughput and latency: requests/s and time to first token at 1, 8 and 32 concurrent clients.

Builds a random checkpoint of a preset (tiny by default) with a byte-level BPE tokenizer trained on a
few KB of text, starts `stepflash serve` on it in a separate process (so the clients do not share the
server's GIL), and drives it with the official `openai` async client: each client sends streaming
completions one after another. TTFT is measured from sending the request to the first chunk that
carries text; requests/s over the whole wall time of a concurrency level. Usage:
    python benchmarks/serve.py [--preset tiny] [--checkpoint DIR] [--clients 1 8 32] [--requests 64]
                               [--max-tokens 32] [--max-batch 8] [--mtp 0]

--structured: the cost of structured output instead. The same requests at `--max-batch` concurrent
clients (non-streaming completions), without and with a JSON schema (`response_format`, a grammar mask
per row and step), interleaved `--repeats` times; generated tokens/s over the wall time, best of the
repeats, and the ratio (and the median of the per-repeat ratios, which a busy machine moves less).
The schema's one free string lets random weights write until max_tokens, so
both sides generate about as many tokens (tokens/s counts what each really generated). With
--in-engine the same comparison runs through `Engine.step` in this process, and also reports the time
the engine spends per step on its per-row logits work (grammar masks, masking, consume).
"""

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import torch

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "def main():", "Weather in Paris is",
           "The answer is", "Dear reader,", "import torch"]


def build_checkpoint(preset: str, out: str) -> None:
    from stepflash import Step35ForCausalLM, save_model
    from stepflash.config import resolve_config
    from stepflash.tokenizer import LOSSLESS_MIN_VOCAB, save_tokenizer, train_tokenizer

    cfg = resolve_config(preset)
    cfg = cfg.replace(vocab_size=max(cfg.vocab_size, LOSSLESS_MIN_VOCAB + 64))
    text = " ".join(PROMPTS) * 200 + " ".join(str(i) for i in range(2000))
    tok = train_tokenizer([text], cfg.vocab_size)
    torch.manual_seed(0)
    save_model(Step35ForCausalLM(cfg), out)
    save_tokenizer(tok, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_client(client, model, n_requests, max_tokens, ttfts, offset):
    for i in range(n_requests):
        t0 = time.perf_counter()
        first = None
        stream = await client.completions.create(model=model, prompt=PROMPTS[(offset + i) % len(PROMPTS)],
                                                 max_tokens=max_tokens, temperature=0, stream=True)
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
        ttfts.append(first if first is not None else time.perf_counter() - t0)


async def level(url, model, clients, total, max_tokens):
    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    per_client = max(1, total // clients)
    ttfts = []
    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(client, model, per_client, max_tokens, ttfts, c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    n = per_client * clients
    return n, wall, ttfts


SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


async def structured_level(url, model, clients, total, max_tokens, schema: bool) -> tuple[int, float]:
    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    extra = ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}} if schema
             else {"ignore_eos": True})
    tokens = []

    async def one(c):
        for i in range(max(1, total // clients)):
            r = await client.completions.create(model=model, prompt=PROMPTS[(c + i) % len(PROMPTS)],
                                                max_tokens=max_tokens, temperature=0, extra_body=extra)
            tokens.append(r.usage.completion_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return sum(tokens), wall


def structured(url, a) -> None:
    rates = {False: [], True: []}
    for r in range(a.repeats):
        for schema in (False, True) if r % 2 == 0 else (True, False):  # alternate which side runs first
            n, wall = asyncio.run(structured_level(url, "bench", a.max_batch, a.requests, a.max_tokens, schema))
            rates[schema].append(n / wall)
    report(a, rates)


def report(a, rates, extra: str = "") -> None:
    best = {k: max(v) for k, v in rates.items()}
    pairs = statistics.median(s / p for p, s in zip(rates[False], rates[True]))  # each pair ran back to back
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min)")
    print("| requests | tokens/s plain (ignore_eos) | tokens/s JSON schema | schema / plain | paired ratios, median |")
    print("|---|---|---|---|---|")
    print(f"| {a.requests} x {a.repeats} | {best[False]:.1f} | {best[True]:.1f} | {best[True] / best[False]:.3f} | "
          f"{pairs:.3f} |")
    if extra:
        print(extra)


def structured_in_engine(path: str, a) -> None:
    """--structured --in-engine: the same comparison through `Engine.step` in this process (no HTTP, no
    event loop), and the time the engine spends in its per-row logits work (`RowLogits.process` and
    `.accepted`: grammar masks, masking, consume) per step, which the busy machine blurs far less."""
    from stepflash.checkpoint import load_model
    from stepflash.inference.engine import Engine, SamplingParams
    from stepflash.inference.structured import GrammarCompiler
    from stepflash.tokenizer import load_tokenizer

    model, tok = load_model(path).eval(), load_tokenizer(path)
    engine = Engine(model, max_batch_size=a.max_batch)
    compiler = GrammarCompiler(tok, model.config.vocab_size, list(model.config.eos_token_ids))
    grammar = compiler.json_schema(SCHEMA)
    spent = [0.0]

    def timed(f):
        def run(*args):
            t0 = time.perf_counter()
            try:
                return f(*args)
            finally:
                spent[0] += time.perf_counter() - t0
        return run

    engine.rows.process, engine.rows.accepted = timed(engine.rows.process), timed(engine.rows.accepted)

    def once(schema: bool) -> tuple[float, float, float]:
        ids = [engine.add_request(tok.encode(PROMPTS[i % len(PROMPTS)]).ids, SamplingParams(
            max_new_tokens=a.max_tokens, speculative_tokens=a.mtp,
            **({"grammar": compiler.matcher(grammar)} if schema else {"ignore_eos": True})))
            for i in range(a.requests)]
        reqs = [engine.scheduler.requests[i] for i in ids]  # finished requests leave the scheduler
        spent[0], steps, t0 = 0.0, 0, time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        wall = time.perf_counter() - t0
        return sum(len(r.output) for r in reqs) / wall, spent[0] / steps, wall / steps

    once(False), once(True)  # warm-up
    rates, work, step = {False: [], True: []}, {False: [], True: []}, {False: [], True: []}
    for r in range(a.repeats):
        for schema in (False, True) if r % 2 == 0 else (True, False):
            rate, w, s = once(schema)
            rates[schema].append(rate), work[schema].append(w), step[schema].append(s)
    w = {k: min(v) * 1e3 for k, v in work.items()}
    report(a, rates, f"per-row logits work per step (best): plain {w[False]:.3f} ms, schema {w[True]:.3f} ms; "
                     f"the difference is {(w[True] - w[False]) / (min(step[False]) * 1e3):.1%} of a plain step "
                     f"({min(step[False]) * 1e3:.2f} ms)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", default=None, help="serve this checkpoint instead of a random preset")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--mtp", type=int, default=0)
    ap.add_argument("--structured", action="store_true", help="tokens/s with and without a JSON schema")
    ap.add_argument("--repeats", type=int, default=3, help="--structured: interleaved runs, best of")
    ap.add_argument("--in-engine", action="store_true", help="--structured through Engine.step, no server")
    a = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    path = a.checkpoint or os.path.join(tmp.name, a.preset)
    if not a.checkpoint:
        build_checkpoint(a.preset, path)
    if a.structured and a.in_engine:
        print(f"checkpoint: {a.checkpoint or 'random ' + a.preset}; max_tokens {a.max_tokens}, max_batch "
              f"{a.max_batch}, mtp {a.mtp}, greedy, in-engine; torch threads {torch.get_num_threads()}")
        return structured_in_engine(path, a)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "stepflash.cli", "serve", path, "--port", str(port),
                               "--max-batch", str(a.max_batch), "--max-queue", "256", "--mtp", str(a.mtp),
                               "--model-name", "bench"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                sys.exit("server exited:\n" + server.stderr.read().decode()[-3000:])
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                sys.exit("server did not start")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1"
        asyncio.run(level(url, "bench", 1, 2, a.max_tokens))  # warm-up
        print(f"checkpoint: {a.checkpoint or 'random ' + a.preset}; max_tokens {a.max_tokens}, max_batch {a.max_batch}, "
              f"mtp {a.mtp}, greedy, streaming completions; torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs")
        if a.structured:
            return structured(url, a)
        print("| clients | requests | wall (s) | requests/s | TTFT p50 (ms) | TTFT p90 (ms) |")
        print("|---|---|---|---|---|---|")
        for clients in a.clients:
            n, wall, ttfts = asyncio.run(level(url, "bench", clients, a.requests, a.max_tokens))
            q = statistics.quantiles(ttfts, n=10) if len(ttfts) > 1 else ttfts * 9
            print(f"| {clients} | {n} | {wall:.1f} | {n / wall:.2f} | {statistics.median(ttfts) * 1e3:.0f} | "
                  f"{q[8] * 1e3:.0f} |", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        tmp.cleanup()


if __name__ == "__main__":
    main()
