"""Batches of token sequences for the verbs that train on examples (SFT, the reward model, the MTP phase,
the recipe), and reading their JSONL inputs. Pre-training reads token windows instead (`data.py`).

- `read_jsonl`: the objects of a JSONL file, with one-line errors naming the file and line;
- `pad_right`: token lists (and a 0/1 per token) -> right-padded tensors;
- `ShuffledBatches`: endless batches of example indices, every example once per reshuffled pass;
  its state is the position in a seeded stream, so a run can resume it.
"""

from __future__ import annotations

import json
import os
import random

import torch

from stepflash.errors import UserError


def read_jsonl(path: str, what: str = "records") -> list[dict]:
    """(line number, object) of every non-empty line of `path`, each a JSON object; one-line errors name the
    file and line (`what` names the records). The one JSONL reader of training, evaluation and RL data."""
    if not os.path.isfile(path):
        raise UserError(f"{what} file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                rows.append((n, obj))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text after line {len(rows)} ({e.reason})") from None
    if not rows:
        raise UserError(f"{path} holds no {what}")
    return rows


def pad_right(seqs: list[list[int]], pad_id: int, flags: list[list[int]] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, S] right-padded with pad_id, mask [B, S]). The mask is `flags` (a 0/1 per
    token, 0 on padding) when given, else 1 on every real token."""
    S = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.float32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = torch.tensor(flags[i], dtype=torch.float32) if flags is not None else 1.0
    return ids, mask


class ShuffledBatches:
    """Endless batches of indices into n examples: a seeded permutation is appended whenever fewer than a
    batch remain, so every example is seen once per pass and batches straddle passes."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rng: random.Random | None = None):
        """`rng`: a stream shared with other samplers (the recipe draws its domains' batches in turn from one);
        such a sampler cannot be restored from its state."""
        if n < 1:
            raise UserError("no examples to train on")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rng, self.order, self.drawn = rng or random.Random(seed), [], 0

    def next(self) -> list[int]:
        if len(self.order) < self.batch_size:
            self.order += self.rng.sample(range(self.n), self.n)
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        self.drawn += 1
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        """Replay the seeded stream to where it was (cheap: index lists only)."""
        self.__init__(self.n, self.batch_size, state["seed"])
        for _ in range(state["drawn"]):
            self.next()
