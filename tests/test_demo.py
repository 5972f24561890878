"""The demo's reporting rules (fast); the end-to-end run is tests/test_training.py's slow demo test."""

from stepflash.demo import _show_text, speed_report


def test_slower_speculation_gets_a_plain_warning():
    slower = speed_report(plain_tps=52.0, spec_tps=20.0, accepted=0.0)
    assert slower[0] == "decoding speed: plain 52.0 tok/s, MTP speculation 20.0 tok/s (0.00 of 3 drafts accepted per step)"
    assert len(slower) == 2 and slower[1].startswith("warning: MTP speculation was 2.6x slower than plain decoding")
    faster = speed_report(plain_tps=52.0, spec_tps=101.0, accepted=2.94)  # negative control
    assert len(faster) == 1 and "warning" not in faster[0]


def test_whitespace_only_text_is_made_visible(capsys):
    _show_text("greedy", "def main():\n", "\n" * 64)
    out = capsys.readouterr().out
    assert "(that is 64 characters of whitespace only: '\\n\\n\\n" in out and out.endswith("...)\n")
    _show_text("greedy", "def main():\n", "    return 0\n")  # negative control: real text is shown as it is
    out = capsys.readouterr().out
    assert "whitespace only" not in out and "def main():\n    return 0\n" in out


def test_step_plan_fits_the_budget_with_its_validations():
    import math

    from stepflash.demo import VAL_POINTS, plan_steps

    def cost(steps, every, step_s, val_s):
        return steps * step_s + math.ceil(steps / every) * val_s

    for seconds, step_s, val_s in [(170, 15.1, 12.0), (360, 6.7, 3.0), (2000, 0.3, 0.2), (40, 0.3, 0.2)]:
        steps, every = plan_steps(seconds, step_s, val_s)
        assert cost(steps, every, step_s, val_s) <= seconds  # fits
        bigger = max(5, math.ceil((steps + 1) / VAL_POINTS))
        assert cost(steps + 1, bigger, step_s, val_s) > seconds  # and is the most that fits
        assert every >= 5 and math.ceil(steps / every) <= VAL_POINTS + 1
    assert plan_steps(170, 15.1, 12.0) == (9, 5)  # 2 validations, not 8: a short run still trains
    assert plan_steps(-5, 1.0, 1.0)[0] == 0
