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
repeats, and the ratio. The schema's one free string lets random weights write until max_tokens, so
both sides generate about as many tokens (tokens/s counts what each really generated).
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
    best = {False: 0.0, True: 0.0}
    for _ in range(a.repeats):
        for schema in (False, True):
            n, wall = asyncio.run(structured_level(url, "bench", a.max_batch, a.requests, a.max_tokens, schema))
            best[schema] = max(best[schema], n / wall)
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min)")
    print("| requests | tokens/s plain (ignore_eos) | tokens/s JSON schema | schema / plain |")
    print("|---|---|---|---|")
    print(f"| {a.requests} x {a.repeats} | {best[False]:.1f} | {best[True]:.1f} | {best[True] / best[False]:.3f} |")


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
    a = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    path = a.checkpoint or os.path.join(tmp.name, a.preset)
    if not a.checkpoint:
        build_checkpoint(a.preset, path)
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
