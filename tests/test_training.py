import json
import math
import os

import pytest
import torch

import stepflash
from stepflash.config import tiny
from stepflash.errors import UserError
from stepflash.model import Step35ForCausalLM
from stepflash.checkpoint import run as checkpointing
from stepflash.training.loop import TrainArgs, TrainingDiverged, train
from stepflash.training.objective import compute_loss, mtp_targets
from stepflash.training.muon import Muon, orthogonalize
from stepflash.training.schedule import lr_factor


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(data_dir, out, **kw):
    base = dict(preset="tiny", data=data_dir, out=str(out), steps=8, batch_size=4, seq_len=32, lr=3e-3,
                warmup_steps=2, eval_every=0, val_batches=2, log_every=2, save_every=4, progress=False)
    base.update(kw)
    return TrainArgs(**base)


def test_default_validation_gives_a_curve(data_dir, tmp_path):
    h = train(_args(data_dir, tmp_path, steps=12, eval_every=-1, save_every=100))  # the CLI's default
    assert [v["step"] for v in h["val"]] == [2, 4, 6, 8, 10, 12]  # ceil(12 / 10) = every 2 steps
    h0 = train(_args(data_dir, tmp_path / "end", steps=4, eval_every=0, save_every=100))
    assert [v["step"] for v in h0["val"]] == [4]  # 0: only at the end


