"""The late MTP phase of the report: clone MTP module 1 into modules 2 and 3, then train the three jointly.

Pre-training (and our SFT) trains only the first MTP module (depth weights [1, 0, 0]); the report then
copies it into the second and third and trains all three together in a short final phase, so the chain
can draft three tokens. Here:
- `clone_mtp_modules` copies module 1's weights (block, enorm/hnorm, eh_proj, its own head) into the
  others; a copy starts as a fair guess for token t+3 and t+4, far better than the untrained modules;
- `train_mtp_phase` trains only the MTP layers on chat conversations (assistant tokens only, the ones
  drafts are made for) with the teacher-forced chain loss, trunk, embedding and lm_head frozen, so the
  model's own outputs cannot change (greedy generation is bit-identical before and after);
- `accepted_length` measures what the phase is for: the mean number of draft tokens the engine's
  speculative decoding (greedy, k drafts) accepts per verify step on held-out prompts.

`stepflash mtp CHECKPOINT --data convs.jsonl --out DIR` runs it on its own; the recipe's last stage calls
`train_mtp_phase`. The loop is the shared training core's (`stepflash.training`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from stepflash.errors import UserError
from stepflash.training.batches import ShuffledBatches
from stepflash.training.losses import masked_cross_entropy
from stepflash.training.monitors import StepLog
from stepflash.training.schedule import lr_factor, set_lr


# ---- the pieces ---------------------------------------------------------------------------------

@torch.no_grad()
def clone_mtp_modules(model, src: int = 0) -> None:
    """Copy MTP module `src` (0-based; the report's module 1) into every other MTP module."""
    layers = model.mtp_layers
    if len(layers) < 2:
        raise UserError(f"cloning needs at least 2 MTP modules; the model has {len(layers)} "
                        "(num_nextn_predict_layers in config.json)")
    state = layers[src].state_dict()
    for j, layer in enumerate(layers):
        if j != src:
            layer.load_state_dict(state)


def mtp_parameters(model) -> list[torch.nn.Parameter]:
    return [p for layer in model.mtp_layers for p in layer.parameters()]


def masked_mtp_losses(model, ids: torch.Tensor, target_mask: torch.Tensor, h: torch.Tensor,
                      depth: int | None = None) -> list[torch.Tensor]:
    """Cross entropy of MTP modules 0..depth-1 over target tokens, each a scalar.

    ids [B, S] (a padded batch), target_mask [B, S-1] (1 where ids[:, t+1] is a trained token, as `sft_batch`
    makes it), h = model.trunk(ids[:, :-1]) [B, S-1, hidden]. Module j at position t predicts ids[:, t+2+j]
    (`objective.mtp_targets` on the window ids); its mask is target_mask[:, 1+j:]."""
    return [masked_cross_entropy(logits, ids[:, 2 + j:], target_mask[:, 1 + j:])
            for j, logits in enumerate(model.mtp_logits(ids[:, :-1], h, depth))]  # [B, T-1-j, V]


@torch.no_grad()
def accepted_length(model, prompts: list[list[int]], k: int = 3, max_new_tokens: int = 48,
                    stop_ids: tuple[int, ...] = (), batch_size: int = 32) -> dict:
    """Greedy MTP speculative decoding with k drafts on `prompts`: mean accepted drafts per verify step
    (0..k), the acceptance rate of each draft position, and tokens emitted per trunk forward."""
    from stepflash.inference.engine import Engine

    if k < 1 or k > len(model.mtp_layers):
        raise UserError(f"k must be in 1..{len(model.mtp_layers)} (the model's MTP modules), got {k}")
    was_training = model.training
    engine = Engine(model, max_batch_size=batch_size, adaptive_drafts=False)  # k drafts every step
    accepted = steps = 0
    pos_acc, pos_tried = [0.0] * k, [0.0] * k
    for i in range(0, len(prompts), batch_size):
        for r in engine.generate(prompts[i:i + batch_size], max_new_tokens, temperature=0.0,
                                 stop_token_ids=stop_ids, speculative_tokens=k):
            s = r.stats
            accepted += s["mean_accepted"] * s["verify_steps"]
            steps += s["verify_steps"]
            # acceptance_per_position is accepted/tried per position; weight by verify steps as an estimate
            for j, rate in enumerate(s["acceptance_per_position"][:k]):
                pos_acc[j] += rate * s["verify_steps"]
                pos_tried[j] += s["verify_steps"]
    model.train(was_training)
    mean = accepted / steps if steps else 0.0
    return {"k": k, "mean_accepted": mean, "tokens_per_step": 1.0 + mean, "verify_steps": steps,
            "acceptance_per_position": [a / t if t else 0.0 for a, t in zip(pos_acc, pos_tried)]}


def mtp_step(model, opt, ids: torch.Tensor, mask: torch.Tensor, weights: list[float]) -> list[torch.Tensor]:
    """One optimizer step of the weighted chain loss on a padded batch (the trunk runs without grad);
    returns the per-module losses."""
    with torch.no_grad():
        h = model.trunk(ids[:, :-1])
    parts = masked_mtp_losses(model, ids, mask, h, depth=len(weights))
    loss = sum(w * x for w, x in zip(weights, parts)) / sum(weights[: len(parts)])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return [loss.detach()] + [x.detach() for x in parts]


def train_mtp_phase(model, examples: list[tuple[list[int], list[int]]], pad_id: int, steps: int = 100,
                    lr: float = 1e-3, batch_size: int = 16, depth_weights=(1.0, 1.0, 1.0), seed: int = 0,
                    log=print, log_every: int = 20) -> list[float]:
    """Train only the MTP layers (trunk, embedding, lm_head frozen) on tokenized conversations
    [(ids, assistant_mask)] with the weighted chain loss (10-step warmup, linear decay to 10%); returns the
    per-step losses."""
    from stepflash.posttrain.sft import sft_batch

    if steps < 1 or batch_size < 1:
        raise UserError("MTP phase steps and batch size must be >= 1")
    trainable = set(map(id, mtp_parameters(model)))
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.AdamW(mtp_parameters(model), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    weights = list(depth_weights)[: len(model.mtp_layers)]
    batches = ShuffledBatches(len(examples), batch_size, seed)
    progress = StepLog("mtp phase", steps, log_every, log)
    model.train()
    for step in range(steps):
        set_lr(opt, lr_factor(step, 10, steps, 0.1, decay="linear"))
        ids, mask = sft_batch([examples[i] for i in batches.next()], pad_id)
        loss, *parts = mtp_step(model, opt, ids, mask, weights)
        progress.add(step + 1, {"loss": float(loss), **{f"module_{j}": float(x) for j, x in enumerate(parts)}})
    for p in model.parameters():
        p.requires_grad_(True)
    return [r["loss"] for r in progress.history]


# ---- on its own ---------------------------------------------------------------------------------

@dataclass
class MTPPhaseArgs:
    """Clone MTP module 1 into the others and train all MTP modules jointly (trunk frozen)."""

    checkpoint: str = field(metadata={"positional": True, "help": "checkpoint directory (with tokenizer.json)"})
    data: str = field(default="", metadata={"help": "JSONL of {\"messages\": [...]} conversations"})
    out: str = field(default="", metadata={"help": "output checkpoint directory"})
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    batch_size: int = field(default=16, metadata={"help": "conversations per step"})
    clone: bool = field(default=True, metadata={"help": "clone MTP module 1 into the others first (--no-clone: train them as they are)"})
    eval_prompts: int = field(default=64, metadata={"help": "held-out conversations whose prompts measure "
                                                             "the accepted draft length"})
    max_len: int = field(default=512, metadata={"help": "truncate conversations to this many tokens"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})


def run(args: MTPPhaseArgs) -> int:
    from stepflash.chat import ChatTemplate
    from stepflash.checkpoint import load_model
    from stepflash.checkpoint.run import save_model_dir
    from stepflash.posttrain.sft import read_conversations, tokenize_conversation
    from stepflash.tokenizer import load_tokenizer

    if not args.out or not args.data:
        raise UserError("--data and --out are required")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, dtype=torch.float32)
    tok, template = load_tokenizer(args.checkpoint), ChatTemplate.from_checkpoint(args.checkpoint)
    convs = read_conversations(args.data)
    random.Random(args.seed).shuffle(convs)
    held, train = convs[: args.eval_prompts], convs[args.eval_prompts:] or convs
    prompts = [tok.encode(template.render(c["messages"][:-1], tools=c.get("tools")), add_special_tokens=False).ids
               for c in held if len(c["messages"]) > 1]
    stop = tuple(i for i in (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|eos|>")) if i is not None)
    k = len(model.mtp_layers)
    before = accepted_length(model, prompts, k, stop_ids=stop) if prompts else None
    if args.clone:
        clone_mtp_modules(model)
    examples = [tokenize_conversation(tok, template, c, args.max_len) for c in train]
    losses = train_mtp_phase(model, examples, tok.token_to_id("<|pad|>") or 0, args.steps, args.lr, args.batch_size,
                             seed=args.seed)
    after = accepted_length(model, prompts, k, stop_ids=stop) if prompts else None
    save_model_dir(model, tok, args.out)
    if before and after:
        print(f"mean accepted drafts (k={k}): {before['mean_accepted']:.3f} -> {after['mean_accepted']:.3f}")
    print(f"mtp phase done after {args.steps} steps: loss {losses[-1]:.4f} at the last step; checkpoint in {args.out}")
    return 0
