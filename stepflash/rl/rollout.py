"""Rollouts for RL: sample k responses per prompt with the inference engine, score them, pack them as tensors.

`RolloutWorker` owns the rollout policy: its own copy of the model, optionally in a lower precision than
training (bf16 vs fp32: a real train/inference mismatch) and optionally stale (it generates with the
weights of `staleness` actor updates ago, kept in a queue of snapshots). The engine records the
behaviour log-probs mu of every sampled token under the distribution it sampled from.

`pack` turns prompts + responses into one right-padded batch with everything aligned to the scored
tokens, the convention of `losses.py` / `advantages.py`:
    ids              [B, S]     prompt + response + padding
    response_mask    [B, S-1]   1 where ids[:, 1:] is a generated token (the stop token included)
    behavior_logprobs[B, S-1]   mu of those tokens, 0 elsewhere
    last_pos         [B]        index in ids of each row's last generated token (V(s_T) lives there)
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from stepflash.inference.engine import Engine
from stepflash.inference.progress import generation_progress

RewardFn = Callable[[object, str, list[int]], float]  # (task, completion text, token ids) -> reward


@dataclass
class RolloutBatch:
    ids: torch.Tensor  # [B, S]
    response_mask: torch.Tensor  # [B, S-1] float
    behavior_logprobs: torch.Tensor  # [B, S-1]
    last_pos: torch.Tensor  # [B] long
    rewards: torch.Tensor  # [B] float
    truncated: torch.Tensor  # [B] bool (cut at max_new_tokens)
    group: torch.Tensor  # [B] long: index of the prompt each sample answers
    texts: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    def select(self, idx: torch.Tensor) -> "RolloutBatch":
        """Rows `idx`, trimmed to the longest selected sequence."""
        s = int(self.last_pos[idx].max()) + 1
        return RolloutBatch(self.ids[idx, :s], self.response_mask[idx, : s - 1], self.behavior_logprobs[idx, : s - 1],
                            self.last_pos[idx], self.rewards[idx], self.truncated[idx], self.group[idx],
                            [self.texts[i] for i in idx.tolist()] if self.texts else [])


def pack(prompts: list[list[int]], responses: list[list[int]], logprobs: list[list[float]], pad_id: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, S], response_mask [B, S-1], behavior_logprobs [B, S-1], last_pos [B]); see the module docstring."""
    S = max(len(p) + len(r) for p, r in zip(prompts, responses))
    B = len(prompts)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S - 1)
    mu = torch.zeros(B, S - 1)
    last = torch.zeros(B, dtype=torch.long)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, logprobs)):
        n, m = len(p), len(r)
        ids[i, : n + m] = torch.tensor(p + r, dtype=torch.long)
        mask[i, n - 1: n - 1 + m] = 1.0  # scored position t predicts ids[t + 1]
        mu[i, n - 1: n - 1 + m] = torch.tensor(lp, dtype=torch.float32)
        last[i] = n + m - 1
    return ids, mask, mu, last


def completion_text(tok, token_ids: list[int], stop_ids: set[int]) -> str:
    """Decode a response, keeping </think> and friends (rewards read them) but not the final stop token."""
    if token_ids and token_ids[-1] in stop_ids:
        token_ids = token_ids[:-1]
    return tok.decode(token_ids, skip_special_tokens=False)


def task_messages(task) -> tuple[list[dict], list[dict] | None]:
    """How a task is posed: (messages, tools). A system turn from meta["system"] when the task has one, then
    the prompt as the user turn; meta["tools"] are the tool schemas the chat template renders into the
    system turn (tool tasks), None for tasks without tools."""
    meta = getattr(task, "meta", None) or {}
    messages = [{"role": "system", "content": meta["system"]}] if meta.get("system") else []
    return messages + [{"role": "user", "content": task.prompt}], meta.get("tools") or None


def render_task(template, task) -> str:
    """The prompt text of a task: its messages and tools rendered with the generation prompt on."""
    messages, tools = task_messages(task)
    return template.render(messages, tools=tools)


def task_reward(task, text: str, token_ids: list[int]) -> float:
    return float(task.reward(text))


