"""Per-row logits processors, applied between the model's head and `sampling.target_probs`.

What each one does is vLLM's definition (`vllm/v1/sample/sampler.py`, `SamplingParams._verify_args`),
so a request means the same thing here as there:
- `logit_bias` {token id: bias in [-100, 100]} is added to the logits; `banned_token_ids` get -inf
  (the server bans `<tool_call>` for tool_choice "none");
- `min_tokens`: until a row has generated that many tokens, its stop ids (eos, end-of-turn and its
  own `stop_token_ids`) get -inf, so it cannot end early;
- `repetition_penalty` r > 0 (1 = off, the CTRL rule): every token seen in the prompt or the output so
  far has its logit divided by r where positive and multiplied by r where negative;
- `frequency_penalty` f and `presence_penalty` p in [-2, 2] (0 = off), output tokens only:
  logit -= f * count(token in output) + p * [count > 0].
Order, as vLLM: bias and min_tokens, then repetition, frequency, presence; temperature, top-k and
top-p come after (`sampling.target_probs`). A grammar mask (`structured.py`) is applied before all of
these: a disallowed token stays at -inf whatever a bias adds, and where a ban or min_tokens would leave
no token at all (a complete grammar allows only stop ids) they yield, so a row is never all -inf.

Speculative decoding verifies K drafts in one forward, so logits come as [n, T, V] with T = K + 1
positions per row: position t sees the row's output plus drafts[:t] (the counts and the min_tokens
length move along the drafts), so the verified distribution at every position is exactly the one
plain decoding would sample from after accepting those drafts.

`TokenCounts` keeps what the penalties need per batch slot on the device (like the KV cache):
output token counts [slots, V] and the set of prompt tokens [slots, V]; the engine resets a slot at
prefill and adds each accepted token.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from stepflash.errors import UserError

MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values


@dataclass
class LogitsParams:
    """The processor settings of one request (the engine's SamplingParams may carry the same fields)."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    banned_token_ids: tuple[int, ...] = ()

    def check(self, vocab_size: int) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise UserError(f"{name} must be in [-2, 2], got {value}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UserError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise UserError(f"min_tokens must be >= 0, got {self.min_tokens}")
        for tok, bias in self.logit_bias.items():
            if not 0 <= tok < vocab_size:
                raise UserError(f"logit_bias: token id {tok} is outside the vocabulary (0..{vocab_size - 1})")
            if not (math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
                raise UserError(f"logit_bias: the bias of token {tok} must be in [-100, 100], got {bias}")


def _get(params, name: str, default):
    return getattr(params, name, default)


def is_active(params) -> bool:
    """True when the request changes its logits at all (rows without processors skip this module)."""
    return bool(_get(params, "presence_penalty", 0.0) or _get(params, "frequency_penalty", 0.0)
                or _get(params, "repetition_penalty", 1.0) != 1.0 or _get(params, "min_tokens", 0)
                or _get(params, "logit_bias", None) or _get(params, "banned_token_ids", ()))


class TokenCounts:
    """Per-slot output token counts and prompt token sets, on the engine's device."""

    def __init__(self, max_batch_size: int, vocab_size: int, device=None):
        self.vocab_size = vocab_size
        self.output = torch.zeros(max_batch_size, vocab_size, dtype=torch.int32, device=device)  # [slots, V]
        self.prompt = torch.zeros(max_batch_size, vocab_size, dtype=torch.bool, device=device)  # [slots, V]
        self.generated = [0] * max_batch_size  # output length per slot (for min_tokens)

    def reset(self, slot: int, prompt_ids: list[int]) -> None:
        self.output[slot].zero_()
        self.prompt[slot].zero_()
        if prompt_ids:
            self.prompt[slot, torch.tensor(prompt_ids, device=self.prompt.device)] = True
        self.generated[slot] = 0

    def add(self, slot: int, token_ids: list[int]) -> None:
        """Count accepted output tokens (never drafts that were rejected)."""
        if token_ids:
            ids = torch.tensor(token_ids, device=self.output.device)
            self.output[slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
            self.generated[slot] += len(token_ids)


def apply_processors(logits: torch.Tensor, slots: list[int], params: list, counts: TokenCounts,
                     stop_ids: list, drafts: list[list[int]] | None = None) -> torch.Tensor:
    """logits [n, T, V] (T = 1 + drafts per row) -> processed fp32 logits [n, T, V] (a new tensor).

    slots[i]: row i's batch slot in `counts`; params[i]: its settings (LogitsParams or SamplingParams);
    stop_ids[i]: the ids min_tokens suppresses; drafts[i]: its draft tokens (position t sees drafts[:t])."""
    out = logits.float().clone()
    n, T, V = out.shape
    active = [i for i in range(n) if is_active(params[i])]
    if not active:
        return out
    dev = out.device
    drafts = drafts or [[] for _ in range(n)]
    rows = torch.tensor(active, device=dev)
    slot_t = torch.tensor([slots[i] for i in active], device=dev)
    # Output counts at every verified position: the slot's counts plus the drafts before it.
    draft_counts = torch.zeros(len(active), T, V, device=dev)  # [a, T, V]
    for j, i in enumerate(active):
        for t, tok in enumerate(drafts[i][: T - 1]):
            draft_counts[j, t + 1:, tok] += 1
    output = counts.output[slot_t].float()[:, None] + draft_counts  # [a, T, V]
    seen = counts.prompt[slot_t][:, None] | (output > 0)  # [a, T, V]
    x = out[rows]  # [a, T, V]

    for j, i in enumerate(active):
        p = params[i]
        for tok, bias in (_get(p, "logit_bias", None) or {}).items():
            x[j, :, tok] += bias
    allowed_before = torch.isfinite(x).any(-1, keepdim=True)  # [a, T, 1]
    biased = x.clone()
    for j, i in enumerate(active):
        p = params[i]
        for tok in _get(p, "banned_token_ids", ()):
            x[j, :, tok] = float("-inf")
        need = _get(p, "min_tokens", 0) - counts.generated[slots[i]]  # positions t < need may not stop
        if need > 0 and stop_ids[i]:
            x[j, :need, torch.tensor(sorted(stop_ids[i]), device=dev)] = float("-inf")
    # A ban or min_tokens that leaves nothing allowed (a grammar that is complete allows only stop ids)
    # yields to what allowed something: the grammar wins over min_tokens, never an all -inf row.
    x = torch.where(allowed_before & ~torch.isfinite(x).any(-1, keepdim=True), biased, x)

    rep = torch.tensor([float(_get(params[i], "repetition_penalty", 1.0)) for i in active], device=dev)[:, None, None]
    freq = torch.tensor([float(_get(params[i], "frequency_penalty", 0.0)) for i in active], device=dev)[:, None, None]
    pres = torch.tensor([float(_get(params[i], "presence_penalty", 0.0)) for i in active], device=dev)[:, None, None]
    penalised = torch.where(x > 0, x / rep, x * rep)
    x = torch.where(seen, penalised, x)
    x = x - freq * output - pres * (output > 0).float()
    out[rows] = x
    return out


# ---- logprobs -------------------------------------------------------------------------------------
# What a logprob is. OpenAI documents `logprobs` as "the log probability of this token" and says no
# more. vLLM's default (`logprobs_mode="raw_logprobs"`) is the log-softmax of the model's raw logits,
# before penalties, temperature, top-k and top-p; its "processed_logprobs" mode is after all of them.
# stepflash returns the distribution the token was actually drawn from (issue #12, and what
# `sampling.token_logprobs` already does): after the grammar mask, bias, min_tokens, penalties,
# temperature, top-k and top-p. Greedy rows draw from a one-hot, which says nothing; for them it is the
# log-softmax of the processed logits at temperature 1. A token outside the support has -inf (the
# server writes it as -9999.0, as vLLM does, since JSON has no -inf). mode="raw" gives vLLM's default.

def sampled_logprobs(logits: torch.Tensor, probs: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """Processed logits [N, V], the sampled distribution probs [N, V] (`target_probs`), greedy [N] bool
    -> log-probabilities [N, V] fp32 of the distribution each row's token is drawn from."""
    soft = torch.log_softmax(logits.float(), dim=-1)
    return torch.where(greedy[:, None], soft, probs.float().log())


def top_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int):
    """logprobs [N, V], chosen ids [N] -> (chosen logprob [N], top ids [N, k], top logprobs [N, k]),
    the top k in descending order (ties by lower id first, so results do not depend on the kernel)."""
    chosen = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
    if k <= 0:
        empty = logprobs.new_zeros(logprobs.shape[0], 0)
        return chosen, empty.long(), empty
    # Stable ordering: sort by (-logprob, id); a plain topk may order equal values arbitrarily.
    order = torch.sort(logprobs, dim=-1, descending=True, stable=True).indices[:, :k]
    return chosen, order, logprobs.gather(-1, order)


# ---- the engine's per-row pipeline ------------------------------------------------------------------

class RowLogits:
    """What the engine does per row between the model's head and sampling: the grammar mask
    (`structured.py`, masks along the row's drafts), the processors above, a check that the row still
    has a finite distribution, and after sampling the top logprobs and the bookkeeping (counts, grammar
    state). Rows that need none of it cost nothing: `process` returns the logits untouched."""

    def __init__(self, max_batch_size: int, vocab_size: int, device=None):
        self.counts = TokenCounts(max_batch_size, vocab_size, device)
        self.words = (vocab_size + 31) // 32  # int32 words of a grammar bitmask
        # Grammar masks are computed while the forward runs only where the forward runs elsewhere (an
        # accelerator): on the CPU the forward already uses every core, and handing the masks to a thread
        # costs more than the masks (tens of µs for a batch of 8 at a small vocabulary).
        self.overlap = device is not None and torch.device(device).type != "cpu"
        self._pool: ThreadPoolExecutor | None = None  # computes grammar masks during the forward
        self._pending = None  # ({request id: (row, drafts)}, Future of the masks [g, T, words])

    def start(self, slot: int, prompt: list[int], params) -> None:
        """At prefill: the slot's counts start from the prompt (rows with processors only)."""
        if is_active(params):
            self.counts.reset(slot, prompt)

    def accepted(self, slot: int, params, tokens: list[int]) -> None:
        """Tokens emitted by a row that goes on (none of them a stop id): counts and grammar state."""
        if is_active(params):
            self.counts.add(slot, tokens)
        grammar = _get(params, "grammar", None)
        if grammar is not None and tokens and not grammar.consume(tokens):
            raise RuntimeError(f"the grammar refused an emitted token: {grammar.error}")

    def process(self, reqs: list, logits: torch.Tensor) -> torch.Tensor:
        """logits [n, T, V] at the verified positions of `reqs` (Requests: params, slot, drafts, stop)
        -> the logits to sample from. Raises if a row has no finite distribution left (NaN, +inf, or
        every token masked): the engine then fails that row alone."""
        grammar_rows = [i for i, r in enumerate(reqs) if _get(r.params, "grammar", None) is not None]
        x = logits
        if grammar_rows:
            from stepflash.inference.structured import masked_logits

            bits = self._grammar_masks([reqs[i] for i in grammar_rows], logits.shape[1])  # [g, T, words]
            if len(grammar_rows) == len(reqs):
                x = masked_logits(logits, bits)
            else:
                x = logits.float().clone()
                rows = torch.tensor(grammar_rows, device=x.device)
                x[rows] = masked_logits(x[rows], bits)
        if any(is_active(r.params) for r in reqs):
            x = apply_processors(x, [r.slot for r in reqs], [r.params for r in reqs], self.counts,
                                 [r.stop for r in reqs], [r.drafts for r in reqs])
        if not bool(torch.isfinite(x.amax(-1)).all()):  # amax is NaN with a NaN, -inf with nothing allowed
            raise RuntimeError("the row's logits have no finite distribution (NaN or inf, or no token allowed)")
        return x

    # ---- grammar masks, overlapped with the forward ----
    def prefetch(self, reqs: list) -> None:
        """Before the trunk forward: start the grammar rows' masks along their drafts in a worker thread
        (llguidance's batched call releases the GIL), so the CPU computes them while the forward runs;
        `process` takes them. Nothing may touch those rows' matchers until then (the engine does not)."""
        self._take_prefetched()  # one a failed step left behind: finish it before the matchers move on
        rows = [r for r in reqs if _get(r.params, "grammar", None) is not None]
        if rows and self.overlap:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
            T = 1 + max(len(r.drafts) for r in rows)
            self._pending = ({r.id: (j, tuple(r.drafts)) for j, r in enumerate(rows)},
                             self._pool.submit(self._fill_masks, rows, T))

    def _take_prefetched(self):
        pending, self._pending = self._pending, None
        if pending is None:
            return None, None
        try:
            return pending[0], pending[1].result()
        except Exception:  # noqa: BLE001 - `process` computes again in the engine's thread and raises there
            return None, None

    def _grammar_masks(self, rows: list, T: int) -> torch.Tensor:
        """The masks of `rows` (grammar rows) at T positions: [g, T, words], the prefetched ones where
        they were made for these rows and drafts, else computed now."""
        where, bits = self._take_prefetched()
        if bits is None or bits.shape[1] > T or any(where.get(r.id, (0, None))[1] != tuple(r.drafts) for r in rows):
            return self._fill_masks(rows, T)
        bits = bits[[where[r.id][0] for r in rows]] if len(rows) != len(where) else bits
        if bits.shape[1] < T:  # a compiled step pads T to its bucket
            bits = torch.cat([bits, bits.new_full((len(rows), T - bits.shape[1], self.words), -1)], 1)
        return bits

    def _fill_masks(self, rows: list, T: int) -> torch.Tensor:
        from stepflash.inference.structured import masks_along_drafts

        bits = torch.full((len(rows), T, self.words), -1, dtype=torch.int32)  # -1: all allowed
        masks_along_drafts([r.params.grammar for r in rows], [r.drafts for r in rows], bits, parallel=self.overlap)
        return bits

    @staticmethod
    def top_logprobs(reqs: list, logits: torch.Tensor, x: torch.Tensor, probs: torch.Tensor | None,
                     emitted: torch.Tensor) -> list:
        """Per row: None, or (logprob of each emitted token [T], its top alternatives [T][k] as (id,
        logprob)) for rows with `params.logprobs` set. logits [n, T, V] raw, x processed, probs [n, T, V]
        the sampled distribution (None when every row is greedy), emitted [n, T]."""
        out = []
        for i, r in enumerate(reqs):
            k = _get(r.params, "logprobs", None)
            if k is None:
                out.append(None)
                continue
            greedy = torch.full((x.shape[1],), r.params.temperature <= 0, device=x.device)
            if _get(r.params, "logprobs_mode", "processed") == "raw":
                lp = torch.log_softmax(logits[i].float(), -1)
            else:
                lp = sampled_logprobs(x[i], probs[i] if probs is not None else x[i], greedy)
            chosen, ids, vals = top_logprobs(lp, emitted[i], k)
            tops = [list(zip(a, b)) for a, b in zip(ids.tolist(), vals.tolist())]
            out.append((chosen.tolist(), tops))
        return out
