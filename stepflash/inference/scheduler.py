"""Request state and slot bookkeeping for continuous batching.

A request waits in FIFO order until a batch slot is free, is prefilled into that slot, decodes one
step at a time alongside the others, and leaves when it stops; its slot is then reused. Slots are
handed out lowest first so the running rows stay packed at the front of the batch (a forward covers
the contiguous range from the lowest to the highest busy slot).
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

import torch

from stepflash.errors import UserError
from stepflash.inference.logits_process import LogitsParams

LOGPROBS_MODES = ("processed", "raw")


@dataclass(kw_only=True)  # keywords only: the fields grow, positions would shift
class SamplingParams(LogitsParams):
    """One request's settings. Besides temperature/top-k/top-p, the logits processors' settings
    (inherited from `logits_process.LogitsParams`, vLLM's meanings) and:
    ignore_eos: the model's eos ids do not end the row (its own stop_token_ids still do);
    logprobs: None, or k >= 0: each StepOutput carries the top k alternatives of every new token
    (`new_top_logprobs`), in `logprobs_mode`: "processed" (the distribution the token was drawn from,
    the engine's own logprobs) or "raw" (log-softmax of the model's logits, vLLM's default);
    grammar: a `structured.GrammarMatcher` (one per row, it keeps the row's state): only tokens the
    grammar allows are sampled."""
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | list[int] = ()
    speculative_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    logprobs_mode: str = "processed"
    grammar: object = None  # structured.GrammarMatcher

    def check(self, max_speculative: int, vocab_size: int | None = None) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.speculative_tokens <= max_speculative:
            raise UserError(f"speculative_tokens must be in 0..{max_speculative} (the model has "
                            f"{max_speculative} MTP modules), got {self.speculative_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise UserError(f"logprobs must be None or >= 0, got {self.logprobs}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise UserError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if vocab_size is not None:
            LogitsParams.check(self, vocab_size)  # the processors' own rules


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stop: frozenset[int]
    generator: torch.Generator | None  # None for greedy requests
    slot: int | None = None
    tokens: list[int] = field(default_factory=list)  # prompt + output: x_0 .. x_n
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)  # drafted for the next verify
    finish_reason: str | None = None
    # statistics
    prefill_rate: float = 0.0
    t_first: float = 0.0
    t_done: float = 0.0
    verify_steps: int = 0
    accepted: int = 0
    pos_tried: list[int] = field(default_factory=list)
    pos_accepted: list[int] = field(default_factory=list)
    # drafting policy state (`speculative.DraftPolicy`): acceptance estimate per draft position, steps
    # since the last draft, the probe interval multiplier, whether the pending drafts are a probe
    accept_rate: list[float] = field(default_factory=list)
    since_draft: int = 0
    probe_backoff: int = 1
    probing: bool = False

    def __post_init__(self):
        self.tokens = list(self.prompt)
        if self.generator is None and self.params.temperature > 0:
            seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(seed)
        k = self.params.speculative_tokens
        self.pos_tried, self.pos_accepted = [0] * k, [0] * k
        self.accept_rate = [1.0] * k  # replaced by DraftPolicy's shared prior before its first verify step

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.output)

    def emit(self, token: int, logprob: float) -> bool:
        """Append one generated token; returns True when the request is finished."""
        self.output.append(token)
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if token in self.stop:
            self.finish_reason = "stop"
        elif self.remaining <= 0:
            self.finish_reason = "length"
        return self.finished

    def stats(self) -> dict:
        decode_tokens = max(len(self.output) - 1, 0)
        decode_time = max(self.t_done - self.t_first, 1e-9)
        tried = [t for t in self.pos_tried]
        return {
            "prompt_tokens": len(self.prompt),
            "generated_tokens": len(self.output),
            "prefill_tokens_per_s": self.prefill_rate,
            "decode_tokens_per_s": decode_tokens / decode_time if decode_tokens else 0.0,
            "verify_steps": self.verify_steps,
            "mean_accepted": self.accepted / self.verify_steps if self.verify_steps else 0.0,
            "acceptance_per_position": [a / t if t else 0.0 for a, t in zip(self.pos_accepted, tried)],
        }


class Scheduler:
    def __init__(self, max_batch_size: int):
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.free = list(range(max_batch_size))
        self.requests: dict[int, Request] = {}

    def add(self, req: Request) -> None:
        self.requests[req.id] = req
        self.waiting.append(req)

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots (lowest first); returns the newly admitted."""
        admitted = []
        while self.waiting and self.free:
            req = self.waiting.popleft()
            req.slot = self.free.pop(0)
            self.running[req.slot] = req
            admitted.append(req)
        return admitted

    def release(self, req: Request) -> None:
        if req.slot is not None and self.running.get(req.slot) is req:
            del self.running[req.slot]
            self.free.append(req.slot)
            self.free.sort()
        req.slot = None
        self.requests.pop(req.id, None)

    def remove_waiting(self, req: Request) -> None:
        self.waiting.remove(req)
        self.requests.pop(req.id, None)
