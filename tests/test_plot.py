"""`stepflash plot`: the overview page, labelled axes, the validation curve; from a synthetic metrics.jsonl."""

import json
import os

import pytest

from stepflash.errors import UserError
from stepflash.plot import LABELS, draw_loss, draw_summary, plot_run


def _records(steps: int = 40, val_every: int = 10) -> list[dict]:
    out = []
    for s in range(5, steps + 1, 5):
        out.append({"step": s, "loss": 9.0 - s / 10, "main_loss": 8.0 - s / 10, "grad_norm": 1.0, "lr": 1e-3,
                    "tokens_per_s": 500.0, "max_logit": 3.0, "mtp_loss_0": 8.5 - s / 10, "spike": s == 20,
                    "moe/L1/load_max_over_mean": 1.5, "moe/L2/load_max_over_mean": 1.7,
                    "moe/L1/router_bias_absmax": 0.01 * s, "moe/L1/dead_experts": 0})
        if s % val_every == 0:
            out[-1].update(val_loss=8.2 - s / 10, val_mtp_loss_0=8.6 - s / 10)
    return out


def _write(run_dir, records) -> str:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(run_dir)


def test_plot_writes_the_summary_first_and_every_family(tmp_path, capsys):
    from stepflash.cli import main

    run_dir = _write(tmp_path / "run", _records())
    assert main(["plot", run_dir]) == 0
    assert "the overview is" in capsys.readouterr().out
    files = plot_run(run_dir)
    names = [os.path.basename(f) for f in files]
    assert names[0] == "summary.png"
    assert {"loss.png", "mtp_loss.png", "grad_norm.png", "moe_load_max_over_mean.png", "moe_dead_experts.png"} <= set(names)
    for f in files:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_every_summary_panel_has_labelled_axes_and_the_validation_curve(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    saved = []
    monkeypatch.setattr("stepflash.plot._save", lambda fig, path: saved.append(fig) or path)
    draw_summary(_records(), str(tmp_path / "summary.png"))
    (fig,) = saved
    panels = [ax for ax in fig.axes if ax.get_visible()]
    # loss, MTP, lr, grad_norm, tokens/s, max_logit, expert load, router bias
    assert len(panels) == 8 and not any(ax.get_visible() for ax in fig.axes[8:])
    for ax in panels:
        assert ax.get_xlabel() == "step" and ax.get_ylabel() and ax.get_title()
    loss_ax = panels[0]
    assert loss_ax.get_ylabel() == LABELS["loss"]
    curves = {line.get_label(): line.get_xdata().tolist() for line in loss_ax.get_lines()}
    assert curves["validation (main head)"] == [10, 20, 30, 40]  # a curve over the run, not one point
    plt.close(fig)


def test_loss_panel_marks_spikes_and_skips_missing_metrics(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    assert draw_loss(ax, _records())
    assert [c.get_label() for c in ax.collections] == ["loss spike"]
    fig2, ax2 = plt.subplots()
    assert not draw_loss(ax2, [{"step": 1, "reward": 0.5}])  # an RL run has no loss panel
    plt.close(fig)
    plt.close(fig2)


def test_missing_or_empty_metrics_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_run(str(tmp_path))
    _write(tmp_path, [])
    with pytest.raises(UserError, match="no records yet"):
        plot_run(str(tmp_path))
