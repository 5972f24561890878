"""One CPU thread policy for every verb that computes (train, sft, rl, generate, serve, eval, recipe, the demo).

torch runs each op on a pool of intra-op threads, one per core by default, and every parallel op ends at a
barrier where the threads wait for each other. When other processes hold some of the cores, one
descheduled thread stalls the rest at every barrier, and the many small ops of decoding (and of the small
models trained on CPU here) then cost several times what one thread takes; on a quiet machine the extra
threads pay off on large matrix products. No fixed count is right everywhere, so the CLI applies this
policy before a verb runs (benchmarks/RESULTS.md "Threads" has the measurements behind it):

1. `--threads N` (N >= 1): N.
2. OMP_NUM_THREADS set in the environment (torchrun sets 1 per process when it starts several): that.
3. compute on an accelerator (`--device cuda...`, or `auto` with one present): torch's default.
4. otherwise: a probe of the verb's kind of work (`decode`: batch-1..8 sized products and element-wise
   ops; `train`: forward and backward of a token batch), run at 1 thread and at torch's default,
   interleaved, best of three (~0.5 s on a busy 2-core machine); the faster is kept.

The choice and the reason are printed once, to stderr, by the main rank only. The CLI prints it once the
verb has run for a second (`DeferredLine`): a verb that stops at once on bad input prints only its
one-line error.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stepflash.errors import UserError

WORK_KINDS = ("decode", "train")


@dataclass
class ThreadChoice:
    threads: int
    reason: str  # why this count: "--threads", "OMP_NUM_THREADS", "device cuda", or the probe's timings

    def describe(self) -> str:
        hint = "" if self.reason == "--threads" else "; set with --threads N"
        return f"threads: {self.threads} ({self.reason}{hint})"


def _probe_decode(threads: int) -> float:
    """Seconds for 24 decode-sized layer steps: 4 rows through a 512-wide MLP with residual and norm."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 512, generator=g)  # [rows, hidden]
    w_up, w_down = torch.randn(512, 1536, generator=g) / 23, torch.randn(1536, 512, generator=g) / 40
    t = time.perf_counter()
    with torch.inference_mode():
        for _ in range(24):
            h = torch.nn.functional.silu(x @ w_up)  # [rows, 1536]
            x = torch.nn.functional.rms_norm(x + h @ w_down, (512,))
    return time.perf_counter() - t


def _probe_train(threads: int) -> float:
    """Seconds for forward + backward of a 1024-token batch through a 256-wide MLP (the small preset's width)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 256, generator=g)  # [tokens, hidden]
    w_up = (torch.randn(256, 768, generator=g) / 16).requires_grad_()
    w_down = (torch.randn(768, 256, generator=g) / 28).requires_grad_()
    t = time.perf_counter()
    y = torch.nn.functional.silu(x @ w_up) @ w_down  # [tokens, hidden]
    y.square().mean().backward()
    return time.perf_counter() - t


PROBES = {"decode": _probe_decode, "train": _probe_train}


def measure(work: str, candidates: list[int], rounds: int = 3) -> dict[int, float]:
    """Best seconds of the `work` probe per thread count, the counts interleaved round by round. A count
    over 3x slower than the best after a round is not run again (under load it can be many times slower)."""
    probe = PROBES[work]
    before = torch.get_num_threads()
    best = {n: float("inf") for n in candidates}
    try:
        for n in candidates:  # start each thread pool once before timing
            torch.set_num_threads(n)
            torch.ones(256, 256) @ torch.ones(256, 256)
        alive = list(candidates)
        for _ in range(rounds):
            for n in alive:
                best[n] = min(best[n], probe(n))
            alive = [n for n in alive if best[n] <= 3 * min(best.values())]
    finally:
        torch.set_num_threads(before)
    return best


def _on_accelerator(device: str | None) -> bool:
    if device is None or device == "cpu":
        return False
    if device == "auto":
        return torch.cuda.is_available()
    return not device.startswith("cpu")


def choose_threads(requested: int, work: str, device: str | None = None,
                   measure_fn: Callable[[list[int]], dict[int, float]] | None = None) -> ThreadChoice:
    """The thread count by the policy above; `requested` is --threads (0: choose). `measure_fn` replaces
    the probe by a measurement of the real work (the demo times its training step): thread counts ->
    seconds."""
    if requested < 0:
        raise UserError(f"--threads must be >= 1 (or 0 to measure), got {requested}")
    if requested:
        return ThreadChoice(requested, "--threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return ThreadChoice(int(env), "OMP_NUM_THREADS")
    default = torch.get_num_threads()
    if _on_accelerator(device):
        return ThreadChoice(default, f"torch's default; compute runs on {device}")
    if default == 1:
        return ThreadChoice(1, "one core available")
    times = (measure_fn or (lambda counts: measure(work, counts)))([1, default])
    n = min(times, key=times.get)
    shown = " vs ".join(f"{k} thread{'s' if k > 1 else ''} " + (f"{v * 1e3:.0f} ms" if v < float("inf") else
                        "not timed (its probe was clearly slower)") for k, v in times.items())
    return ThreadChoice(n, f"measured fastest for {work} work here: {shown}")


def is_main_rank() -> bool:
    """True outside torchrun and on its rank 0: the process that prints for all."""
    return os.environ.get("RANK", "0") in ("", "0")


def apply_threads(requested: int, work: str, device: str | None = None, announce: bool = True,
                  measure_fn: Callable[[list[int]], dict[int, float]] | None = None) -> ThreadChoice:
    """Choose, set torch's intra-op thread count, and print the choice once (main rank)."""
    choice = choose_threads(requested, work, device, measure_fn)
    torch.set_num_threads(choice.threads)
    if announce and is_main_rank():
        print(choice.describe(), file=sys.stderr, flush=True)
    return choice


class DeferredLine:
    """A line for stderr printed `delay` seconds from now unless cancelled first (then never)."""

    def __init__(self, text: str, delay: float = 1.0):
        self.text, self.printed = text, False
        self._lock = threading.Lock()
        self._timer = threading.Timer(delay, self.print)
        self._timer.daemon = True
        self._timer.start()

    def print(self) -> None:
        with self._lock:
            if not self.printed:
                self.printed = True
                print(self.text, file=sys.stderr, flush=True)

    def cancel(self) -> None:
        with self._lock:
            self.printed = True  # from now on, never
            self._timer.cancel()
