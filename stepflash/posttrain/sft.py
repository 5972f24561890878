"""`stepflash sft`: supervised fine-tuning on chat conversations, the loss on assistant tokens only.

Data: JSONL, one `{"messages": [...]}` per line in the OpenAI format (system/user/assistant/tool turns,
assistant `reasoning_content` and `tool_calls` allowed). Each conversation is rendered with the checkpoint's
chat template (`stepflash.chat.ChatTemplate`, SPEC section 8). The loss covers every token of every
assistant turn after its `<|im_start|>assistant\\n` header up to and including its `<|im_end|>`: the think
block, the answer and the tool-call XML. System, user and tool-response text is context only.
`assistant_mask` finds those spans in the rendered text and maps them to tokens through the tokenizer's
character offsets, so it works for any template that writes ChatML-style headers.

Built-in data: `--task arithmetic|countdown` writes prompt -> answer conversations from the procedural
tasks' train split with a one-line reasoning ("3 + 5 = 8"), so a demo needs no download.

Starting point: a checkpoint directory, or (for demos) a preset name (`tiny`, `small`, `flash`, or `demo`, the
~1M-parameter RL demo model) or a config json, which starts from random weights. Without a tokenizer in the
checkpoint a small BPE is trained on the SFT data with digits kept as single tokens (`build_task_tokenizer`),
and a fresh model's vocabulary is sized to it. The result (weights, config, tokenizer) is written to a temporary directory and renamed to `--out`.

The loop is the shared training core's (`stepflash.training`: `ShuffledBatches`, `lr_factor` with a 10-step
warmup and cosine decay to 10%, `masked_cross_entropy`, `StepLog`); under torchrun the model is FSDP-sharded
by the `Runtime`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from stepflash.config import ConfigError
from stepflash.distributed.runtime import Runtime
from stepflash.errors import UserError
from stepflash.training.batches import ShuffledBatches, pad_right, read_jsonl
from stepflash.training.losses import masked_cross_entropy
from stepflash.training.monitors import StepLog
from stepflash.training.schedule import lr_factor, set_lr

ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"


@dataclass
class SFTArgs:
    """Supervised fine-tuning on chat conversations (loss on assistant tokens only)."""

    checkpoint: str = field(metadata={"positional": True, "help": "checkpoint dir, or a preset (tiny, small, flash, or "
                                                                  "demo: the 1M RL demo model) or config.json to "
                                                                  "start from random weights"})
    out: str = field(default="", metadata={"help": "output checkpoint directory"})
    data: str | None = field(default=None, metadata={"help": "JSONL of {\"messages\": [...]} conversations"})
    task: str | None = field(default=None, metadata={"help": "make the data from a procedural task "
                                                            "(arithmetic or countdown) instead of --data"})
    num_examples: int = field(default=2000, metadata={"help": "conversations to generate with --task"})
    task_digits: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "arithmetic: min max digits"})
    task_ops: str = field(default="+-", metadata={"help": "arithmetic: operators"})
    task_terms: list[int] = field(default_factory=lambda: [2, 2], metadata={"help": "arithmetic: min max terms"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (cosine decay to 10%)"})
    batch_size: int = field(default=32, metadata={"help": "conversations per step"})
    max_len: int = field(default=512, metadata={"help": "truncate rendered conversations to this many tokens"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    log_every: int = field(default=20, metadata={"help": "print the loss every N steps"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default; 1 is fastest on "
                                                      "a busy small machine)"})


# ---- data ---------------------------------------------------------------------------------------

def task_conversations(family: str, n: int, seed: int = 0, **options) -> list[dict]:
    """Train-split tasks as conversations: the task prompt, a one-line reasoning and a boxed answer."""
    from stepflash.tasks.generators import make_tasks

    if family not in ("arithmetic", "countdown"):
        raise UserError(f"--task makes SFT data for arithmetic or countdown, not {family!r}")
    convs = []
    for t in make_tasks(family, n, seed=seed, split="train", **options):
        if family == "arithmetic":
            reasoning, answer = f"{t.meta['expression']} = {t.answer}", t.answer
        else:
            reasoning, answer = f"{t.answer} = {t.meta['target']}", t.answer
        convs.append({"messages": [{"role": "user", "content": t.prompt},
                                   {"role": "assistant", "reasoning_content": reasoning,
                                    "content": f"\\boxed{{{answer}}}"}]})
    return convs


def task_options(family: str, digits, ops: str, terms) -> dict:
    """Generator options for the arithmetic family from CLI values (other families use their defaults)."""
    if family != "arithmetic":
        return {}
    return {"digits": tuple(digits), "ops": ops, "terms": tuple(terms)}


def read_conversations(path: str) -> list[dict]:
    convs = []
    for n, obj in read_jsonl(path, "conversations"):
        if not isinstance(obj.get("messages"), list):
            raise UserError(f"{path}:{n}: expected an object with a \"messages\" list")
        convs.append(obj)
    return convs


def build_task_tokenizer(texts: list[str], vocab_size: int = 384):
    """A byte-level BPE trained on `texts` with every digit its own token (numbers stay digit-level, which a
    small model learns arithmetic on far more easily); special tokens at ids 0..10 as everywhere."""
    from stepflash.tokenizer import train_tokenizer

    return train_tokenizer(texts, vocab_size, split_digits=True)


# ---- the assistant mask ---------------------------------------------------------------------------

def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of assistant turns: after each assistant header, through its TURN_END."""
    spans, pos = [], 0
    while (at := text.find(ASSISTANT_HEADER, pos)) >= 0:
        start = at + len(ASSISTANT_HEADER)
        end = text.find(TURN_END, start)
        end = len(text) if end < 0 else end + len(TURN_END)
        spans.append((start, end))
        pos = end
    return spans


