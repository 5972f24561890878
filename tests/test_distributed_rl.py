"""RL under torchrun (2 processes, gloo) equals the one-process run of the same flags and seed.

A random model scores 0 on the built-in verifiers, which would leave every gradient zero, so the
comparisons run `train_rl` with a scripted reward (the share of low token ids in a response, as in
test_rl_trainer): this file is also the torchrun script (`python -m torch.distributed.run ... THIS_FILE
ARGS_JSON`). The reference is `train_rl` in this process. Compared: every logged metric (rollout reward
and acceptance rates, losses, grad norms, value loss, explained variance, held-out accuracies greedy and
sampled) and the saved policy and critic weights. The mispo run uses stale rollouts (acceptance < 1), a
KL term, 7 actor mini-batches of a 16-sample batch (one of them a single row: a rank with no rows still
takes the step) and resumes a checkpoint at 2 processes; grpo uses per-sequence normalisation. One short
`torchrun -m stepflash rl --task arithmetic` run checks the CLI itself. Under torchrun the updates run
through torch's DDP (`Runtime.replicate`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import asdict

import pytest
import torch

from stepflash.errors import UserError
from stepflash.rl.rollout import task_reward
from stepflash.tasks.generators import Task
from stepflash.rl.trainer import RLArgs, _train_rl, train_rl
from test_distributed_train import assert_equal_but_isolated_elements

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASKS = [Task(f"say something {i}", "", "arithmetic", key=str(i)) for i in range(16)]
LR = 3e-3


def low_id_reward(task, text, ids):
    return sum(t < 128 for t in ids) / max(len(ids), 1)


def scripted(a: RLArgs) -> list[dict]:
    return train_rl(a, TASKS, TASKS[:5], reward_fn=low_id_reward, log=print)


@pytest.fixture(scope="module")
def ckpt(rl_ckpt):
    return rl_ckpt


def args(ckpt, out, **kw) -> RLArgs:
    base = dict(checkpoint=ckpt, out=str(out), steps=2, prompts_per_step=4, samples_per_prompt=4, max_new_tokens=6,
                actor_lr=LR, critic_lr=1e-2, actor_minibatches=2, critic_minibatches=3, eval_every=0, save_every=1,
                max_batch_size=32, threads=1)
    return RLArgs(**{**base, **kw})


def _torchrun(argv: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *argv]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[:4000]}\n...\n{p.stderr[-1000:]}"
    return p.stdout


def torchrun_scripted(jobs: list[RLArgs]) -> str:
    """Run `scripted` on each of `jobs` in turn, in one 2-process launch (one torchrun start-up for all)."""
    return _torchrun([os.path.abspath(__file__), json.dumps([asdict(a) for a in jobs])])


def _metrics(out) -> list[dict]:
    with open(os.path.join(str(out), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        keys = {k for k in w if not k.endswith("_s")}  # timings differ
        assert keys == {k for k in g if not k.endswith("_s")}
        for k in keys:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (w["step"], k, g[k], w[k])


def assert_same_weights(out_a, out_b, max_lr: float = 1e-2, steps: int = 2) -> None:
    """Policy weights of the latest checkpoints (and the critic, when there is one), equal but for isolated
    elements where AdamW amplified last-bit gradient differences."""
    from stepflash.checkpoint import load_model
    from stepflash.checkpoint.run import STATE_FILE, latest_checkpoint

    pa, pb = latest_checkpoint(str(out_a)), latest_checkpoint(str(out_b))
    assert os.path.basename(pa) == os.path.basename(pb)
    a, b = load_model(pa).state_dict(), load_model(pb).state_dict()
    ca, cb = (torch.load(os.path.join(p, STATE_FILE), weights_only=False)["critic"] for p in (pa, pb))
    if ca is not None:
        a.update({"critic." + k: v for k, v in ca.items()})
        b.update({"critic." + k: v for k, v in cb.items()})
    assert_equal_but_isolated_elements(a, b, 2 * max_lr * steps)


MISPO = dict(algo="mispo", staleness=1, kl_coef=0.01, actor_minibatches=7, eval_samples=2, eval_every=1,
             traj_bounds=[0.99, 1.01])
GRPO = dict(algo="grpo", normalization="sequence", actor_minibatches=3, actor_lr=1e-2)


@pytest.fixture(scope="module")
def runs(ckpt, tmp_path_factory):
    """One-process references, and the same jobs in one torchrun launch; the mispo job at 2 processes resumes
    the step-1 checkpoint of a one-process run (the checkpoint layout does not depend on the world size)."""
    root = tmp_path_factory.mktemp("runs")
    for algo, kw in (("mispo", MISPO), ("grpo", GRPO)):
        scripted(args(ckpt, root / f"{algo}_one", **kw))
    scripted(args(ckpt, root / "mispo_two", **{**MISPO, "steps": 1}))
    stdout = torchrun_scripted([args(ckpt, root / "mispo_two", **MISPO), args(ckpt, root / "grpo_two", **GRPO)])
    return root, stdout


def test_mispo_two_processes_equal_one(runs):
    root, stdout = runs
    assert stdout.count("resumed from") == 1 and stdout.count("step 2 reward") == 2  # rank 0 logs, each job
    want = _metrics(root / "mispo_one")
    assert_same_metrics(_metrics(root / "mispo_two"), want)
    # It is a real test: learning happened, the stale step rejects some trajectories, sampled != greedy.
    assert want[2]["grad_norm"] > 0 and want[2]["kl_ref"] > 0 and want[2]["value_loss"] > 0
    assert want[2]["traj_accept_rate"] < 1 and want[2]["mean_abs_log_ratio"] > 1e-3
    assert want[2]["test_accuracy"] != want[2]["test_accuracy_sampled"]
    assert_same_weights(root / "mispo_two", root / "mispo_one")


def test_grpo_two_processes_equal_one(runs):
    root, _ = runs
    want = _metrics(root / "grpo_one")
    assert want[2]["clip_fraction"] > 0 and want[1]["grad_norm"] > 0
    assert_same_metrics(_metrics(root / "grpo_two"), want)
    assert_same_weights(root / "grpo_two", root / "grpo_one")


@pytest.mark.slow  # ~25 s on a busy 2-core machine, almost all of it the torchrun start-up
def test_cli_under_torchrun(ckpt, tmp_path):
    a = RLArgs(checkpoint=ckpt, out=str(tmp_path / "one"), task="arithmetic", steps=1, prompts_per_step=2,
               samples_per_prompt=2, max_new_tokens=4, num_test_tasks=3, eval_samples=2, actor_lr=LR,
               actor_minibatches=2, critic_minibatches=2, max_batch_size=16, threads=1)
    train_rl(a, log=lambda s: None)
    stdout = _torchrun(["-m", "stepflash", "rl", ckpt, "--out", str(tmp_path / "two"), "--task", "arithmetic",
                        "--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens",
                        "4", "--num-test-tasks", "3", "--eval-samples", "2", "--actor-lr", str(LR),
                        "--actor-minibatches", "2", "--critic-minibatches", "2", "--max-batch-size", "16",
                        "--threads", "1"])
    assert stdout.count("rl done") == 1
    assert_same_metrics(_metrics(tmp_path / "two"), _metrics(tmp_path / "one"))


def test_prompts_must_split_evenly(ckpt, tmp_path):
    two_ranks = types.SimpleNamespace(world_size=2, is_main=True)
    with pytest.raises(UserError, match="multiple of the 2 processes"):
        _train_rl(args(ckpt, tmp_path, prompts_per_step=3), TASKS, [], task_reward, print, two_ranks)


if __name__ == "__main__":  # one rank of `python -m torch.distributed.run ... THIS_FILE JOBS_JSON`
    import torch.distributed as dist

    from stepflash.distributed import init_distributed

    init_distributed("gloo")  # one group for all jobs: train_rl's session uses it and leaves it running
    for job in json.loads(sys.argv[1]):
        scripted(RLArgs(**job))
    dist.destroy_process_group()
