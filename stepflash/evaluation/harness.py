"""`stepflash eval [CHECKPOINT] --task math|code|tool [--data FILE.jsonl] [--out DIR] [--samples K] ...`

Runs one task's items through a checkpoint (or scores completions made elsewhere, `--predictions`) and
writes DIR/results.json (accuracy, pass@1, unbiased pass@k for K > 1, counts, timing, settings) and
DIR/records.jsonl (one line per item: prompt, reference, completion, extracted answer, verdict, reason;
with K > 1 every sample under "samples"). Without --data the built-in sample set of the task is used.

Generation: prompts are rendered with the checkpoint's chat template and tokenized with its
tokenizer.json; all K samples of all items go through the Engine in one batched call (tool tasks: one
call per turn over the episodes still running); `--mtp K` turns on MTP self-speculative decoding.
Scoring uses the RL verifiers (math_eval.py, code_eval.py) and the simulated tool envs (tool_eval.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from stepflash.errors import UserError
from stepflash.evaluation.code_eval import code_messages, score_code
from stepflash.evaluation.items import builtin_path, check_task, load_items, load_predictions
from stepflash.evaluation.math_eval import math_messages, score_math
from stepflash.evaluation.scoring import Verdict, summarize
from stepflash.evaluation.tool_eval import MAX_TURNS, replay, run_episodes, score_episode, start_episode
from stepflash.tasks.sandbox import isolation_level, set_unsafe_no_sandbox


@dataclass
class EvalArgs:
    """Score a checkpoint (or completions from elsewhere) on math, code or tool-use items."""
    checkpoint: str | None = field(default=None, metadata={
        "positional": True, "help": "checkpoint directory with tokenizer.json (not needed with --predictions)"})
    task: str = field(default="math", metadata={"help": "math, code or tool"})
    data: str | None = field(default=None, metadata={"help": "items as JSONL (default: the built-in sample set)"})
    out: str = field(default="eval_out", metadata={"help": "directory for results.json and records.jsonl"})
    samples: int = field(default=1, metadata={"help": "completions per item (K > 1 reports pass@k)"})
    max_new_tokens: int = field(default=1024, metadata={"help": "tokens per reply at most"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (use > 0 with --samples > 1)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    seed: int = field(default=0, metadata={"help": "sampling seed (sample i of the batch uses seed + i)"})
    mtp: int = field(default=0, metadata={"help": "MTP draft tokens per step (0 = off, up to 3)"})
    predictions: str | None = field(default=None, metadata={
        "help": "JSONL of {\"completion\": ...} or {\"completions\": [...]} per item, scored without a model"})
    limit: int = field(default=0, metadata={"help": "use only the first N items (0 = all)"})
    max_turns: int = field(default=MAX_TURNS, metadata={"help": "tool task: assistant replies per episode at most"})
    batch_size: int = field(default=8, metadata={"help": "sequences the engine decodes at once"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default: as stored)"})
    chat_template: str = field(default="auto", metadata={
        "help": "'auto' (the checkpoint's), 'builtin' (Step 3.5's) or a Jinja file"})
    unsafe_no_sandbox: bool = field(default=False, metadata={
        "help": "code task: run the programs without the sandbox's isolation (only inside a container of your own)"})


MESSAGES = {"math": math_messages, "code": code_messages}
SCORERS = {"math": score_math, "code": score_code}


def _check_args(args: EvalArgs, need_model: bool) -> None:
    check_task(args.task)
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.max_turns < 1:
        raise UserError(f"--max-turns must be >= 1, got {args.max_turns}")
    if need_model and args.predictions is None and args.checkpoint is None:
        raise UserError("give a CHECKPOINT to generate with, or --predictions FILE.jsonl to score")
    if args.predictions is not None and args.checkpoint is not None:
        raise UserError("give either a CHECKPOINT or --predictions, not both")


def _make_policy(args: EvalArgs):
    from stepflash.evaluation.generation import CheckpointPolicy

    return CheckpointPolicy(args.checkpoint, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, mtp=args.mtp, batch_size=args.batch_size,
                            device=args.device, dtype=args.dtype, chat_template=args.chat_template)


def _progress(policy, total: int, desc: str, leave: bool = True):
    """A bar over the sequences the policy's engine finishes (none for policies without one)."""
    from stepflash.inference.progress import generation_progress

    engine = getattr(policy, "engine", None)
    return generation_progress(engine, total, desc, leave=leave) if engine is not None else nullcontext()


def _text_completions(args: EvalArgs, items: list[dict], policy) -> list[list[str]]:
    """K completions per math/code item, generated in one batch."""
    k = args.samples
    prompts = [policy.encode(MESSAGES[args.task](item)) for item in items]
    with _progress(policy, len(prompts) * k, f"eval {args.task}: generating"):
        replies = policy.complete([p for p in prompts for _ in range(k)])
    for i, r in enumerate(replies):
        if r is None:
            raise UserError(f"item on line {items[i // k]['_line']} does not fit the model's context")
    return [replies[i * k:(i + 1) * k] for i in range(len(items))]


