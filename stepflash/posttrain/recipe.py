"""`stepflash recipe`: the report's specialise-then-consolidate post-training recipe, every stage scored by the
eval harness on every domain.

Stages, each a checkpoint directory under --out that `stepflash eval` and `generate` load:
  0_sft           the start: a given SFT checkpoint (copied), or `demo`: a ~2M-parameter model with 3 MTP
                  modules SFT'd from random weights on procedural conversations of all three domains, MTP
                  module 1 trained alongside (depth weights [1, 0, 0]);
  1_expert_DOMAIN RL (--expert-algo, GRPO by default) from 0_sft on one domain's tasks (math, code, tool);
  2_consolidated  the student: 0_sft fine-tuned on the union of the experts' verified samples (K per train
                  prompt of the expert's domain, kept when the verifier gives full reward), optionally with
                  logit distillation to the domain's expert (--kl-weight);
  3_final_mispo   MIS-PO from 2_consolidated on an equal mix of the three domains' tasks;
  4_mtp           MTP modules 2 and 3 cloned from module 1 and the three trained jointly, trunk frozen
                  (`stepflash.posttrain.mtp_phase`); the main model is unchanged.
After each stage the harness (`stepflash eval`, greedy) scores it on each domain's held-out split, written
once as eval JSONL under OUT/data (4_mtp is scored with MTP speculative decoding, --mtp 3, which must give
the same answers); the tool tasks are also scored by their RL verifier on the first turn alone ("tool_call":
the right call, whatever the final reply). A stage whose directory exists is complete (it is published by rename) and is skipped
on a re-run, as is every finished eval; interrupted RL stages resume from their own checkpoints.
OUT/results.json and OUT/results.md hold the stage x domain accuracy table, how much of each expert's
gain the student keeps, and the accepted MTP draft length before and after the MTP phase.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch

from stepflash.errors import UserError
from stepflash.posttrain.recipe_data import DOMAINS, domain_tasks, write_eval_set

STAGES = ("0_sft", "1_expert_math", "1_expert_code", "1_expert_tool", "2_consolidated", "3_final_mispo", "4_mtp")
POOL_CAP = {"math": 850, "code": 400}  # distinct train tasks: math ~900, code ~540 (the rest of the 1000 / ~600 held out)
TEST_CAP = {"math": 98, "code": 60}  # every held-out math and code task there is


@dataclass
class RecipeArgs:
    """SFT -> per-domain RL experts -> self-distilled student -> mixed MIS-PO -> MTP phase, each stage evaluated."""

    start: str = field(default="demo", metadata={"positional": True, "help": "an SFT checkpoint directory, or "
                                                 "'demo' to build the SFT start from procedural data"})
    out: str = field(default="runs/recipe", metadata={"help": "directory for the stages, evals and results"})
    train_tasks: int = field(default=3000, metadata={"help": "train-split tasks per domain (math: at most 850, "
                                                             "code: 400)"})
    test_tasks: int = field(default=100, metadata={"help": "held-out eval items per domain (math: at most 98, "
                                                           "code: 60)"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per reply (rollouts, samples, eval)"})
    batch_size: int = field(default=16, metadata={"help": "conversations per supervised step"})
    sft_steps: int = field(default=600, metadata={"help": "demo: SFT steps from random weights"})
    sft_lr: float = field(default=2e-3, metadata={"help": "demo: SFT peak learning rate"})
    mtp_weight: float = field(default=0.3, metadata={"help": "weight of MTP module 1's loss in SFT and consolidation"})
    expert_algo: str = field(default="grpo", metadata={"help": "RL algorithm of the experts: mispo, ppo or grpo "
                                                               "(the final stage is always MIS-PO)"})
    expert_steps: int = field(default=15, metadata={"help": "RL steps per expert"})
    prompts_per_step: int = field(default=16, metadata={"help": "RL prompts per step"})
    samples_per_prompt: int = field(default=8, metadata={"help": "RL samples per prompt"})
    actor_lr: float = field(default=3e-5, metadata={"help": "RL actor learning rate of the experts"})
    critic_lr: float = field(default=1e-3, metadata={"help": "RL critic learning rate"})
    distill_prompts: int = field(default=400, metadata={"help": "train prompts per domain the experts answer"})
    distill_samples: int = field(default=4, metadata={"help": "samples per prompt (K) from each expert"})
    student_steps: int = field(default=150, metadata={"help": "consolidation steps (the student starts from 0_sft)"})
    student_lr: float = field(default=5e-4, metadata={"help": "consolidation peak learning rate"})
    kl_weight: float = field(default=0.0, metadata={"help": "logit distillation: weight of KL(expert || student) "
                                                            "on the kept tokens (0 = off)"})
    final_steps: int = field(default=15, metadata={"help": "MIS-PO steps of the final mixed stage"})
    final_lr: float = field(default=1.5e-5, metadata={"help": "MIS-PO actor learning rate of the final stage"})
    mtp_steps: int = field(default=200, metadata={"help": "MTP phase steps (MTP modules only)"})
    mtp_lr: float = field(default=1e-3, metadata={"help": "MTP phase peak learning rate"})
    mtp_prompts: int = field(default=60, metadata={"help": "held-out prompts (all domains) for the accepted length"})
    tool_distractors: int = field(default=0, metadata={"help": "tool tasks: tools offered besides the needed one "
                                                                "(each adds ~60 prompt tokens)"})
    seed: int = field(default=0, metadata={"help": "seed of tasks, sampling and training"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1 suits a busy small machine)"})


@dataclass
class Context:
    args: RecipeArgs
    train: dict  # domain -> train-split tasks
    test: dict  # domain -> held-out tasks (the eval items)
    t0: float = field(default_factory=time.time)

    def path(self, *parts: str) -> str:
        return os.path.join(self.args.out, *parts)

    def say(self, msg: str) -> None:
        print(f"recipe [{time.time() - self.t0:6.0f}s] {msg}", flush=True)


def check_args(a: RecipeArgs) -> None:
    if a.start != "demo" and not os.path.isfile(os.path.join(a.start, "config.json")):
        raise UserError(f"START must be 'demo' or a checkpoint directory with config.json; got {a.start!r}")
    if a.expert_algo not in ("mispo", "ppo", "grpo"):
        raise UserError(f"--expert-algo must be mispo, ppo or grpo, got {a.expert_algo!r}")
    for name in ("train_tasks", "test_tasks", "max_new_tokens", "batch_size", "sft_steps", "expert_steps",
                 "prompts_per_step", "samples_per_prompt", "distill_prompts", "distill_samples", "student_steps",
                 "final_steps", "mtp_steps", "mtp_prompts"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.kl_weight < 0 or a.mtp_weight < 0 or a.tool_distractors < 0:
        raise UserError("--kl-weight, --mtp-weight and --tool-distractors must be >= 0")


def make_context(a: RecipeArgs) -> Context:
    def tasks(d, n, split):
        return domain_tasks(d, n, split, seed=a.seed, tool_distractors=a.tool_distractors)

    train = {d: tasks(d, min(a.train_tasks, POOL_CAP.get(d, a.train_tasks)), "train") for d in DOMAINS}
    test = {d: tasks(d, min(a.test_tasks, TEST_CAP.get(d, a.test_tasks)), "test") for d in DOMAINS}
    return Context(a, train, test)


# ---- checkpoints ------------------------------------------------------------------------------------

def done(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


# ---- stages -----------------------------------------------------------------------------------------

def stage_sft(ctx: Context, out: str) -> None:
    from stepflash.checkpoint.run import copy_model_dir, save_model_dir

    if ctx.args.start != "demo":
        copy_model_dir(ctx.args.start, out)
        return
    from stepflash.posttrain.recipe_stages import build_demo_start, reference_examples
    from stepflash.posttrain.recipe_train import train_supervised

    a = ctx.args
    model, tok, template, tok_dir = build_demo_start(ctx.train, ctx.path("work", "tokenizer"), a.seed)
    ctx.say(f"demo start: {model.num_parameters() / 1e6:.2f}M parameters, vocabulary {tok.get_vocab_size()}, "
            f"{model.config.num_nextn_predict_layers} MTP modules")
    examples = reference_examples(ctx.train, tok, template, model.config.max_position_embeddings)
    train_supervised(model, examples, tok.token_to_id("<|pad|>") or 0, a.sft_steps, a.sft_lr, a.batch_size,
                     mtp_weight=a.mtp_weight, seed=a.seed, log=ctx.say, log_every=100)
    save_model_dir(model, tok_dir, out)


def rl_stage(ctx: Context, name: str, start: str, tasks: list, algo: str, steps: int, lr: float) -> None:
    """RL from `start` on `tasks` in OUT/work/NAME (resumable), then publish the last policy as OUT/NAME."""
    from stepflash.checkpoint.run import copy_model_dir, latest_checkpoint
    from stepflash.rl.trainer import RLArgs, train_rl

    a = ctx.args
    run_dir = ctx.path("work", name)
    # Truncated answers score 0 (no R = V(s_T) bootstrap): with it, a small model learns to run to the limit
    # (docs/rl.md, "Truncated responses").
    rl = RLArgs(checkpoint=start, out=run_dir, algo=algo, steps=steps, prompts_per_step=a.prompts_per_step,
                samples_per_prompt=a.samples_per_prompt, max_new_tokens=a.max_new_tokens, actor_lr=lr,
                critic_lr=a.critic_lr, bootstrap_truncated=False, eval_every=0, save_every=5, seed=a.seed,
                threads=a.threads, max_batch_size=64)
    log_path = os.path.join(run_dir, "log.txt")
    os.makedirs(run_dir, exist_ok=True)
    with open(log_path, "a") as f:
        def log(line: str) -> None:
            f.write(line + "\n")
            f.flush()
            kv = line.split()
            if kv and kv[0] == "step" and "reward" in kv:
                rec = dict(zip(kv[::2], kv[1::2]))
                ctx.say(f"{name} step {rec.get('step')}/{steps} reward {rec.get('reward', '-')} "
                        f"entropy {rec.get('entropy', '-')} kept {rec.get('kept_fraction', '-')}")
        train_rl(rl, tasks, [], log=log)
    copy_model_dir(latest_checkpoint(run_dir), ctx.path(name))


def stage_expert(ctx: Context, domain: str, out: str) -> None:
    a = ctx.args
    rl_stage(ctx, os.path.basename(out), ctx.path(STAGES[0]), ctx.train[domain], a.expert_algo, a.expert_steps,
             a.actor_lr)


def stage_consolidate(ctx: Context, out: str) -> None:
    from stepflash.posttrain.recipe_stages import consolidate

    consolidate(ctx, out)


def stage_final(ctx: Context, out: str) -> None:
    n = min(len(ctx.train[d]) for d in DOMAINS)  # equal shares, interleaved
    mixed = [ctx.train[d][i] for i in range(n) for d in DOMAINS]
    rl_stage(ctx, os.path.basename(out), ctx.path(STAGES[4]), mixed, "mispo", ctx.args.final_steps, ctx.args.final_lr)


def stage_mtp(ctx: Context, out: str) -> None:
    from stepflash.posttrain.recipe_stages import mtp_stage

    mtp_stage(ctx, out)


def build_stage(ctx: Context, stage: str) -> None:
    out = ctx.path(stage)
    if done(out):
        ctx.say(f"{stage}: complete, skipped")
        return
    ctx.say(f"{stage}: start")
    t = time.time()
    if stage == "0_sft":
        stage_sft(ctx, out)
    elif stage.startswith("1_expert_"):
        stage_expert(ctx, stage.removeprefix("1_expert_"), out)
    elif stage == "2_consolidated":
        stage_consolidate(ctx, out)
    elif stage == "3_final_mispo":
        stage_final(ctx, out)
    else:
        stage_mtp(ctx, out)
    with open(ctx.path("work", f"{stage}.seconds"), "w") as f:
        f.write(f"{time.time() - t:.1f}\n")
    ctx.say(f"{stage}: done in {time.time() - t:.0f}s -> {out}")


# ---- evaluation and the run ---------------------------------------------------------------------

def eval_stage(ctx: Context, stage: str) -> dict[str, float]:
    """Greedy accuracy of a stage on every domain's held-out items (cached in OUT/evals/STAGE/DOMAIN)."""
    from stepflash.evaluation.harness import EvalArgs
    from stepflash.evaluation.harness import run as run_eval

    accs = {}
    for d in DOMAINS:
        out = ctx.path("evals", stage, d)
        if not os.path.isfile(os.path.join(out, "results.json")):
            run_eval(EvalArgs(checkpoint=ctx.path(stage), task=d, data=ctx.path("data", f"eval_{d}.jsonl"), out=out,
                              max_new_tokens=ctx.args.max_new_tokens, batch_size=32,
                              mtp=3 if stage == "4_mtp" else 0))
        with open(os.path.join(out, "results.json")) as f:
            accs[d] = json.load(f)["accuracy"]
    accs["tool_call"] = tool_call_accuracy(ctx, stage)
    ctx.say(f"{stage}: " + "  ".join(f"{d} {v:.3f}" for d, v in accs.items()))
    return accs


