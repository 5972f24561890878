"""The recipe's stages that are not plain RL runs: the demo start, consolidation and the MTP phase.

- `build_demo_start`: a digit-level BPE trained on the reference conversations of all three domains (saved
  with `compact_chat_template`, so every stage renders prompts the same way) and a fresh demo model
  (`sft.demo_config` with 3 MTP modules) sized to it;
- `consolidate`: each expert samples K completions per train prompt of its own domain (temperature 1); a
  completion is kept when the domain's verifier gives it full reward, duplicates dropped; the student
  (a fresh copy of 0_sft) is fine-tuned on the union of the kept conversations, optionally with
  KL(expert || student) on the kept tokens. Tool samples are the first turn only (the call the RL expert
  was trained on), followed by the env's result and the reference final reply;
- `mtp_stage`: accepted draft length (greedy speculative decoding, 3 drafts, held-out prompts of all
  domains) as the final model stands, after cloning module 1 into 2 and 3, and after training the MTP
  modules jointly on the reference conversations plus the verified samples.
"""

from __future__ import annotations

import json
import os
import random

import torch

from stepflash.posttrain.recipe_data import DOMAINS, compact_chat_template, conversation
from stepflash.training.batches import read_jsonl


def build_demo_start(train: dict, tok_dir: str, seed: int):
    """(model, tokenizer, chat template, tokenizer dir) of the demo start, from random weights."""
    from stepflash.chat import ChatTemplate
    from stepflash.model import Step35ForCausalLM
    from stepflash.posttrain.sft import build_task_tokenizer, demo_config
    from stepflash.tokenizer import TOKENIZER_CONFIG_FILE, save_tokenizer

    template = ChatTemplate(compact_chat_template())
    convs = [conversation(d, t) for d in DOMAINS for t in train[d]]
    tok = build_task_tokenizer([template.render(c["messages"], tools=c.get("tools"), add_generation_prompt=False)
                                for c in convs], vocab_size=1024)
    save_tokenizer(tok, tok_dir)
    cfg_path = os.path.join(tok_dir, TOKENIZER_CONFIG_FILE)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = template.source  # what eval, serve and RL read back
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    eos = [i for i in (tok.token_to_id("<|eos|>"), tok.token_to_id("<|im_end|>")) if i is not None]
    config = demo_config(tok.get_vocab_size(), mtp=3).replace(
        vocab_size=tok.get_vocab_size(), torch_dtype="float32", eos_token_id=eos,
        bos_token_id=tok.token_to_id("<|bos|>") or 0)
    torch.manual_seed(seed)
    model = Step35ForCausalLM(config)
    model.init_weights()
    return model.float(), tok, template, tok_dir


def reference_examples(train: dict, tok, template, max_len: int) -> dict:
    """The reference conversation of every train task, tokenized with its assistant mask, by domain."""
    from stepflash.posttrain.sft import tokenize_conversation

    return {d: [tokenize_conversation(tok, template, conversation(d, t), max_len) for t in train[d]] for d in DOMAINS}


# ---- consolidation ------------------------------------------------------------------------------

