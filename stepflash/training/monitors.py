"""Stability monitors: the signals the report watched during pre-training, written to metrics.jsonl.

Per MoE layer (keys `moe/L{layer}/...`):
  load_max_over_mean    busiest expert's token count over the mean count (1 = perfectly balanced)
  dead_experts          experts that received no token since the last log
  out_norm_max_over_median   max / median over experts of the mean L2 norm of an expert's output
                             (before the gating weight): activation blow-up shows up here first
  act_rms_min_over_median    min / median of per-expert SwiGLU activation RMS: a dying expert
  weight_norm_min_over_median min / median of per-expert weight norms (gate, up, down together)
  router_bias_absmax   largest loss-free bias magnitude
Global: loss, max logit, grad norm, learning rate, tokens/s (the loop adds those).

`SpikeDetector` flags a sudden loss jump (a z-score of the step-to-step increase against its running
mean and variance, after a warm-up); the loop can then skip the optimizer step. Its state is saved with the
checkpoint so a resumed run makes the same decisions.

`MetricsLog` appends one JSON line per log step (rank 0 only) and mirrors scalars to TensorBoard when
the `tensorboard` package is installed. `StepLog` prints a progress line for the verbs that print instead
(sft, the MTP phase, the recipe's supervised stages, the reward model). `PeakMemory` measures the peak
tensor memory of a block on any device (what bf16 and activation checkpointing save).
"""

from __future__ import annotations

import json
import math
import os
import time
import weakref

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class ExpertStatsWindow:
    """Per-layer sums since the last log: counts (every step) and output-norm / activation sums (log steps)."""

    def __init__(self, moe_modules):
        self.moe_modules = moe_modules
        n, e = len(moe_modules), (moe_modules[0].num_experts if moe_modules else 0)
        self.counts = torch.zeros(n, e, dtype=torch.float64)  # [layers, E] tokens since last log
        self.stat_counts = torch.zeros(n, e, dtype=torch.float64)  # [layers, E] tokens on stat steps
        self.out_norm = torch.zeros(n, e, dtype=torch.float64)
        self.act_sq = torch.zeros(n, e, dtype=torch.float64)

    def record_stats(self, on: bool) -> None:
        for m in self.moe_modules:
            m.record_expert_stats = on

    def add(self) -> None:
        """Read each layer's last_routing after a training forward."""
        for i, m in enumerate(self.moe_modules):
            r = m.last_routing
            c = r["counts"].detach().double().cpu()
            self.counts[i] += c
            if "out_norm_sum" in r:
                self.stat_counts[i] += c
                self.out_norm[i] += r["out_norm_sum"].double().cpu()
                self.act_sq[i] += r["act_sq_sum"].double().cpu()

    def reset(self) -> None:
        for t in (self.counts, self.stat_counts, self.out_norm, self.act_sq):
            t.zero_()

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "stat_counts": self.stat_counts.clone(),
                "out_norm": self.out_norm.clone(), "act_sq": self.act_sq.clone()}

    def load_state_dict(self, s: dict) -> None:
        for k in ("counts", "stat_counts", "out_norm", "act_sq"):
            getattr(self, k).copy_(s[k])

    @torch.no_grad()
    def metrics(self, layer_ids: list[int]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, (m, layer) in enumerate(zip(self.moe_modules, layer_ids)):
            pre = f"moe/L{layer}/"
            c = self.counts[i]
            if c.sum() > 0:
                out[pre + "load_max_over_mean"] = float(c.max() / c.mean())
                out[pre + "dead_experts"] = int((c == 0).sum())
            seen = self.stat_counts[i] > 0
            if seen.any():
                out_norm = self.out_norm[i][seen] / self.stat_counts[i][seen]
                act_rms = (self.act_sq[i][seen] / self.stat_counts[i][seen]).sqrt()
                out[pre + "out_norm_max"] = float(out_norm.max())
                out[pre + "out_norm_max_over_median"] = _ratio(out_norm.max(), out_norm.median())
                out[pre + "act_rms_min_over_median"] = _ratio(act_rms.min(), act_rms.median())
            w = expert_weight_norms(m)
            out[pre + "weight_norm_min_over_median"] = _ratio(w.min(), w.median())
            out[pre + "router_bias_absmax"] = float(m.router_bias.abs().max())
        return out


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a / b) if float(b) > 0 else float("inf")