def tool_call_accuracy(ctx: Context, stage: str) -> float:
    """Greedy first-turn accuracy on the held-out tool tasks under the RL verifier (the right call, whatever
    the final reply says), cached in OUT/evals/STAGE/tool_call.json."""
    from stepflash.evaluation.generation import CheckpointPolicy
    from stepflash.rl.rollout import render_task

    path = ctx.path("evals", stage, "tool_call.json")
    if not os.path.isfile(path):
        policy = CheckpointPolicy(ctx.path(stage), max_new_tokens=ctx.args.max_new_tokens, batch_size=32)
        tasks = ctx.test["tool"]
        replies = policy.complete([policy.tokenizer.encode(render_task(policy.template, t), add_special_tokens=False).ids
                                   for t in tasks])
        rewards = [t.reward(r) if r is not None else 0.0 for t, r in zip(tasks, replies)]
        with open(path, "w") as f:
            json.dump({"accuracy": sum(rewards) / len(rewards), "items": len(rewards), "replies": replies}, f, indent=1)
    with open(path) as f:
        return json.load(f)["accuracy"]


def run(args: RecipeArgs) -> int:
    from stepflash.posttrain.recipe_report import write_results

    check_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ctx = make_context(args)
    os.makedirs(ctx.path("data"), exist_ok=True)
    os.makedirs(ctx.path("work"), exist_ok=True)
    for d in DOMAINS:
        write_eval_set(ctx.path("data", f"eval_{d}.jsonl"), d, ctx.test[d])
    ctx.say("held-out eval items: " + ", ".join(f"{d} {len(ctx.test[d])}" for d in DOMAINS)
            + "; train tasks: " + ", ".join(f"{d} {len(ctx.train[d])}" for d in DOMAINS))
    accuracy = {}
    for stage in STAGES:
        build_stage(ctx, stage)
        accuracy[stage] = eval_stage(ctx, stage)
    md = write_results(ctx, accuracy)
    print(md)
    ctx.say(f"done: {ctx.path('results.md')}")
    return 0