def _respond_with_progress(policy):
    """The tool-episode policy, with a bar per turn over the episodes still running."""
    turn = 0

    def respond(active):
        nonlocal turn
        turn += 1
        with _progress(policy, len(active), f"eval tool: turn {turn}", leave=False):
            return policy.respond(active)

    return respond


def evaluate(args: EvalArgs, policy=None) -> tuple[list[dict], list[list[Verdict]], dict]:
    """Items, verdicts[item][sample] and timing. `policy` overrides the checkpoint (for tests and embedders)."""
    _check_args(args, need_model=policy is None)
    if args.task == "code":  # refuse before any generation when programs cannot be confined here
        set_unsafe_no_sandbox(args.unsafe_no_sandbox)
        isolation_level()
    items = load_items(args.task, args.data, args.limit)
    t0 = time.perf_counter()
    scripted = load_predictions(args.predictions, len(items), args.task) if args.predictions else None
    if scripted is None and policy is None:
        policy = _make_policy(args)
    t_load = time.perf_counter()
    if args.task == "tool":
        k = len(scripted[0]) if scripted else args.samples
        episodes = [start_episode(item, scripted[i][j] if scripted else None)
                    for i, item in enumerate(items) for j in range(k)]
        run_episodes(episodes, replay if scripted else _respond_with_progress(policy), args.max_turns)
        t_gen = time.perf_counter()
        flat = [(ep.replies, score_episode(ep)) for ep in episodes]
    else:
        completions = scripted if scripted else _text_completions(args, items, policy)
        k = len(completions[0])
        t_gen = time.perf_counter()
        pairs = [(item, c) for item, cs in zip(items, completions) for c in cs]
        flat = [(c, SCORERS[args.task](item, c))
                for item, c in tqdm(pairs, desc=f"eval {args.task}: scoring", unit="sample", disable=None)]
    t_score = time.perf_counter()
    for (completion, verdict) in flat:
        verdict.details["completion"] = completion
    verdicts = [[v for _, v in flat[i * k:(i + 1) * k]] for i in range(len(items))]
    timing = {"load_s": t_load - t0, "generation_s": t_gen - t_load, "scoring_s": t_score - t_gen}
    if policy is not None and hasattr(policy, "generated_tokens"):
        timing["generated_tokens"] = policy.generated_tokens
        timing["engine_s"] = policy.generation_s
        timing["tokens_per_s"] = policy.generated_tokens / policy.generation_s if policy.generation_s else 0.0
    return items, verdicts, timing


def _prompt_and_reference(task: str, item: dict) -> tuple[str, object]:
    if task == "math":
        return item["problem"], item["answer"]
    if task == "code":
        return item["prompt"], item["tests"]
    return item["task"], item["goal"]


def _sample_record(v: Verdict) -> dict:
    details = dict(v.details)
    rec = {"completion": details.pop("completion"), "answer": v.answer, "correct": v.correct, "score": v.score,
           "reason": v.reason}
    return {**rec, **details}


def records(task: str, items: list[dict], verdicts: list[list[Verdict]]) -> list[dict]:
    out = []
    for i, (item, vs) in enumerate(zip(items, verdicts)):
        prompt, reference = _prompt_and_reference(task, item)
        rec = {"index": i, "line": item["_line"], "prompt": prompt, "reference": reference, **_sample_record(vs[0])}
        if len(vs) > 1:
            rec["num_correct"] = sum(v.correct for v in vs)
            rec["samples"] = [_sample_record(v) for v in vs]
        out.append(rec)
    return out


def write_outputs(out_dir: str, results: dict, recs: list[dict]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "records.jsonl"), "w", encoding="utf-8") as f:
        for rec in recs:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        f.write("\n")


def run(args: EvalArgs, policy=None) -> int:
    t0 = time.perf_counter()
    if args.samples > 1 and args.temperature == 0 and args.predictions is None:
        print("stepflash eval: note: --samples > 1 with greedy decoding gives identical samples; "
              "set --temperature", file=sys.stderr)
    items, verdicts, timing = evaluate(args, policy)
    timing["total_s"] = time.perf_counter() - t0
    results = {"task": args.task, "data": args.data or builtin_path(args.task),
               "source": args.predictions or args.checkpoint or "policy", **summarize(verdicts), "timing": timing,
               "settings": {k: v for k, v in asdict(args).items() if k not in ("task", "data", "out")}}
    write_outputs(args.out, results, records(args.task, items, verdicts))
    ks = " ".join(f"{k} {v:.3f}" for k, v in results.items() if k.startswith("pass@"))
    print(f"{args.task}: {results['correct']}/{results['samples']} correct, accuracy {results['accuracy']:.3f}, "
          f"{ks} -> {os.path.join(args.out, 'results.json')}")
    return 0
