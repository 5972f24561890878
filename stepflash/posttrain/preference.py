"""Pairwise preference reward for open-ended tasks, from a trained Bradley-Terry reward model.

reward(prompt, completion) = sigmoid(score(question, completion) - score(question, reference)), the reward
model's probability that the completion is preferred to the task's reference answer: 0.5 for a completion
as good as the reference, towards 1 for a better one. Comparing against a reference instead of using the raw
score keeps rewards on the same scale across prompts. Reference scores are cached per (question, reference).
"""

from __future__ import annotations

from typing import Any

import torch

from stepflash.errors import UserError
from stepflash.tasks.rewards import strip_reasoning, task_field


class PreferenceReward:
    def __init__(self, reward_model, tokenizer, max_len: int = 1024, batch_size: int = 8):
        self.rm = reward_model.eval()
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.batch_size = batch_size
        self._reference_scores: dict[tuple[str, str], float] = {}

    @torch.no_grad()
    def scores(self, questions: list[str], responses: list[str]) -> torch.Tensor:
        """Reward-model scores [N] of N (question, response) pairs."""
        from stepflash.posttrain.reward_model import collate, encode, pad_id_of

        device = self.rm.value_head.proj.weight.device
        out = []
        for i in range(0, len(questions), self.batch_size):
            seqs = [encode(self.tokenizer, q, r, self.max_len)
                    for q, r in zip(questions[i: i + self.batch_size], responses[i: i + self.batch_size])]
            ids, mask = collate(seqs, pad_id_of(self.tokenizer), device)
            out.append(self.rm(ids, mask).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _reference_score(self, question: str, reference: str) -> float:
        key = (question, reference)
        if key not in self._reference_scores:
            self._reference_scores[key] = self.scores([question], [reference])[0].item()
        return self._reference_scores[key]

    def __call__(self, prompt: Any, completion: str) -> float:
        question = prompt if isinstance(prompt, str) else task_field(prompt, "prompt")
        reference = None if isinstance(prompt, str) else task_field(prompt, "answer")
        if question is None or reference is None:
            raise UserError("a preference task needs 'prompt' and a reference 'answer'")
        score = self.scores([question], [strip_reasoning(completion)])[0].item()
        return float(torch.sigmoid(torch.tensor(score - self._reference_score(question, str(reference)))))