def encode_with_mask(tok, text: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` and a 0/1 per token: 1 when the token lies inside an assistant span."""
    enc = tok.encode(text, add_special_tokens=False)
    spans = assistant_spans(text)
    mask = [int(any(s <= a and b <= e and b > a for s, e in spans)) for a, b in enc.offsets]
    return list(enc.ids), mask


def tokenize_conversation(tok, template, conv: dict, max_len: int) -> tuple[list[int], list[int]]:
    text = template.render(conv["messages"], tools=conv.get("tools"), add_generation_prompt=False)
    ids, mask = encode_with_mask(tok, text)
    return ids[:max_len], mask[:max_len]


def sft_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, S] and a target mask [B, S-1] (1 where ids[:, 1:] is an assistant token)."""
    ids, mask = pad_right([x for x, _ in examples], pad_id, [m for _, m in examples])
    return ids, mask[:, 1:]


def sft_loss(model, ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over assistant target tokens."""
    return masked_cross_entropy(model(ids[:, :-1]), ids[:, 1:], target_mask)  # logits [B, S-1, V]


# ---- model and run ------------------------------------------------------------------------------

def demo_config(vocab_size: int, mtp: int = 1):
    """The RL demo model: 4 layers (F S S S), hidden 128, 8 experts top-2, `mtp` MTP modules (1 here, 3 in
    `stepflash recipe`), fp32 (~1M params with one MTP module)."""
    from stepflash.config import make_config

    return make_config(4, 128, full_heads=4, sliding_heads=4, kv_heads=2, head_dim=32, window=64, vocab=vocab_size,
                       inter=256, experts=8, top_k=2, moe_inter=64, dense_layers=1, mtp=mtp, max_pos=512,
                       rope_original=128)


def load_start(checkpoint: str, texts: list[str], seed: int):
    """(model, tokenizer) from a checkpoint dir, or a fresh model of a preset/config sized to a new tokenizer."""
    from stepflash.checkpoint import load_model
    from stepflash.config import resolve_config
    from stepflash.model import Step35ForCausalLM
    from stepflash.tokenizer import load_tokenizer

    if os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, "config.json")):
        model = load_model(checkpoint, dtype=torch.float32)
        tok = load_tokenizer(checkpoint)
        if tok.get_vocab_size() > model.config.vocab_size:
            raise UserError(f"the tokenizer of {checkpoint} has more tokens than the model's vocab_size")
        return model, tok
    tok = load_tokenizer(checkpoint) if os.path.isfile(os.path.join(checkpoint, "tokenizer.json")) \
        else build_task_tokenizer(texts)
    try:
        cfg = demo_config(tok.get_vocab_size()) if checkpoint == "demo" else resolve_config(checkpoint)
    except ConfigError:
        raise UserError(f"{checkpoint!r} is neither a checkpoint directory (with config.json), a preset (tiny, "
                        "small, flash, or demo) nor a config.json file") from None
    ids = [tok.token_to_id(s) for s in ("<|eos|>", "<|im_end|>")]
    cfg = cfg.replace(vocab_size=tok.get_vocab_size(), torch_dtype="float32",
                      eos_token_id=[i for i in ids if i is not None], bos_token_id=tok.token_to_id("<|bos|>") or 0)
    torch.manual_seed(seed)
    model = Step35ForCausalLM(cfg)
    model.init_weights()
    return model.float(), tok


def train_sft(args: SFTArgs) -> dict:
    """Fine-tune and save. Under torchrun (WORLD_SIZE > 1) the model is FSDP-sharded over the processes, each
    takes its slice of every step's batch (--batch-size stays the global batch), rank 0 prints and saves."""
    from stepflash.distributed.launch import torchrun_session, under_torchrun

    if under_torchrun():
        with torchrun_session() as rt:
            return _train_sft(args, rt)
    return _train_sft(args, Runtime())


def _examples(args: SFTArgs):
    """(model, tokenizer, tokenized conversations) for the run."""
    from stepflash.chat import ChatTemplate

    if args.task:
        convs = task_conversations(args.task, args.num_examples, seed=args.seed,
                                   **task_options(args.task, args.task_digits, args.task_ops, args.task_terms))
    else:
        convs = read_conversations(args.data)
    template = ChatTemplate.from_checkpoint(args.checkpoint) if os.path.isdir(args.checkpoint) else ChatTemplate()
    texts = [template.render(c["messages"], add_generation_prompt=False) for c in convs]
    model, tok = load_start(args.checkpoint, texts, args.seed)
    examples = [tokenize_conversation(tok, template, c, args.max_len) for c in convs]
    if not any(sum(m) for _, m in examples):
        raise UserError("no assistant tokens in the data: nothing to train on")
    return model, tok, examples


def _train_sft(args: SFTArgs, rt: Runtime) -> dict:
    from stepflash.checkpoint.run import save_model_dir

    if not args.out:
        raise UserError("--out is required (the directory to write the fine-tuned checkpoint to)")
    if (args.data is None) == (args.task is None):
        raise UserError("give exactly one of --data FILE.jsonl or --task arithmetic|countdown")
    if args.steps < 1 or args.batch_size < 1:
        raise UserError("--steps and --batch-size must be >= 1")
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of the {rt.world_size} processes")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, tok, examples = _examples(args)
    pad = tok.token_to_id("<|pad|>") or 0
    os.makedirs(args.out, exist_ok=True)
    model = rt.parallelize(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches = ShuffledBatches(len(examples), args.batch_size, args.seed)
    log = StepLog("sft", args.steps, args.log_every, enabled=rt.is_main)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        set_lr(opt, lr_factor(step, 10, args.steps, 0.1))
        batch = [examples[i] for i in batches.next()]
        lo, hi = rt.span(len(batch))
        ids, mask = sft_batch(batch[lo:hi], pad)
        # This rank's share of the token mean over the whole batch (FSDP averages the ranks' gradients).
        loss = sft_loss(model, ids, mask) * rt.token_weight(mask.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        rt.clip_grad_norm(model, 1.0)
        opt.step()
        log.add(step + 1, {"loss": rt.mean(loss.item())})
    plain = rt.gather_model(model)  # the whole model on rank 0, None elsewhere
    if plain is not None:
        save_model_dir(plain, tok, args.out)
    rt.barrier()
    losses = [r["loss"] for r in log.history]
    return {"final_loss": losses[-1], "mean_loss_last_10": log.mean(10)["loss"], "steps": args.steps,
            "seconds": time.time() - t0, "losses": losses, "rank": rt.rank}


def run(args: SFTArgs) -> int:
    summary = train_sft(args)
    if summary["rank"] == 0:
        print(f"sft done after {summary['steps']} steps ({summary['seconds']:.0f}s): loss {summary['final_loss']:.4f} "
              f"at the last step, {summary['mean_loss_last_10']:.4f} mean of the last 10; checkpoint in {args.out}")
    return 0