def test_loss_goes_down(data_dir, tmp_path):
    h = train(_args(data_dir, tmp_path, steps=30, eval_every=15))
    losses = [l for _, l in h["losses"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert h["val"][-1]["val_loss"] < h["val"][0]["val_loss"] < math.log(256)
    # the MTP modules learn too (they are trained through the MTP loss)
    assert h["val"][-1]["val_mtp_loss_0"] < math.log(256) - 1.0
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == sorted([*range(2, 31, 2), 15])  # log steps + the eval at 15
    last = records[-1]
    for key in ("loss", "grad_norm", "max_logit", "lr", "tokens_per_s", "val_loss", "mtp_loss_2",
                "moe/L1/load_max_over_mean", "moe/L3/dead_experts", "moe/L2/out_norm_max_over_median",
                "moe/L2/act_rms_min_over_median", "moe/L1/weight_norm_min_over_median"):
        assert key in last, key
    # the loss-free balancer moved the biases, and kept them centred
    model = stepflash.load_model(h["checkpoint"])
    for m in model.moe_modules:
        assert m.router_bias.abs().max() > 0 and abs(float(m.router_bias.mean())) < 1e-6


def test_resume_matches_an_uninterrupted_run(data_dir, tmp_path):
    full = train(_args(data_dir, tmp_path / "full"))

    class Crash(Exception):
        pass

    def crash_at_6(step, model, record):
        if step == 6:
            raise Crash

    with pytest.raises(Crash):
        train(_args(data_dir, tmp_path / "crashed"), on_step=crash_at_6)
    assert checkpointing.latest_checkpoint(str(tmp_path / "crashed")).endswith("step_00000004")
    resumed = train(_args(data_dir, tmp_path / "crashed", resume=True))
    assert [s for s, _ in resumed["losses"]] == [5, 6, 7, 8]
    for (s1, a), (s2, b) in zip(full["losses"][4:], resumed["losses"]):
        assert s1 == s2 and abs(a - b) < 1e-6, (s1, a, b)
    a = stepflash.load_model(full["checkpoint"]).state_dict()
    b = stepflash.load_model(resumed["checkpoint"]).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # metrics.jsonl of the resumed run has each step once
    steps = [json.loads(line)["step"] for line in open(tmp_path / "crashed" / "metrics.jsonl")]
    assert steps == [2, 4, 6, 8]


def test_grad_accumulation_equals_one_big_batch(data_dir, tmp_path):
    # EP loss off: it is a product of batch means, so it is not additive over micro-batches.
    big = train(_args(data_dir, tmp_path / "big", steps=3, batch_size=8, ep_loss_coef=0.0))
    acc = train(_args(data_dir, tmp_path / "acc", steps=3, batch_size=4, grad_accum=2, ep_loss_coef=0.0))
    for (_, a), (_, b) in zip(big["losses"], acc["losses"]):
        assert abs(a - b) < 1e-5


def test_mtp_module_j_predicts_token_t_plus_2_plus_j():
    window = torch.randint(0, 50, (2, 12))
    # logits that put all mass on window[t + 2 + j] give zero loss only with the documented shift
    for j in range(3):
        tgt = mtp_targets(window, j)
        assert tgt.shape == (2, 11 - 1 - j)
        for t in range(tgt.shape[1]):
            assert torch.equal(tgt[:, t], window[:, t + 2 + j])


def test_compute_loss_matches_a_naive_chain():
    torch.manual_seed(0)
    cfg = tiny()
    model = Step35ForCausalLM(cfg)
    window = torch.randint(0, cfg.vocab_size, (2, 10))
    w = (1.0, 0.5, 0.25)
    parts = compute_loss(model, window, mtp_weight=0.3, mtp_depth_weights=w, ep_coef=0.0)
    # Reference: walk the chain one position at a time with model.mtp and score window[t + 2 + j] explicitly.
    with torch.no_grad():
        x = window[:, :-1]  # [B, T]
        T = x.shape[1]
        h = model.trunk(x)
        main = torch.nn.functional.cross_entropy(model.head(h).reshape(-1, cfg.vocab_size), window[:, 1:].reshape(-1))
        ces, prev = [], h
        for j in range(3):
            n = T - 1 - j
            z, logits = model.mtp(j, x[:, 1 + j: 1 + j + n], prev[:, :n])
            nll = [torch.nn.functional.cross_entropy(logits[:, t], window[:, t + 2 + j]) for t in range(n)]
            ces.append(torch.stack(nll).mean())
            prev = z
    assert parts.main == pytest.approx(float(main), abs=1e-5)
    assert parts.mtp == pytest.approx([float(c) for c in ces], abs=1e-5)
    expected = main + 0.3 * sum(wj * c for wj, c in zip(w, ces)) / sum(w)
    assert float(parts.total.detach()) == pytest.approx(float(expected), abs=1e-5)


def test_nan_loss_is_caught_and_the_last_checkpoint_survives(data_dir, tmp_path):
    saved = {}

    def poison(step, model, record):
        if step == 4:
            saved.update({k: v.clone() for k, v in model.state_dict().items()})
        if step == 5:
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")

    with pytest.raises(TrainingDiverged, match="at step 6"):
        train(_args(data_dir, tmp_path, steps=10), on_step=poison)
    path = checkpointing.latest_checkpoint(str(tmp_path))
    assert path.endswith("step_00000004")
    state = stepflash.load_model(path).state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    last = json.loads(open(tmp_path / "metrics.jsonl").read().splitlines()[-1])
    assert last["step"] == 6 and "non-finite" in last["error"]


def test_loss_spike_skips_the_step(data_dir, tmp_path):
    def jolt(step, model, record):
        if step == 24:
            with torch.no_grad():
                model.lm_head.weight.mul_(60.0)

    h = train(_args(data_dir, tmp_path, steps=25, skip_spikes=True, spike_z=4.0, save_every=100), on_step=jolt)
    assert h["skipped"] == [25], h["losses"][-5:]


def test_crash_mid_save_leaves_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    train(_args(data_dir, tmp_path, steps=4))
    before = checkpointing.latest_checkpoint(str(tmp_path))
    real = checkpointing.save_model

    def dies_halfway(model, path, *a, **kw):
        real(model, path, *a, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing, "save_model", dies_halfway)
    with pytest.raises(OSError):
        train(_args(data_dir, tmp_path, steps=8, resume=True))
    assert checkpointing.latest_checkpoint(str(tmp_path)) == before
    assert [s for s, _ in checkpointing.list_checkpoints(str(tmp_path))] == [4]
    stepflash.load_model(before)  # still complete


def test_checkpoint_is_a_release_layout_with_tokenizer(data_dir, tmp_path):
    h = train(_args(data_dir, tmp_path, steps=4))
    path = h["checkpoint"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "trainer_state.pt"):
        assert os.path.isfile(os.path.join(path, f)), f
    with open(os.path.join(data_dir, "tokenizer.json"), "rb") as f:
        assert open(os.path.join(path, "tokenizer.json"), "rb").read() == f.read()
    model = stepflash.load_model(path)
    x = torch.randint(0, 256, (1, 8))
    assert torch.isfinite(model(x)).all()


def test_orthogonalize_matches_svd_polar_factor():
    torch.manual_seed(0)
    for shape in ((16, 32), (32, 16), (3, 8, 24)):
        g = torch.randn(*shape)
        o = orthogonalize(g)
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        polar = u @ vh
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.6 and s.max() < 1.25  # the quintic iteration's band around 1
        cos = (o * polar).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert (cos > 0.97).all()


def test_muon_step_is_the_scaled_polar_factor():
    p = torch.nn.Parameter(torch.zeros(8, 32))
    p.grad = torch.randn(8, 32)
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False)
    opt.step()
    expected = -0.1 * 0.2 * math.sqrt(32) * orthogonalize(p.grad)
    torch.testing.assert_close(p.detach(), expected)


def test_muon_treats_each_matrix_of_a_fused_weight_as_its_own():
    """A fused weight (q/k/v/gate rows in one parameter) steps exactly as its parts would unfused."""
    parts = [torch.nn.Parameter(torch.zeros(n, 16)) for n in (8, 4, 2)]
    fused = torch.nn.Parameter(torch.zeros(14, 16))
    for p in parts:
        p.grad = torch.randn(p.shape)
    fused.grad = torch.cat([p.grad for p in parts])
    Muon(parts, lr=0.1).step()
    Muon([fused], lr=0.1, row_splits={id(fused): [8, 4, 2]}).step()
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in parts]))
    whole = torch.nn.Parameter(torch.zeros(14, 16))
    whole.grad = fused.grad.clone()
    Muon([whole], lr=0.1).step()  # negative control: one 14 x 16 matrix is a different update
    assert not torch.allclose(whole, fused)


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)  # cosine midpoint: (1 + 0.1) / 2
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_default_corpus_is_prepared_once_and_cached(tmp_path, monkeypatch):
    import stepflash.training.documents as documents

    few = sorted(documents.builtin_corpus_files(), key=os.path.getsize)[:300]  # val holds 1 doc in 100
    monkeypatch.setattr(documents, "builtin_corpus_files", lambda: few)
    monkeypatch.setenv("STEPFLASH_CACHE", str(tmp_path / "cache"))
    h = train(_args(None, tmp_path / "run", steps=2))
    cached = tmp_path / "cache" / "data"
    (sub,) = os.listdir(cached)
    assert sub.endswith("-v256") and os.path.isfile(cached / sub / "meta.json")
    assert h["step"] == 2


