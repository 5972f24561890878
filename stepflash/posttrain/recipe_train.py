"""Supervised training of the recipe's SFT start and consolidated student, on conversations of several domains.

The loss is `stepflash sft`'s (`posttrain/sft.py`: conversations rendered with the chat template, cross entropy on
assistant tokens only, AdamW with warmup and cosine decay to 10%, all from the training core `stepflash.training`),
with two additions the recipe needs:
- `mtp_weight`: the MTP loss of module 1 only (depth weights [1, 0, 0], the report's setting before the late
  MTP phase) on the same assistant tokens, so module 1 is trained before it is cloned;
- `teachers` + `kl_weight`: logit distillation for consolidation: KL(expert || student) on the kept
  (assistant) tokens, the expert being the one of the example's domain.
Each batch holds one domain's conversations (domains take turns): a short math batch is then not padded to
the length of a tool conversation, which roughly halves the cost of a mixed run on CPU.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from stepflash.posttrain.mtp_phase import masked_mtp_losses
from stepflash.posttrain.sft import sft_batch
from stepflash.training.batches import ShuffledBatches
from stepflash.training.losses import masked_cross_entropy, masked_mean
from stepflash.training.monitors import StepLog
from stepflash.training.schedule import lr_factor, set_lr

Example = tuple[list[int], list[int]]  # (token ids, assistant mask), from sft.tokenize_conversation


def domain_batches(examples: dict[str, list[Example]], batch_size: int, seed: int):
    """Endless (domain, batch) pairs: domains in turn, each reshuffled every pass over its examples (one
    random stream for all domains)."""
    rng = random.Random(seed)
    samplers = {d: ShuffledBatches(len(exs), batch_size, rng=rng) for d, exs in examples.items() if exs}
    if not samplers:
        raise ValueError("no examples in any domain")
    while True:
        for d, sampler in samplers.items():
            yield d, [examples[d][i] for i in sampler.next()]


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(teacher || student); logits [B, T, V], mask [B, T]."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, T]
    return masked_mean(kl, mask)


def supervised_loss(model, ids: torch.Tensor, mask: torch.Tensor, mtp_weight: float = 0.0, teacher=None,
                    kl_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """CE on assistant tokens (+ module-1 MTP CE, + KL to the teacher); ids [B, S], mask [B, S-1]."""
    h = model.trunk(ids[:, :-1])  # [B, S-1, hidden]
    logits = model.head(h)  # [B, S-1, V]
    main = masked_cross_entropy(logits, ids[:, 1:], mask)
    total, parts = main, {"ce": float(main.detach())}
    if mtp_weight > 0 and model.mtp_layers:
        mtp = masked_mtp_losses(model, ids, mask, h, depth=1)[0]
        total = total + mtp_weight * mtp
        parts["mtp"] = float(mtp.detach())
    if teacher is not None and kl_weight > 0:
        with torch.no_grad():
            teacher_logits = teacher(ids[:, :-1])
        kl = distill_kl(logits, teacher_logits, mask)
        total = total + kl_weight * kl
        parts["kl"] = float(kl.detach())
    return total, parts


def train_supervised(model, examples: dict[str, list[Example]], pad_id: int, steps: int, lr: float,
                     batch_size: int, mtp_weight: float = 0.0, teachers: dict | None = None,
                     kl_weight: float = 0.0, seed: int = 0, log=print, log_every: int = 50) -> dict:
    """Train `model` in place for `steps` batches; returns the mean of the last 10 steps' loss parts."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches = domain_batches(examples, batch_size, seed)
    progress = StepLog("  supervised", steps, log_every, log)
    model.train()
    for step in range(steps):
        set_lr(opt, lr_factor(step, 10, steps, 0.1))
        domain, batch = next(batches)
        ids, mask = sft_batch(batch, pad_id)
        loss, parts = supervised_loss(model, ids, mask, mtp_weight, (teachers or {}).get(domain), kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        progress.add(step + 1, parts)
    return progress.mean(10)
