"""`stepflash plot RUN_DIR`: draw a run's metrics.jsonl to PNG files (matplotlib, Agg backend, no display).

One figure per family of metrics: losses (train, main, MTP per module, validation), optimisation
(grad norm, learning rate, max logit, tokens/s) and one per MoE monitor (a line per layer: load
max/mean, dead experts, output-norm max/median, activation-RMS min/median, weight-norm min/median,
router-bias magnitude). Steps flagged as loss spikes are marked on the loss plot.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from stepflash.errors import UserError

_LAYER_KEY = re.compile(r"moe/L(\d+)/(.+)")


@dataclass
class PlotArgs:
    """Draw RUN_DIR/metrics.jsonl to PNG files."""

    run_dir: str = field(metadata={"positional": True, "help": "run directory holding metrics.jsonl"})
    out: str | None = field(default=None, metadata={"help": "output directory (default: RUN_DIR/plots)"})


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write the PNGs; returns their paths."""
    from stepflash.training.monitors import read_metrics

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"no metrics.jsonl in {run_dir}")
    records = [r for r in read_metrics(path) if "step" in r]
    if not records:
        raise UserError(f"{path} has no records yet")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []

    fig, ax = _figure("loss")
    loss_keys = ["loss", "main_loss", "val_loss"] + sorted(k for r in records for k in r if k.startswith(("mtp_loss_", "val_mtp_loss_")))
    for key in dict.fromkeys(loss_keys):
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, marker="o" if key.startswith("val") else None, ms=3, label=key)
    spikes = [(r["step"], r["loss"]) for r in records if r.get("spike")]
    if spikes:
        ax.scatter(*zip(*spikes), color="red", zorder=5, label="spike")
    ax.legend(fontsize=7)
    written.append(_save(fig, os.path.join(out_dir, "loss.png")))

    for key in ("grad_norm", "lr", "max_logit", "tokens_per_s", "ep_loss"):
        xs, ys = _series(records, key)
        if xs:
            fig, ax = _figure(key)
            ax.plot(xs, ys)
            written.append(_save(fig, os.path.join(out_dir, f"{key}.png")))

    by_metric: dict[str, dict[int, str]] = {}
    for r in records:
        for k in r:
            m = _LAYER_KEY.fullmatch(k)
            if m:
                by_metric.setdefault(m.group(2), {})[int(m.group(1))] = k
    for metric, layers in sorted(by_metric.items()):
        fig, ax = _figure(f"MoE {metric} (per layer)")
        for layer, key in sorted(layers.items()):
            ax.plot(*_series(records, key), label=f"layer {layer}")
        ax.legend(fontsize=6, ncol=2)
        written.append(_save(fig, os.path.join(out_dir, f"moe_{metric}.png")))

    # Any other numeric key (RL runs log reward, test_accuracy, acceptance rates, ...): one figure each.
    drawn = set(loss_keys) | {"grad_norm", "lr", "max_logit", "tokens_per_s", "ep_loss", "step", "spike"}
    for key in sorted({k for r in records for k in r} - drawn):
        xs, ys = _series(records, key)
        if xs and not _LAYER_KEY.fullmatch(key) and re.fullmatch(r"[\w.-]+", key):
            fig, ax = _figure(key)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
            written.append(_save(fig, os.path.join(out_dir, f"{key}.png")))
    return written


def run(args: PlotArgs) -> int:
    files = plot_run(args.run_dir, args.out)
    print(f"wrote {len(files)} plots to {os.path.dirname(files[0])}")
    return 0
