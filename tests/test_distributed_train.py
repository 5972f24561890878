"""`torchrun -m stepflash train|sft` equals the single-process run of the same global batch.

The real CLI is launched through `python -m torch.distributed.run --standalone --nproc-per-node N` (gloo,
CPU) on the tiny preset; the reference is `train(...)` / `train_sft(...)` in this process. Compared:
per-step losses (and the balance-loss, gradient-norm and router-bias columns of metrics.jsonl), the
weights of the checkpoints, and resumption across world sizes in both directions:
- data parallel (2 x FSDP, --optimizer auto = Muon + AdamW) == one process with the same --batch-size (the
  global batch); its DCP checkpoint (Muon momentum included) resumes in a plain one-process run on the same
  loss curve as an uninterrupted run;
- expert parallel (--expert-parallel 2, balance loss on, its groups = the EP ranks), once with AdamW and once
  with Muon, resumes a plain one-process checkpoint and continues the curve of one process with two
  micro-batches of half the batch: a rank's balance loss is computed on its own half, exactly like a
  micro-batch's; 4 processes (dp 2 x ep 2, Muon) in a slow test;
- sft: 2 processes each on half of every step's conversations == one process on all of them.
Tight comparisons of the optimizers themselves on shards are in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import stepflash
from stepflash.distributed.launch import check_expert_parallel
from stepflash.errors import UserError
from stepflash.posttrain.sft import SFTArgs, train_sft
from stepflash.checkpoint import run as checkpointing
from stepflash.distributed import Runtime
from stepflash.training.loop import TrainArgs, train
from stepflash.training.optimizer import resolve_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 3e-3


# A constant lr after warmup (--min-lr-ratio 1), so a run stopped at step 2 and resumed with --steps 4 follows
# the schedule of an uninterrupted 4-step run.
COMMON = dict(preset="tiny", seq_len=32, lr=LR, warmup_steps=2, min_lr_ratio=1.0, eval_every=2, val_batches=2,
              log_every=1, save_every=2, keep_checkpoints=0, progress=False)


def _args(data_dir, out, **kw) -> TrainArgs:
    return TrainArgs(**{**COMMON, "data": data_dir, "out": str(out), **kw})


def _flags(args, positional: str = "") -> list[str]:
    """The CLI flags that reproduce the dataclass `args` (booleans as --x / --no-x), minus a positional field."""
    out = []
    for k, v in vars(args).items():
        if k == positional:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, list):
            out += [flag, *map(str, v)]
        elif v is not None:
            out += [flag, str(v)]
    return out


def _torchrun(verb: list[str], flags: list[str], nproc: int = 2) -> str:
    """Run `stepflash VERB FLAGS` under torchrun; returns its stdout (fails the test with its output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "stepflash", *verb, *flags]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout}\n{p.stderr[-4000:]}"
    return p.stdout