def test_bad_arguments_are_user_errors(data_dir, tmp_path):
    with pytest.raises(UserError, match="ep-groups"):
        train(_args(data_dir, tmp_path, ep_groups=3))
    with pytest.raises(UserError, match="no checkpoint"):
        train(_args(data_dir, tmp_path / "empty", resume=True))
    with pytest.raises(UserError, match="neither a preset"):
        train(_args(data_dir, tmp_path, preset="nope"))


def test_plot_writes_pngs(data_dir, tmp_path):
    from stepflash.plot import plot_run

    train(_args(data_dir, tmp_path, steps=4))
    files = plot_run(str(tmp_path))
    names = {os.path.basename(f) for f in files}
    assert {"loss.png", "grad_norm.png", "moe_load_max_over_mean.png", "moe_dead_experts.png"} <= names
    for f in files:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_train_and_errors(data_dir, tmp_path, capsys):
    from stepflash.cli import main

    argv = ["train", "--preset", "tiny", "--data", data_dir, "--out", str(tmp_path), "--steps", "2", "--seq-len", "16",
            "--batch-size", "2", "--mtp-depth-weights", "1", "0", "0", "--no-progress"]
    assert main(argv) == 0
    assert "trained to step 2" in capsys.readouterr().out
    assert main(argv) == 2  # the run dir now holds a checkpoint: a fresh run must not overwrite it
    assert "pass --resume" in capsys.readouterr().err
    assert main(argv[:-1] + ["--no-progress", "--resume", "--steps", "3"]) == 0
    assert main(["train", "--preset", "flash", "--data", data_dir, "--out", str(tmp_path / "f")]) == 2
    assert "sharded" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_tiny_preset(tmp_path, monkeypatch, capsys):
    import stepflash.training.documents as documents
    from stepflash.demo import DemoArgs, demo

    few = sorted(documents.builtin_corpus_files(), key=os.path.getsize)[:300]
    monkeypatch.setattr(documents, "builtin_corpus_files", lambda: few)
    monkeypatch.setenv("STEPFLASH_CACHE", str(tmp_path / "cache"))
    out = demo(DemoArgs(minutes=1.3, out=str(tmp_path / "run"), preset="tiny", batch_size=4, seq_len=32,
                        max_new_tokens=8))
    assert out["after"]["val_loss"] < out["before"]["val_loss"]
    printed = capsys.readouterr().out
    assert "gives the same tokens as plain decoding: True" in printed and "decoding speed: plain" in printed
    assert "accepted drafts per step" in printed and "s/step (median, validations excluded) against the" in printed
    val_steps = [r["step"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "val_loss" in r]
    assert len(val_steps) >= 3 and val_steps[-1] == out["steps"]  # a validation curve, not one point


def test_init_from_loads_the_checkpoint_weights(data_dir, tmp_path):
    from stepflash.training.loop import build_model

    h = train(_args(data_dir, tmp_path / "a", steps=2))
    model = build_model(_args(data_dir, tmp_path / "b", init_from=h["checkpoint"]), torch.device("cpu"))
    ref = stepflash.load_model(h["checkpoint"]).state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    with pytest.raises(UserError, match="does not fit"):
        build_model(_args(data_dir, tmp_path / "c", preset="small", init_from=h["checkpoint"]), torch.device("cpu"))


# ---- precision, activation checkpointing, Muon's variants, resuming to --steps -----------------------

def test_bf16_and_activation_checkpointing_keep_the_loss_curve_and_cut_memory(data_dir, tmp_path):
    """One process: --precision bf16 (autocast; fp32 weights, norms and router) follows the fp32 loss curve to
    bf16's tolerance; --activation-checkpointing selective / full follows it to float noise (the recomputation
    is the same arithmetic). Each saves memory: the peak tensor memory of a forward + backward drops, most
    with full checkpointing."""
    from stepflash.distributed import Runtime
    from stepflash.training.loop import forward_backward, setup
    from stepflash.training.monitors import PeakMemory

    variants = {"fp32": {}, "bf16": {"precision": "bf16"}, "selective": {"activation_checkpointing": "selective"},
                "full": {"activation_checkpointing": "full"}}
    curves, peaks = {}, {}
    for name, kw in variants.items():
        run = setup(_args(data_dir, tmp_path / f"mem_{name}", batch_size=8, seq_len=64, **kw), Runtime(), None, None)
        batch = run.sampler.next_batch()
        with PeakMemory() as pm:
            forward_backward(run, [batch])
        peaks[name] = pm.peak
        h = train(_args(data_dir, tmp_path / name, steps=6, **kw))
        curves[name] = [loss for _, loss in h["losses"]]
    for name in ("selective", "full"):
        assert curves[name] == pytest.approx(curves["fp32"], rel=1e-6), name
    assert curves["bf16"] == pytest.approx(curves["fp32"], rel=2e-2)
    assert curves["bf16"] != pytest.approx(curves["fp32"], rel=1e-5)  # bf16 really was in effect
    assert curves["fp32"][-1] < curves["fp32"][0] - 0.3
    assert peaks["full"] < peaks["selective"] < 0.85 * peaks["fp32"], peaks
    assert peaks["bf16"] < 0.9 * peaks["fp32"], peaks


def test_bad_precision_and_checkpointing_flags(data_dir, tmp_path):
    with pytest.raises(UserError, match="--precision must be one of auto, fp32, bf16"):
        train(_args(data_dir, tmp_path, precision="fp8"))
    with pytest.raises(UserError, match="--activation-checkpointing must be one of none, selective, full"):
        train(_args(data_dir, tmp_path, activation_checkpointing="some"))
    with pytest.raises(UserError, match="--muon-iteration"):
        train(_args(data_dir, tmp_path, muon_iteration="newton"))


def test_polar_express_converges_to_the_polar_factor_in_every_precision():
    """The report's iteration (Polar Express, arXiv 2505.16932) reaches U V^T far more closely than Jordan's
    quintic, whose singular values stay in a band around 1; fp16 and bf16 keep the direction."""
    torch.manual_seed(0)
    for shape in ((16, 48), (48, 16), (4, 12, 40)):
        g = torch.randn(*shape)
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        polar = u @ vh
        pe, ns = orthogonalize(g, steps=8, iteration="polar-express"), orthogonalize(g, steps=8)
        assert (pe - polar).abs().max() < 0.05 < (ns - polar).abs().max()
        for dtype in (torch.float16, torch.bfloat16):
            o = orthogonalize(g, steps=5, dtype=dtype, iteration="polar-express")
            assert o.dtype == torch.float32 and torch.isfinite(o).all()
            cos = (o * polar).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
            assert (cos > 0.97).all(), (shape, dtype)


def test_muon_flags_reach_the_optimizer(data_dir, tmp_path):
    from stepflash.distributed import Runtime
    from stepflash.training.loop import setup

    run = setup(_args(data_dir, tmp_path, muon_precision="fp16", muon_iteration="polar-express"), Runtime(), None, None)
    muon = [o for o in run.opt.optimizers if isinstance(o, Muon)][0]
    assert (muon.ns_dtype, muon.iteration, run.kind) == (torch.float16, "polar-express", "muon")
    h = train(_args(data_dir, tmp_path / "pe", steps=4, muon_precision="fp16", muon_iteration="polar-express"))
    assert h["losses"][-1][1] < h["losses"][0][1]


def test_resume_steps_is_the_schedule_total(data_dir, tmp_path, capsys):
    """--steps on --resume is where the run ends: fewer than done is refused in one line naming the step, as
    many trains nothing and says so (no NaN validation loss), more continues."""
    from stepflash.cli import main

    train(_args(data_dir, tmp_path, steps=4))
    with pytest.raises(UserError, match="already at step 4: .* pass --steps 4 or more .*got --steps 2"):
        train(_args(data_dir, tmp_path, steps=2, resume=True))
    argv = ["train", "--preset", "tiny", "--data", data_dir, "--out", str(tmp_path), "--seq-len", "32",
            "--batch-size", "4", "--no-progress", "--resume"]
    assert main(argv + ["--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and "already at step 4" in out and "nan" not in out
    assert main(argv + ["--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already at step 4" in err
    h = train(_args(data_dir, tmp_path, steps=6, resume=True))
    assert [s for s, _ in h["losses"]] == [5, 6]