@torch.no_grad()
def expert_weight_norms(moe) -> torch.Tensor:
    """[E]: Frobenius norm of each expert's gate, up and down matrices taken together."""
    sq = sum(p.weight.detach().float().pow(2).sum(dim=(1, 2)) for p in (moe.gate_proj, moe.up_proj, moe.down_proj))
    return sq.sqrt().cpu()


class SpikeDetector:
    """Flags a sudden jump: the step-to-step loss increase is > z standard deviations above the running
    mean increase (exponential moving statistics, after `warmup` steps) and > `min_rel` of the loss.

    Increments rather than levels: while the loss falls fast early in training the level's spread is
    large and would hide a real spike, but the increments stay small and regular. Flagged losses are not
    folded into the statistics (nor become the reference), so one spike does not mask the next."""

    def __init__(self, z: float = 6.0, beta: float = 0.95, warmup: int = 20, min_rel: float = 0.05):
        self.z, self.beta, self.warmup, self.min_rel = z, beta, warmup, min_rel
        self.prev, self.mean, self.var, self.n = 0.0, 0.0, 0.0, 0

    def check(self, loss: float) -> bool:
        """True when `loss` is a spike; otherwise it updates the running statistics."""
        if self.n == 0:
            self.prev, self.n = loss, 1
            return False
        d = loss - self.prev
        if self.n > self.warmup and self.z > 0 and d > self.mean + self.z * math.sqrt(self.var) \
                and d > self.min_rel * abs(self.prev):
            return True
        if self.n == 1:
            self.mean = d
        else:
            delta = d - self.mean
            self.mean += (1 - self.beta) * delta
            self.var = self.beta * (self.var + (1 - self.beta) * delta * delta)
        self.prev = loss
        self.n += 1
        return False

    def state_dict(self) -> dict:
        return {"prev": self.prev, "mean": self.mean, "var": self.var, "n": self.n}

    def load_state_dict(self, s: dict) -> None:
        self.prev, self.mean, self.var, self.n = s["prev"], s["mean"], s["var"], s["n"]


class MetricsLog:
    """Appends JSON lines to RUN_DIR/metrics.jsonl (only where `enabled`, i.e. on rank 0)."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint we resume from (they will be logged again)."""
        if not (self.enabled and os.path.isfile(self.path)):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class StepLog:
    """A progress line every `every` steps for the verbs that print rather than plot: `NAME step i/N k v ...
    (Ts)`, each value the mean over the steps since the previous line, written with `log` (print by default,
    nothing when disabled, e.g. on ranks other than 0). `history` keeps every step's values."""

    def __init__(self, name: str, total: int, every: int, log=print, enabled: bool = True):
        self.name, self.total, self.every, self.log, self.enabled = name, total, every, log, enabled
        self.history: list[dict[str, float]] = []
        self.t0 = time.time()

    def add(self, step: int, values: dict[str, float]) -> None:
        """Record step `step` (1-based); print when it is a multiple of `every`."""
        self.history.append(values)
        if self.enabled and self.every and step % self.every == 0:
            means = self.mean(self.every)
            self.log(f"{self.name} step {step}/{self.total} " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                     + f" ({time.time() - self.t0:.0f}s)")

    def mean(self, last: int) -> dict[str, float]:
        """Mean of each value over the last `last` steps."""
        recent = self.history[-last:]
        return {k: sum(r.get(k, 0.0) for r in recent) / len(recent) for k in recent[-1]} if recent else {}


class PeakMemory(TorchDispatchMode):
    """`with PeakMemory() as pm: ...`: pm.peak is the most tensor memory (bytes) alive at once among the tensors
    created inside the block, on any device (CPU included, where torch keeps no allocator statistics). It
    watches every op's outputs and their storages' lifetimes, so it measures what a change such as activation
    checkpointing or bf16 saves, not the process's footprint. Sharded (DTensor) outputs count their local part."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, DTensor):
                t = t._local_tensor
            if not isinstance(t, torch.Tensor) or t.is_meta or type(t) is not torch.Tensor:
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._alive and self._alive[key]() is storage:
                continue  # a view of a tensor already counted
            nbytes = storage.nbytes()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self._alive[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
        return out


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