def _metrics(out) -> dict[int, dict]:
    with open(os.path.join(str(out), "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def assert_equal_but_isolated_elements(a: dict, b: dict, max_diff: float) -> None:
    """Same tensors but for isolated elements. Muon's update is a smooth function of the gradient, but AdamW
    (embeddings, heads, norms, router; all of RL) turns last-bit reduction noise on a near-zero gradient into
    a step of up to ~lr, so a handful of elements may differ by up to `max_diff` (2 lr per step); a real bug
    (a missing or doubled reduction, a wrong shard, data slice or share) moves most elements. Tight checks of
    the optimizers on shards: test_distributed.py."""
    assert set(a) == set(b)
    outliers = total = 0
    for name in a:
        diff = (a[name].float() - b[name].float()).abs()
        assert diff.max() <= max_diff, f"{name}: max {diff.max():.2e}"
        outliers += int((diff > 1e-5).sum())
        total += diff.numel()
    assert outliers <= 1e-3 * total, f"{outliers} of {total} elements differ by more than 1e-5"


def _assert_weights_close(path_a: str, path_b: str, steps: int) -> None:
    assert_equal_but_isolated_elements(stepflash.load_model(path_a).state_dict(),
                                       stepflash.load_model(path_b).state_dict(), 2 * LR * steps)


# ---- data parallel: 2 processes == 1 process on the same global batch; resume 2 -> 1 -----------------

@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One process, --batch-size 8, 4 steps, --optimizer auto (Muon + AdamW); the balance loss off (a product of
    batch means, it is not additive over ranks: the EP test covers it against micro-batches)."""
    out = tmp_path_factory.mktemp("ref")
    h = train(_args(data_dir, out, steps=4, batch_size=8, ep_loss_coef=0.0))
    return out, dict(h["losses"])


@pytest.fixture(scope="module")
def dp_run(data_dir, tmp_path_factory):
    """torchrun, 2 processes, --batch-size 8 (4 each), --optimizer auto (Muon at every world size), 2 steps."""
    out = tmp_path_factory.mktemp("dp2")
    stdout = _torchrun(["train"], _flags(_args(data_dir, out, steps=2, batch_size=8, ep_loss_coef=0.0)))
    return out, stdout


def test_data_parallel_train_matches_one_process(reference, dp_run):
    ref_out, ref_losses = reference
    out, stdout = dp_run
    assert stdout.count("trained to step 2") == 1  # only rank 0 reports
    got = _metrics(out)
    assert [got[s]["loss"] for s in (1, 2)] == pytest.approx([ref_losses[1], ref_losses[2]], rel=1e-5)
    assert ref_losses[2] < ref_losses[1] - 0.1  # it trains (two equal untrained runs could not fail)
    want = _metrics(ref_out)
    for s in (1, 2):
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=1e-4)
        assert got[s]["moe/L1/router_bias_absmax"] == pytest.approx(want[s]["moe/L1/router_bias_absmax"], rel=1e-5)
    assert got[2]["val_loss"] == pytest.approx(want[2]["val_loss"], rel=1e-5)  # same windows, split over ranks
    # The published checkpoint: DCP shards + trainer state + tokenizer, and (last save) the release layout too.
    path = checkpointing.latest_checkpoint(str(out))
    assert path.endswith("step_00000002") and checkpointing.is_sharded(path)
    for f in ("__0_0.distcp", "__1_0.distcp", "trainer_state.pt", "tokenizer.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(path, f)), f
    assert not [d for d in os.listdir(os.path.dirname(path)) if d.startswith(".tmp")]
    _assert_weights_close(path, os.path.join(str(ref_out), "checkpoints", "step_00000002"), 2)


def test_two_process_checkpoint_resumes_in_one_process(data_dir, reference, dp_run):
    ref_out, ref_losses = reference
    out, _ = dp_run
    # --optimizer auto takes the checkpoint's Muon; weights, Muon momentum and AdamW moments come from the DCP shards.
    h = train(_args(data_dir, out, steps=4, batch_size=8, ep_loss_coef=0.0, resume=True))
    assert [s for s, _ in h["losses"]] == [3, 4]
    assert [loss for _, loss in h["losses"]] == pytest.approx([ref_losses[3], ref_losses[4]], rel=1e-5)
    assert not checkpointing.is_sharded(h["checkpoint"])  # a plain run writes the release layout
    _assert_weights_close(h["checkpoint"], os.path.join(str(ref_out), "checkpoints", "step_00000004"), 4)
    with pytest.raises(UserError, match="trained with muon"):
        train(_args(data_dir, out, steps=5, batch_size=8, resume=True, optimizer="adamw"))


# ---- expert parallel: resume a one-process checkpoint at 2 processes, EP = 2 -------------------------

def _expert_parallel_resume(data_dir, tmp_path, nproc: int, optimizer: str) -> None:
    # Reference: one process, one micro-batch per rank (8 / nproc windows each) = the global batch of 8, balance
    # loss over 2 groups.
    ref = dict(steps=4, batch_size=8 // nproc, grad_accum=nproc, ep_groups=2, optimizer=optimizer,
               bias_update_rate=1e-2)
    full = train(_args(data_dir, tmp_path / "full", **ref))
    train(_args(data_dir, tmp_path / "ep", **{**ref, "steps": 2}))
    stdout = _torchrun(["train"], _flags(_args(data_dir, tmp_path / "ep", steps=4, batch_size=8, expert_parallel=2,
                                               bias_update_rate=1e-2, resume=True)), nproc)
    assert "trained to step 4" in stdout
    got, want = _metrics(tmp_path / "ep"), _metrics(tmp_path / "full")
    assert want[4]["loss"] < want[1]["loss"] - 0.1 and want[4]["ep_loss"] > 0
    for s in (3, 4):  # step 4 also checks the re-sharded optimizer state: it shapes step 3's update
        for key in ("loss", "ep_loss", "main_loss", "mtp_loss_0", "moe/L1/router_bias_absmax"):
            assert got[s][key] == pytest.approx(want[s][key], rel=1e-5), (s, key)
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=1e-4)
    assert [loss for _, loss in full["losses"][2:]] == pytest.approx([got[3]["loss"], got[4]["loss"]], rel=1e-5)
    _assert_weights_close(checkpointing.latest_checkpoint(str(tmp_path / "ep")), full["checkpoint"], 4)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_expert_parallel_resumes_a_one_process_run_on_the_same_curve(data_dir, tmp_path, optimizer):
    _expert_parallel_resume(data_dir, tmp_path, 2, optimizer)


@pytest.mark.slow
def test_four_processes_data_and_expert_parallel_muon(data_dir, tmp_path):
    """4 processes: dp 2 x ep 2 against one process with four micro-batches of 2 windows."""
    _expert_parallel_resume(data_dir, tmp_path, 4, "muon")


# ---- sft -----------------------------------------------------------------------------------------

def test_sft_under_torchrun_matches_one_process(tmp_path):
    kw = dict(task="arithmetic", num_examples=64, steps=3, batch_size=8, max_len=64, log_every=1, threads=1)
    ref = train_sft(SFTArgs(checkpoint="demo", out=str(tmp_path / "one"), **kw))
    stdout = _torchrun(["sft", "demo"], _flags(SFTArgs(checkpoint="demo", out=str(tmp_path / "two"), **kw), "checkpoint"))
    logged = [float(line.split(" loss ")[1].split()[0]) for line in stdout.splitlines() if line.startswith("sft step")]
    assert logged == pytest.approx(ref["losses"], abs=1e-4)  # printed with 4 decimals, by rank 0 only
    assert ref["losses"][-1] < ref["losses"][0]
    _assert_weights_close(str(tmp_path / "two"), str(tmp_path / "one"), 3)


# ---- flags that cannot work ----------------------------------------------------------------------

def test_launch_errors_are_one_sentence_user_errors(data_dir, tmp_path):
    with pytest.raises(UserError, match="needs several processes"):
        train(_args(data_dir, tmp_path, steps=1, batch_size=4, expert_parallel=2))
    with pytest.raises(UserError, match="must divide the number of processes"):
        check_expert_parallel(3, 4)
    with pytest.raises(UserError, match="routed experts"):
        check_expert_parallel(3, 3, num_experts=8)
    with pytest.raises(UserError, match="--ep-groups 4 must equal --expert-parallel 2"):
        train(_args(data_dir, tmp_path, steps=1, batch_size=4, expert_parallel=2, ep_groups=4), Runtime(world_size=2))
    with pytest.raises(UserError, match="multiple of the 2 processes"):
        train(_args(data_dir, tmp_path, steps=1, batch_size=3), Runtime(world_size=2))
    assert TrainArgs(expert_parallel=8).ep_groups == 8 and TrainArgs().ep_groups == 4
    assert resolve_optimizer("auto") == "muon" and resolve_optimizer("auto", saved="adamw") == "adamw"
    with pytest.raises(UserError, match="trained with adamw"):
        resolve_optimizer("muon", saved="adamw")


def test_a_user_error_under_torchrun_is_one_line_and_torchruns_root_cause():
    """Every rank raises it; rank 0 alone prints stepflash's line, and torchrun's own failure report (which it
    always prints for a non-zero exit) names the same line as the root cause instead of pointing at its docs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "stepflash",
           "train", "--preset", "tiny", "--steps", "0", "--out", "unused"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert out.count("stepflash train: error: --steps must be positive, got 0") == 1, out
    assert "traceback : UserError: --steps must be positive, got 0" in out, out
