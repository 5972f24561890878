"""Bradley-Terry preference reward model and the `stepflash rm train` verb.

`RewardModel(model)` is a `CriticModel` read at one position: the score of a (prompt, response) text is
the value head on the final-normed hidden state of its last non-pad token. Trained on preference pairs with
`bt_loss(r_chosen, r_rejected) = -log sigmoid(r_chosen - r_rejected)` (mean over pairs), i.e. the model's
P(chosen > rejected) = sigmoid(r_chosen - r_rejected). Saved like a critic (base model + value_head.safetensors),
so an RL critic can start from it.

Texts are rendered in the chat format (SPEC section 8) without the reasoning: the RM scores the final
answer. Sequences are right-padded (the trunk is causal, so padding after the last real token changes
nothing before it); a sequence longer than max_len keeps its last max_len tokens.

`stepflash rm train CHECKPOINT --data pairs.jsonl --out DIR`: jsonl lines {"prompt", "chosen", "rejected"};
the tokenizer is CHECKPOINT/tokenizer.json; DIR receives the reward model and a copy of the tokenizer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from stepflash.errors import UserError
from stepflash.rl.critic import CriticModel
from stepflash.training.batches import ShuffledBatches, pad_right, read_jsonl
from stepflash.training.monitors import StepLog


class RewardModel(CriticModel):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] (right-padded), attention_mask [B, T] (1 = real token) -> scores [B] (fp32)."""
        h = self.hidden(input_ids)  # [B, T, hidden]
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            last = torch.where(attention_mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values
        return self.value_head(h[torch.arange(h.shape[0], device=h.device), last])  # [B]


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss: mean of -log sigmoid(r_chosen - r_rejected) over pairs [B]."""
    return -F.logsigmoid(chosen - rejected).mean()


def chat_text(prompt: str, response: str) -> str:
    """One user turn and one assistant turn in the chat format."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"


def pad_id_of(tokenizer) -> int:
    from stepflash.tokenizer import special_id

    for token in ("<|pad|>", "<|eos|>", "<|im_end|>"):
        i = special_id(tokenizer, token)
        if i is not None:
            return i
    return 0


def encode(tokenizer, prompt: str, response: str, max_len: int) -> list[int]:
    ids = tokenizer.encode(chat_text(prompt, response), add_special_tokens=False).ids
    return ids[-max_len:]


def collate(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> (ids [B, T], mask [B, T]) on `device`."""
    ids, mask = pad_right(seqs, pad_id)
    return ids.to(device), mask.long().to(device)


def read_pairs(path: str) -> list[dict]:
    pairs = []
    for n, row in read_jsonl(path, "preference pairs"):
        if not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise UserError(f"{path}:{n} needs string fields 'prompt', 'chosen' and 'rejected'")
        pairs.append(row)
    return pairs


def train_step(rm: RewardModel, optimizer, batch: list[dict], tokenizer, max_len: int, device) -> tuple[float, float]:
    """One optimizer step on a batch of pairs; returns (loss, accuracy = fraction with r_c > r_r)."""
    seqs = [encode(tokenizer, p["prompt"], p["chosen"], max_len) for p in batch]
    seqs += [encode(tokenizer, p["prompt"], p["rejected"], max_len) for p in batch]
    ids, mask = collate(seqs, pad_id_of(tokenizer), device)
    scores = rm(ids, mask)  # [2B]: chosen then rejected
    chosen, rejected = scores[: len(batch)], scores[len(batch):]
    loss = bt_loss(chosen, rejected)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), (chosen > rejected).float().mean().item()


@dataclass
class RMTrainArgs:
    """Train a Bradley-Terry reward model (trunk + scalar head) on preference pairs."""

    checkpoint: str = field(metadata={"positional": True, "help": "base model directory (with tokenizer.json)"})
    data: str = field(metadata={"help": 'jsonl of {"prompt", "chosen", "rejected"}'})
    out: str = field(metadata={"help": "output directory for the reward model"})
    epochs: int = field(default=1, metadata={"help": "passes over the pairs"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    head_lr: float = field(default=1e-3, metadata={"help": "learning rate of the (fresh) value head"})
    batch_size: int = field(default=8, metadata={"help": "pairs per step"})
    max_len: int = field(default=1024, metadata={"help": "tokens kept per sequence (the end is kept)"})
    train_trunk: bool = field(default=True, metadata={"help": "train the trunk too, not only the head"})
    seed: int = field(default=0, metadata={"help": "shuffling and initialisation seed"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    log_every: int = field(default=10, metadata={"help": "print loss/accuracy every N steps"})

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_len", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr < 0 or self.head_lr < 0:
            raise UserError("learning rates must be >= 0")


def run(args: RMTrainArgs) -> int:
    from stepflash.checkpoint import load_model
    from stepflash.tokenizer import load_tokenizer, save_tokenizer

    if not os.path.isdir(args.checkpoint):
        raise UserError(f"checkpoint directory {args.checkpoint} does not exist")
    tokenizer = load_tokenizer(args.checkpoint)
    pairs = read_pairs(args.data)
    torch.manual_seed(args.seed)
    rm = RewardModel(load_model(args.checkpoint, dtype=torch.float32, device=args.device))
    rm.model.requires_grad_(args.train_trunk)
    groups = [{"params": rm.value_head.parameters(), "lr": args.head_lr}]
    if args.train_trunk:
        groups.append({"params": rm.model.parameters(), "lr": args.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = math.ceil(args.epochs * len(pairs) / args.batch_size)  # --epochs passes over the pairs
    batches = ShuffledBatches(len(pairs), min(args.batch_size, len(pairs)), args.seed)
    progress = StepLog("rm train", steps, args.log_every)
    for step in range(1, steps + 1):
        loss, acc = train_step(rm, optimizer, [pairs[j] for j in batches.next()], tokenizer, args.max_len,
                               args.device)
        progress.add(step, {"loss": loss, "accuracy": acc})
    rm.save(args.out)
    save_tokenizer(args.checkpoint, args.out)
    print(f"reward model written to {args.out} ({steps} steps, loss {loss:.4f} at the last step)")
    return 0
