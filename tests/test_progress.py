"""Progress bars over the engine's work (eval, RL rollouts): counts right, results unchanged, engine restored."""

import pytest
import torch

from stepflash.inference.engine import Engine
from stepflash.inference.progress import generation_progress
from stepflash.model import Step35ForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    from stepflash.config import tiny

    return Engine(Step35ForCausalLM(tiny()), max_batch_size=4)


def _prompts():
    return [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19]]  # more than the 4 batch slots


def test_the_bar_counts_finished_sequences_and_changes_nothing(engine, capsys):
    want = engine.generate(_prompts(), 6, temperature=0.0)
    with generation_progress(engine, len(_prompts()), "test", enabled=True) as bar:
        got = engine.generate(_prompts(), 6, temperature=0.0)
        seen = bar.n
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert seen == len(_prompts())
    assert "step" not in vars(engine)  # the class's own step again
    err = capsys.readouterr().err
    assert "test: 100%" in err and "6/6" in err and "tok/s" in err


def test_nested_bars_restore_the_outer_one_and_other_ranks_stay_quiet(engine, monkeypatch, capsys):
    with generation_progress(engine, 12, "outer", enabled=True) as outer:
        with generation_progress(engine, 6, "inner", enabled=True) as inner:
            engine.generate(_prompts(), 3)
        assert inner.n == 6
        engine.generate(_prompts(), 3)
        assert outer.n == 12
    assert "step" not in vars(engine)
    capsys.readouterr()
    monkeypatch.setenv("RANK", "1")
    with generation_progress(engine, 6, "rank1", enabled=True):
        engine.generate(_prompts(), 3)
    assert "rank1" not in capsys.readouterr().err


def test_eval_generation_goes_through_a_bar(tmp_path, monkeypatch):
    """The harness wraps the checkpoint policy's generation in a bar over all K x items sequences."""
    import stepflash.inference.progress as progress
    from stepflash.checkpoint import save_model
    from stepflash.config import make_config
    from stepflash.evaluation.harness import EvalArgs, evaluate
    from stepflash.tokenizer import train_tokenizer

    path = str(tmp_path / "ckpt")
    train_tokenizer(["What is 2 + 2? The answer is \\boxed{4}."] * 20, vocab_size=300, out_path=path)
    cfg = make_config(2, 64, full_heads=4, sliding_heads=4, kv_heads=2, head_dim=16, window=8, vocab=320,
                      inter=96, experts=4, top_k=2, moe_inter=32, max_pos=2048, rope_original=32)
    save_model(Step35ForCausalLM(cfg), path)
    bars = []
    real = progress.generation_progress

    def recorded(engine, total, desc, **kw):
        bars.append(desc)
        return real(engine, total, desc, **kw)

    monkeypatch.setattr(progress, "generation_progress", recorded)
    evaluate(EvalArgs(checkpoint=path, task="math", limit=3, samples=2, max_new_tokens=4, out=str(tmp_path / "o")))
    assert bars == ["eval math: generating"]
