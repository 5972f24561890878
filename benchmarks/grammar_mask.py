"""Grammar-mask cost per row per decode step: llguidance vs xgrammar on stepflash's byte-level BPE tokenizers.

    python benchmarks/grammar_mask.py [--cache DIR] [--steps 300] [--repeats 3] [--threads 1]

Tokenizers: the project's trainer (`stepflash.tokenizer.train_tokenizer`) at the vocabulary sizes of the
presets (tiny tests ~320, `small` 8192, the release's 128896), trained once on ~60 MB of Python sources
from this machine's standard library and cached. For each library and size: tokenizer setup, grammar
compile (a JSON schema; the XML tool call of one function, xgrammar through its built-in Qwen3-Coder
structural tag, which is the same format), then a random walk: random logits, the mask applied,
a token sampled and consumed, `--steps` times. Reported per step and row: mask fill (µs) and token
consumption (µs), best of `--repeats` runs, the two libraries interleaved. A row's mask is computed by
one thread in both libraries; `--threads` sets torch's threads and xgrammar's compiler threads.
xgrammar is optional: it is not a dependency of stepflash (`pip install xgrammar==0.2.8` to include it).
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stepflash.inference.structured import GrammarCompiler, masked_logits  # noqa: E402
from stepflash.tokenizer import train_tokenizer  # noqa: E402

# Two JSON schemas: strings bounded by maxLength (the lexer checks every token against the bound) and plain
# strings (llguidance's precomputed "slices" answer most of the vocabulary at once).
PLAIN = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {
    "type": "array", "items": {"type": "string"}}, "active": {"type": "boolean"}},
    "required": ["name", "age", "active"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "maxLength": 20}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                           "maxItems": 4}, "active": {"type": "boolean"}},
    "required": ["name", "age", "active"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "metric": {"type": "boolean"}}, "required": ["city", "days"]}}}


def tokenizers(cache: str, sizes: list[int]):
    from tokenizers import Tokenizer

    os.makedirs(cache, exist_ok=True)
    out = {}
    for size in sizes:
        path = os.path.join(cache, f"tok{size}.json")
        if not os.path.exists(path):
            stdlib = os.path.join(os.path.dirname(os.__file__), "**", "*.py")
            files = sorted(f for f in glob.glob(stdlib, recursive=True) if os.path.isfile(f))
            random.Random(0).shuffle(files)
            keep, total = [], 0
            for f in files:
                keep.append(f)
                total += os.path.getsize(f)
                if total > 60e6:
                    break
            train_tokenizer(keep, size, path)
        out[size] = Tokenizer.from_file(path)
    return out


class Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab, stops, threads=1):
        self.compiler = GrammarCompiler(tok, vocab, stops)

    def json(self, schema):
        return self.compiler.json_schema(schema)

    def tool(self):
        return self.compiler.tool_calls([TOOL], name="get_weather")

    def walk(self, grammar, steps, vocab, seed, stops):
        m = self.compiler.matcher(grammar)
        bits = torch.zeros(m.words, dtype=torch.int32)
        return _walk(lambda: m.fill_mask(bits), lambda t: m.consume([t]), bits, steps, vocab, seed, stops, m)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab, stops, threads=1):
        import xgrammar as xgr

        self.xgr = xgr
        encoded = [t for t, _ in sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])]
        info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=stops)
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads)

    def json(self, schema):
        return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "))

    def tool(self):
        tag = self.xgr.get_model_structural_tag("qwen_3_coder", tools=[TOOL], tool_choice=
                                                {"type": "function", "function": {"name": "get_weather"}},
                                                reasoning=False)
        return self.compiler.compile_structural_tag(tag)

    def walk(self, grammar, steps, vocab, seed, stops):
        m = self.xgr.GrammarMatcher(grammar)
        bits = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
        return _walk(lambda: m.fill_next_token_bitmask(bits, 0), m.accept_token, bits[0], steps, vocab, seed, stops, m)


def _walk(fill, consume, bits, steps, vocab, seed, stops, matcher):
    """Random walk under the mask; restarts the grammar whenever it completes. Returns (fill s, consume s, n)."""
    g = torch.Generator().manual_seed(seed)
    t_fill = t_consume = 0.0
    done = 0
    while done < steps:
        t0 = time.perf_counter()
        fill()
        t1 = time.perf_counter()
        logits = masked_logits(torch.randn(vocab, generator=g), bits)
        tok = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        if tok in stops:  # complete: start the grammar over
            matcher.reset()
            t_fill += t1 - t0
            done += 1
            continue
        t2 = time.perf_counter()
        ok = consume(tok)
        t3 = time.perf_counter()
        assert ok is not False, "a masked token was refused"
        t_fill += t1 - t0
        t_consume += t3 - t2
        done += 1
    return t_fill, t_consume, done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/stepflash_grammar_bench")
    ap.add_argument("--sizes", default="320,8192,128896")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    libs = [Llguidance]
    try:
        import xgrammar  # noqa: F401

        libs.append(Xgrammar)
    except ImportError:
        print("xgrammar not installed: llguidance only")
    print(f"threads {args.threads}; load average before: {os.getloadavg()}")
    print("| vocab | library | setup s | compile ms: json / tool | mask µs: json maxLength / json plain / tool "
          "| consume µs: json maxLength / json plain / tool |")
    print("|---|---|---|---|---|---|")
    for size, tok in tokenizers(args.cache, [int(s) for s in args.sizes.split(",")]).items():
        stops = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|eos|>")]
        built = {}
        for lib in libs:
            t0 = time.perf_counter()
            impl = lib(tok, size, stops, args.threads)
            setup = time.perf_counter() - t0
            grammars, compile_ms = {}, {}
            for kind, make in (("json", lambda: impl.json(SCHEMA)), ("plain", lambda: impl.json(PLAIN)),
                               ("tool", impl.tool)):
                t0 = time.perf_counter()
                grammars[kind] = make()
                compile_ms[kind] = (time.perf_counter() - t0) * 1e3
            built[lib.name] = (impl, grammars, setup, compile_ms)
        best = {name: {} for name in built}
        for rep in range(args.repeats):  # interleaved
            for name, (impl, grammars, *_) in built.items():
                for kind, grammar in grammars.items():
                    f, c, n = impl.walk(grammar, args.steps, size, rep, stops)
                    prev = best[name].get(kind, (1e9, 1e9))
                    best[name][kind] = (min(prev[0], f / n * 1e6), min(prev[1], c / n * 1e6))
        for name, (impl, grammars, setup, compile_ms) in built.items():
            b = best[name]
            masks = " / ".join(f"{b[k][0]:.0f}" for k in ("json", "plain", "tool"))
            consume = " / ".join(f"{b[k][1]:.0f}" for k in ("json", "plain", "tool"))
            print(f"| {size} | {name} | {setup:.2f} | {compile_ms['json']:.1f} / {compile_ms['tool']:.1f} | {masks} | "
                  f"{consume} |", flush=True)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