def verified_samples(expert_dir: str, domain: str, tasks: list, k: int, max_new_tokens: int, seed: int) -> list[dict]:
    """Conversations built from the expert's completions that the verifier accepts (reward 1), deduplicated."""
    from stepflash.evaluation.generation import CheckpointPolicy
    from stepflash.rl.rollout import render_task

    policy = CheckpointPolicy(expert_dir, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, batch_size=64)
    prompts = [policy.tokenizer.encode(render_task(policy.template, t), add_special_tokens=False).ids for t in tasks]
    replies = policy.complete([p for p in prompts for _ in range(k)])
    kept, seen = [], set()
    for i, reply in enumerate(replies):
        task = tasks[i // k]
        if reply is None or (task.key, reply) in seen or task.reward(reply) < 1.0:
            continue
        seen.add((task.key, reply))
        kept.append({"domain": domain, "task": task.key, **conversation(domain, task, reply=reply)})
    return kept


def load_union(ctx) -> list[dict]:
    """The kept samples of every expert (OUT/work/union.jsonl), sampled once and reused on a re-run."""
    path = ctx.path("work", "union.jsonl")
    if not os.path.isfile(path):
        a, rows = ctx.args, []
        rng = random.Random(a.seed)
        for d in DOMAINS:
            tasks = rng.sample(ctx.train[d], min(a.distill_prompts, len(ctx.train[d])))
            kept = verified_samples(ctx.path(f"1_expert_{d}"), d, tasks, a.distill_samples, a.max_new_tokens, a.seed)
            ctx.say(f"2_consolidated: expert {d} kept {len(kept)} of {len(tasks) * a.distill_samples} samples "
                    f"({len({r['task'] for r in kept})} of {len(tasks)} prompts)")
            rows += kept
        with open(path + ".tmp", "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
    return [row for _, row in read_jsonl(path, "verified samples")] if os.path.getsize(path) else []


def consolidate(ctx, out: str) -> None:
    from stepflash.chat import ChatTemplate
    from stepflash.checkpoint import load_model
    from stepflash.checkpoint.run import save_model_dir
    from stepflash.posttrain.recipe_train import train_supervised
    from stepflash.posttrain.sft import tokenize_conversation
    from stepflash.tokenizer import load_tokenizer

    a, sft_dir = ctx.args, ctx.path("0_sft")
    union = load_union(ctx)
    tok, template = load_tokenizer(sft_dir), ChatTemplate.from_checkpoint(sft_dir)
    student = load_model(sft_dir, dtype=torch.float32)
    limit = student.config.max_position_embeddings
    examples = {d: [tokenize_conversation(tok, template, r, limit) for r in union if r["domain"] == d] for d in DOMAINS}
    missing = [d for d in DOMAINS if not examples[d]]
    if missing:
        ctx.say(f"2_consolidated: warning: no verified samples for {', '.join(missing)}; the student sees none")
    if len(missing) == len(DOMAINS):
        ctx.say("2_consolidated: warning: nothing to train on; the student is 0_sft unchanged")
        save_model_dir(student, sft_dir, out)
        return
    teachers = None
    if a.kl_weight > 0:
        teachers = {d: load_model(ctx.path(f"1_expert_{d}"), dtype=torch.float32).eval() for d in DOMAINS}
    train_supervised(student, examples, tok.token_to_id("<|pad|>") or 0, a.student_steps, a.student_lr, a.batch_size,
                     mtp_weight=a.mtp_weight, teachers=teachers, kl_weight=a.kl_weight, seed=a.seed, log=ctx.say,
                     log_every=100)
    save_model_dir(student, sft_dir, out)


# ---- the MTP phase ------------------------------------------------------------------------------

def mtp_stage(ctx, out: str) -> None:
    from stepflash.chat import ChatTemplate
    from stepflash.checkpoint import load_model
    from stepflash.checkpoint.run import save_model_dir
    from stepflash.posttrain.mtp_phase import accepted_length, clone_mtp_modules, train_mtp_phase
    from stepflash.posttrain.sft import tokenize_conversation
    from stepflash.rl.rollout import render_task
    from stepflash.tokenizer import load_tokenizer

    a, src = ctx.args, ctx.path("3_final_mispo")
    tok, template = load_tokenizer(src), ChatTemplate.from_checkpoint(src)
    model = load_model(src, dtype=torch.float32)
    k = len(model.mtp_layers)
    per = max(1, a.mtp_prompts // len(DOMAINS))
    prompts = [tok.encode(render_task(template, t), add_special_tokens=False).ids for d in DOMAINS
               for t in ctx.test[d][:per]]
    stop = tuple(i for i in (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|eos|>")) if i is not None)
    measure = lambda: accepted_length(model, prompts, k, a.max_new_tokens, stop)  # noqa: E731
    report = {"k": k, "prompts": len(prompts), "before": measure()}
    clone_mtp_modules(model)
    report["after_clone"] = measure()
    limit = model.config.max_position_embeddings
    examples = [ex for d, exs in reference_examples(ctx.train, tok, template, limit).items() for ex in exs]
    examples += [tokenize_conversation(tok, template, r, limit) for r in load_union(ctx)]
    losses = train_mtp_phase(model, examples, tok.token_to_id("<|pad|>") or 0, a.mtp_steps, a.mtp_lr, a.batch_size,
                             seed=a.seed, log=ctx.say, log_every=50)
    report["after"] = measure()
    report["final_loss"] = sum(losses[-10:]) / len(losses[-10:])
    for name in ("before", "after_clone", "after"):
        r = report[name]
        ctx.say(f"4_mtp: {name}: mean accepted drafts {r['mean_accepted']:.3f} of {k} "
                f"(per position {', '.join(f'{x:.2f}' for x in r['acceptance_per_position'])})")
    with open(ctx.path("work", "mtp.json"), "w") as f:
        json.dump(report, f, indent=1)
    save_model_dir(model, src, out)