class RolloutWorker:
    """The rollout policy: a copy of the training model in `dtype`, `staleness` actor updates behind it."""

    def __init__(self, policy, dtype: torch.dtype = torch.float32, staleness: int = 0, max_batch_size: int = 64):
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        self.dtype, self.staleness = dtype, staleness
        self.model = copy.deepcopy(policy).to(dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.engine = Engine(self.model, max_batch_size=max_batch_size)
        # snapshots[i] = weights after update (current - len + 1 + i); the oldest is what we roll out with.
        self.snapshots: deque[dict] = deque([self._snapshot(policy)], maxlen=staleness + 1)
        self._load(self.snapshots[0])

    @staticmethod
    def _snapshot(policy) -> dict:
        return {k: v.detach().clone() for k, v in policy.state_dict().items()}

    def _load(self, state: dict) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(state[k].to(v.dtype))

    def on_update(self, policy) -> None:
        """Call after every actor optimizer step: the rollout weights trail the policy by `staleness` updates."""
        self.snapshots.append(self._snapshot(policy))
        self._load(self.snapshots[0])

    def state_dict(self) -> dict:
        return {"snapshots": list(self.snapshots)}

    def load_state_dict(self, state: dict) -> None:
        self.snapshots = deque(state["snapshots"], maxlen=self.staleness + 1)
        self._load(self.snapshots[0])

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int,
                 stop_ids: tuple[int, ...]):
        return self.engine.generate(prompts, max_new_tokens, temperature=temperature, seed=seed,
                                    stop_token_ids=stop_ids)


def collect_rollouts(worker: RolloutWorker, tok, tasks: list, prompts: list[list[int]], samples_per_prompt: int,
                     max_new_tokens: int, temperature: float, seed: int, stop_ids: tuple[int, ...], pad_id: int,
                     reward_fn: RewardFn = task_reward) -> RolloutBatch:
    """k samples of every prompt (sample j of prompt i is row i * k + j), scored by reward_fn."""
    k = samples_per_prompt
    flat = [p for p in prompts for _ in range(k)]
    with generation_progress(worker.engine, len(flat), "rollouts", leave=False):  # erased when the step's line prints
        results = worker.generate(flat, max_new_tokens, temperature, seed, stop_ids)
    stop = set(stop_ids) | set(worker.model.config.eos_token_ids)
    responses = [r.token_ids for r in results]
    texts = [completion_text(tok, r, stop) for r in responses]
    rewards = torch.tensor([reward_fn(tasks[i // k], texts[i], responses[i]) for i in range(len(flat))])
    truncated = torch.tensor([r.finish_reason == "length" for r in results])
    ids, mask, mu, last = pack(flat, responses, [r.logprobs for r in results], pad_id)
    group = torch.arange(len(prompts)).repeat_interleave(k)
    return RolloutBatch(ids, mask, mu, last, rewards.float(), truncated, group, texts)


@torch.no_grad()
def heldout_accuracy(engine: Engine, tok, tasks: list, prompts: list[list[int]], max_new_tokens: int,
                     stop_ids: tuple[int, ...], reward_fn: RewardFn = task_reward, batch: int = 64,
                     temperature: float = 0.0, samples: int = 1, seed: int = 0) -> float:
    """Mean reward of `samples` answers per task at `temperature` (accuracy for 0/1 verifiers): greedy at
    temperature 0, the avg@k of RL papers when sampled. Answer j to task i samples with seed + i * samples + j,
    so one seed scores every checkpoint on the same random streams, and the tasks [s:] with
    seed + s * samples get the answers they get in the whole list."""
    stop = set(stop_ids) | set(engine.config.eos_token_ids)
    flat = [i for i in range(len(prompts)) for _ in range(samples)]  # task index of every answer
    total = 0.0
    for lo in range(0, len(flat), batch):
        rows = flat[lo: lo + batch]
        results = engine.generate([prompts[i] for i in rows], max_new_tokens, temperature=temperature,
                                  seed=seed + lo if temperature > 0 else None, stop_token_ids=stop_ids)
        for i, r in zip(rows, results):
            total += reward_fn(tasks[i], completion_text(tok, r.token_ids, stop), r.token_ids)
    return total / max(len(flat), 1)


def greedy_accuracy(engine: Engine, tok, tasks: list, prompts: list[list[int]], max_new_tokens: int,
                    stop_ids: tuple[int, ...], reward_fn: RewardFn = task_reward, batch: int = 64) -> float:
    """Mean reward of greedy answers (held-out accuracy for 0/1 verifiers)."""
    return heldout_accuracy(engine, tok, tasks, prompts, max_new_tokens, stop_ids, reward_fn, batch)
