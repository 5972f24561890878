"""`stepflash plot RUN_DIR`: draw a run's metrics.jsonl to PNG files (matplotlib, Agg backend, no display).

`summary.png` is the overview: one page with the key panels that the run logged (pre-training: train and
validation loss, MTP losses, learning rate, grad norm, tokens/s, max logit, expert load and router bias
per MoE layer; RL: held-out accuracy, reward, entropy, response length, MIS-PO acceptance, value loss).
Then one figure per family: losses (train, main, MTP per module, validation, with loss spikes marked),
each optimisation metric, each MoE monitor (a line per layer) and any other numeric metric (RL runs).
Every axis is labelled: x is the optimizer step, y names the metric and its unit (`LABELS`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from stepflash.errors import UserError

_LAYER_KEY = re.compile(r"moe/L(\d+)/(.+)")

# metric -> y-axis label. Metrics not listed are labelled with their own name.
LABELS = {
    "loss": "cross entropy (nats/token)",
    "grad_norm": "global gradient norm (before clipping)",
    "lr": "learning rate",
    "max_logit": "largest logit of the batch",
    "tokens_per_s": "training tokens / s",
    "ep_loss": "EP-group balance loss",
    "load_max_over_mean": "busiest expert's load / mean load",
    "dead_experts": "experts that received no token",
    "out_norm_max": "largest expert output norm",
    "out_norm_max_over_median": "largest / median expert output norm",
    "act_rms_min_over_median": "smallest / median expert activation RMS",
    "weight_norm_min_over_median": "smallest / median expert weight norm",
    "router_bias_absmax": "largest |router bias|",
    "test_accuracy": "held-out accuracy (greedy)",
    "test_accuracy_sampled": "held-out accuracy (sampled)",
    "reward": "mean rollout reward",
    "entropy": "policy entropy (nats/token)",
    "response_length": "tokens per response",
    "token_accept_rate": "MIS-PO tokens kept (fraction)",
    "traj_accept_rate": "MIS-PO trajectories kept (fraction)",
    "value_loss": "critic loss",
    "rollout_s": "seconds per rollout batch",
    "train_s": "seconds per update",
}
# The overview's panels after the losses, in this order, where the run logged them.
SUMMARY_SCALARS = ("lr", "grad_norm", "tokens_per_s", "max_logit", "test_accuracy", "test_accuracy_sampled", "reward",
                   "entropy", "response_length", "traj_accept_rate", "value_loss")
SUMMARY_MOE = ("load_max_over_mean", "router_bias_absmax")
OPTIMISATION = ("grad_norm", "lr", "max_logit", "tokens_per_s", "ep_loss")


@dataclass
class PlotArgs:
    """Draw RUN_DIR/metrics.jsonl to PNG files: summary.png (the overview) and one figure per metric family."""

    run_dir: str = field(metadata={"positional": True, "help": "run directory holding metrics.jsonl"})
    out: str | None = field(default=None, metadata={"help": "output directory (default: RUN_DIR/plots)"})


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _label(key: str) -> str:
    return LABELS.get(key, key)


def _axes(ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)


def _line(ax, xs, ys, label: str | None = None, validation: bool = False) -> None:
    """Training metrics as lines; validation points (taken every --eval-every steps) as a line with markers."""
    ax.plot(xs, ys, marker="o" if validation or len(xs) < 30 else None, ms=3, label=label,
            linestyle="--" if validation else "-")


def _loss_keys(records: list[dict], prefix: str) -> list[str]:
    return sorted({k for r in records for k in r if re.fullmatch(prefix + r"\d+", k)})


def draw_loss(ax, records: list[dict], full: bool = True) -> bool:
    """Train and validation loss of the main head (and, when `full`, the total objective and spikes)."""
    keys = (["loss"] if full else []) + ["main_loss", "val_loss"]
    drawn = False
    for key in keys:
        xs, ys = _series(records, key)
        if xs:
            _line(ax, xs, ys, {"loss": "total objective", "main_loss": "train (main head)",
                               "val_loss": "validation (main head)"}[key], validation=key.startswith("val"))
            drawn = True
    spikes = [(r["step"], r["loss"]) for r in records if r.get("spike") and isinstance(r.get("loss"), float)]
    if full and spikes:
        ax.scatter(*zip(*spikes), color="red", zorder=5, label="loss spike")
    if drawn:
        _axes(ax, "loss", LABELS["loss"])
        ax.legend(fontsize=7)
    return drawn


def draw_mtp(ax, records: list[dict]) -> bool:
    drawn = False
    for key in _loss_keys(records, "mtp_loss_") + _loss_keys(records, "val_mtp_loss_"):
        xs, ys = _series(records, key)
        if xs:
            j = key.rsplit("_", 1)[1]
            _line(ax, xs, ys, f"{'validation' if key.startswith('val') else 'train'}, module {j}",
                  validation=key.startswith("val"))
            drawn = True
    if drawn:
        _axes(ax, "MTP losses (token t+2+j)", LABELS["loss"])
        ax.legend(fontsize=6, ncol=2)
    return drawn


def draw_scalar(ax, records: list[dict], key: str) -> bool:
    xs, ys = _series(records, key)
    if xs:
        _line(ax, xs, ys)
        _axes(ax, key, _label(key))
    return bool(xs)


def _moe_metrics(records: list[dict]) -> dict[str, dict[int, str]]:
    """MoE monitor name -> {layer: metrics key}."""
    by_metric: dict[str, dict[int, str]] = {}
    for r in records:
        for k in r:
            m = _LAYER_KEY.fullmatch(k)
            if m:
                by_metric.setdefault(m.group(2), {})[int(m.group(1))] = k
    return by_metric


def draw_moe(ax, records: list[dict], metric: str, layers: dict[int, str]) -> bool:
    for layer, key in sorted(layers.items()):
        ax.plot(*_series(records, key), label=f"layer {layer}")
    _axes(ax, f"MoE {metric} (per layer)", _label(metric))
    ax.legend(fontsize=6, ncol=2)
    return bool(layers)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _single(out_dir: str, name: str, draw) -> str | None:
    """One figure from draw(ax) -> whether it drew anything."""
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    if not draw(ax):
        _pyplot().close(fig)
        return None
    return _save(fig, os.path.join(out_dir, name))


def draw_summary(records: list[dict], path: str, title: str = "run") -> str | None:
    """The overview page: the key panels the run logged, three per row."""
    moe = _moe_metrics(records)
    panels = [lambda ax: draw_loss(ax, records, full=False), lambda ax: draw_mtp(ax, records)]
    panels += [lambda ax, k=k: draw_scalar(ax, records, k) for k in SUMMARY_SCALARS if _series(records, k)[0]]
    panels += [lambda ax, m=m: draw_moe(ax, records, m, moe[m]) for m in SUMMARY_MOE if m in moe]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    used = 0
    for panel in panels:
        if panel(axes.flat[used]):
            used += 1
    for ax in axes.flat[used:]:
        ax.set_visible(False)
    if not used:
        _pyplot().close(fig)
        return None
    fig.suptitle(f"{title}: summary to step {records[-1]['step']}", fontsize=11)
    return _save(fig, path)


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write summary.png and the per-family PNGs; returns their paths (summary first)."""
    from stepflash.training.monitors import read_metrics

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"no metrics.jsonl in {run_dir}")
    records = [r for r in read_metrics(path) if "step" in r]
    if not records:
        raise UserError(f"{path} has no records yet")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    written = [draw_summary(records, os.path.join(out_dir, "summary.png"), name),
               _single(out_dir, "loss.png", lambda ax: draw_loss(ax, records)),
               _single(out_dir, "mtp_loss.png", lambda ax: draw_mtp(ax, records))]
    written += [_single(out_dir, f"{k}.png", lambda ax, k=k: draw_scalar(ax, records, k)) for k in OPTIMISATION]
    moe = _moe_metrics(records)
    written += [_single(out_dir, f"moe_{m}.png", lambda ax, m=m: draw_moe(ax, records, m, moe[m])) for m in sorted(moe)]

    # Any other numeric key (RL runs log reward, test_accuracy, acceptance rates, ...): one figure each.
    drawn = {"loss", "main_loss", "val_loss", "step", "spike", *OPTIMISATION}
    drawn |= set(_loss_keys(records, "mtp_loss_")) | set(_loss_keys(records, "val_mtp_loss_"))
    for key in sorted({k for r in records for k in r} - drawn):
        if not _LAYER_KEY.fullmatch(key) and re.fullmatch(r"[\w.-]+", key):
            written.append(_single(out_dir, f"{key}.png", lambda ax, k=key: draw_scalar(ax, records, k)))
    return [p for p in written if p]


def run(args: PlotArgs) -> int:
    files = plot_run(args.run_dir, args.out)
    print(f"wrote {len(files)} plots to {os.path.dirname(files[0])}; the overview is {files[0]}")
    return 0
