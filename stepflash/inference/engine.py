"""The inference engine: batched prefill and decode over a preallocated KV cache, continuous batching,
per-request sampling and MTP self-speculative decoding.

    engine = Engine(model, max_batch_size=8)
    results = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.7, seed=0)
    for tok in engine.stream([1, 2, 3], 32): ...
    rid = engine.add_request(ids, SamplingParams(...)); outs = engine.step(); engine.abort(rid)

Each `step` first prefills newly admitted requests (their first token comes out of that forward), then
runs one decode forward over every request that was already running. A decode forward feeds each row
its newest token followed by its drafts (none for plain decoding), so plain and speculative requests
share one trunk forward; rows are padded to the longest (see `kv_cache.py`). After every trunk forward
the speculative rows draft their next tokens with the MTP chain, as many as pay (`speculative.py`).
Everything runs the model's own modules; `compile=True` runs decode steps through `torch.compile`
with static shapes (`compile.py`, docs/inference.md).

Generated tokens include the stop token that ended a request (finish_reason "stop"); logprobs are
those of the distribution each token was drawn from (after the grammar mask, logits processors,
temperature/top-k/top-p; for greedy, the log-softmax of the processed logits), or with
`SamplingParams.logprobs_mode="raw"` the log-softmax of the model's logits.

Per-row logits work (grammar masks, penalties, bias, min_tokens, top logprobs) is `RowLogits`
(`logits_process.py`); it applies at every verified position of a speculative step, so speculation
stays exact under every constraint (a draft the grammar refuses has p = 0 and is rejected).

Isolation: an error raised while deciding one row's tokens (or a row whose logits hold no finite
distribution) fails that row alone: the batch is decided again row by row with every random stream
restored, so the other rows get exactly the tokens they would have had; the failed row's StepOutput
has finish_reason "error" and `error` set, and its slot is freed.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from stepflash.errors import UserError
from stepflash.inference.compile import CompiledDecode, bucket_of, compiler_missing
from stepflash.inference.kv_cache import TRUNK, KVCache, mtp_group
from stepflash.inference.logits_process import RowLogits
from stepflash.inference.sampling import row_params, target_probs, token_logprobs, uniforms
from stepflash.inference.scheduler import Request, SamplingParams, Scheduler
from stepflash.inference.speculative import DraftPolicy, DraftRow, MTPDrafter, verify, verify_greedy

__all__ = ["Engine", "GenerationResult", "SamplingParams", "StepOutput"]

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    request_id: int
    new_token_ids: list[int]
    new_logprobs: list[float]
    finished: bool
    finish_reason: str | None
    error: str | None = None  # this row failed (finish_reason "error"); the others are unaffected
    # params.logprobs = k: per new token its top k alternatives [(id, logprob)], best first
    new_top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class GenerationResult:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    stats: dict = field(default_factory=dict)


class Engine:
    def __init__(self, model, max_batch_size: int = 8, device=None, *, cache_slack: int = 8, cache_capacity: int = 256,
                 compile: bool = False, adaptive_drafts: bool = True):
        """The engine runs the model's own modules and keeps references to its parameters: in-place
        updates (optimizer steps, load_state_dict) are seen by the next step; replacing Parameter
        objects needs a new Engine. compile: run decode steps through `torch.compile` (`compile.py`);
        without a compiler the engine stays eager and `compile_note` says why. adaptive_drafts: a
        speculative request drafts up to its `speculative_tokens`, as many as pay (`DraftPolicy`);
        False drafts exactly that many every step (to measure acceptance at a fixed k)."""
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.config = cfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_batch_size = max_batch_size
        self.context = cfg.max_position_embeddings
        self.eos = frozenset(cfg.eos_token_ids)
        with torch.inference_mode():
            self.cache = KVCache(cfg, max_batch_size, device=self.device, dtype=self.dtype, slack=cache_slack,
                                 capacity=cache_capacity)
            self.drafter = MTPDrafter(model, self.cache, max_batch_size, self.device, self.dtype)
        n = cfg.num_nextn_predict_layers
        skip = all(self.cache.can_skip(mtp_group(j)) for j in range(n))
        self.policy = DraftPolicy(n, self.drafter.S, can_skip=skip) if adaptive_drafts else None
        self.scheduler = Scheduler(max_batch_size)
        self.rows = RowLogits(max_batch_size, cfg.vocab_size, self.device)
        self._ids = itertools.count()
        self.compiled: CompiledDecode | None = None
        self.compile_note: str | None = None
        if compile:
            missing = compiler_missing(self.device)
            if missing:
                self.compile_note = f"compile: {missing}; decoding eager"
                log.warning(self.compile_note)
            else:
                self.compiled = CompiledDecode(model, self.cache, self.drafter.history, max_batch_size,
                                               1 + cfg.num_nextn_predict_layers)

    @property
    def compile_seconds(self) -> float:
        """Time spent compiling so far (0 when eager)."""
        return self.compiled.compile_seconds if self.compiled else 0.0

    # ---- public API -------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        self._check(prompt_ids, params)
        eos = frozenset() if params.ignore_eos else self.eos
        req = Request(next(self._ids), list(map(int, prompt_ids)), params,
                      stop=eos | frozenset(int(t) for t in params.stop_token_ids), generator=None)
        self.scheduler.add(req)
        return req.id

    def abort(self, request_id: int) -> bool:
        """Drop a request (waiting or running) and free its slot; False if it is unknown or finished."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        if req.slot is None:
            self.scheduler.remove_waiting(req)
        else:
            self.scheduler.release(req)
        req.finish_reason = req.finish_reason or "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def step(self) -> list[StepOutput]:
        """Prefill newly admitted requests, then one decode forward over the ones already running."""
        with torch.inference_mode():
            decoding = sorted(self.scheduler.running.values(), key=lambda r: r.slot)
            admitted = self.scheduler.admit()
            outputs = []
            for run in _contiguous(admitted):
                outputs += self._forward(run, prefill=True)
            if decoding:
                outputs += self._forward(decoding, prefill=False)
            return outputs

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_token_ids=(), speculative_tokens: int = 0
                 ) -> list[GenerationResult]:
        """Generate for every prompt (batched, continuous). Prompt i samples with seed + i when seed is set."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise UserError("prompts must be a non-empty list of token-id lists")
        reqs = []
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=None if seed is None else seed + i, stop_token_ids=tuple(stop_token_ids),
                                    speculative_tokens=speculative_tokens)
            reqs.append(self.scheduler.requests[self.add_request(prompt, params)])
        t0 = time.perf_counter()
        while any(not r.finished for r in reqs):
            self.step()
        wall = time.perf_counter() - t0
        total = sum(len(r.output) for r in reqs)
        results = []
        for r in reqs:
            stats = r.stats()
            stats["batch_tokens_per_s"] = total / wall if wall > 0 else 0.0
            results.append(GenerationResult(list(r.output), list(r.logprobs), r.finish_reason, stats))
        return results

    def stream(self, prompt_ids: list[int], max_new_tokens: int, **sampling) -> Iterator[int]:
        """Yield generated token ids of one request as they are decided."""
        rid = self.add_request(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, **sampling))
        req = self.scheduler.requests[rid]
        try:
            sent = 0
            while not req.finished:
                self.step()
                yield from req.output[sent:]
                sent = len(req.output)
        finally:
            if not req.finished:
                self.abort(rid)

    # ---- internals --------------------------------------------------------------------------
    def _check(self, prompt_ids, params: SamplingParams) -> None:
        params.check(self.config.num_nextn_predict_layers, self.config.vocab_size)
        if not prompt_ids:
            raise UserError("the prompt is empty; give at least one token")
        vocab = self.config.vocab_size
        if any(not 0 <= int(t) < vocab for t in prompt_ids):
            raise UserError(f"prompt token ids must be in 0..{vocab - 1}")
        if len(prompt_ids) >= self.context:
            raise UserError(f"the prompt has {len(prompt_ids)} tokens, more than the model's context of "
                            f"{self.context} leaves room for")
        if len(prompt_ids) + params.max_new_tokens > self.context:
            raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                            f"exceeds the model's context of {self.context} tokens")

    def _forward(self, reqs: list[Request], prefill: bool) -> list[StepOutput]:
        """One trunk forward over the slot range of `reqs`, then acceptance, emission and drafting."""
        t0 = time.perf_counter()
        feeds = [r.prompt if prefill else [r.tokens[-1]] + r.drafts for r in reqs]
        if prefill:
            for r in reqs:
                self.cache.reset(r.slot)
                self.rows.start(r.slot, r.prompt, r.params)
        self.rows.prefetch(reqs)  # grammar masks, computed while the forward runs
        lo, hi, starts, h, logits, compiled = self._trunk_forward(reqs, feeds, prefill)
        decided = self._decide_rows(reqs, logits, [len(r.drafts) if not prefill else 0 for r in reqs])
        now, outputs, draft_rows = time.perf_counter(), [], []
        for r, d in zip(reqs, decided):
            if isinstance(d, str):
                outputs.append(self._fail(r, d))
                continue
            try:
                want, out = self._accept(r, *d, start=starts[r.slot - lo], prefill=prefill, rate=sum(
                    map(len, feeds)) / (now - t0), now=now, rows=len(reqs))
            except Exception as e:  # noqa: BLE001 - one row's bookkeeping failing fails that row alone
                log.exception("request %s failed", r.id)
                outputs.append(self._fail(r, _one_line(e)))
                continue
            outputs.append(out)
            if want > 0:
                draft_rows.append(DraftRow(r.slot - lo, r.slot, want, starts[r.slot - lo],
                                           self.cache.lengths[TRUNK][r.slot], r.tokens, r.params, r.generator,
                                           r.drafts))
        t1 = time.perf_counter()
        if not prefill and self.policy:
            self.policy.observe("verify", len(reqs), max(map(len, feeds)) - 1, t1 - t0)
        if draft_rows:
            regular = self.drafter.draft(lo, hi, draft_rows, h, compiled)
            if not prefill and self.policy and regular:  # catch-up passes are not what drafting costs
                self.policy.observe("draft", len(reqs), max(r.k for r in draft_rows), time.perf_counter() - t1)
        return outputs

    def _accept(self, r: Request, a: int, toks: list[int], lps: list[float], tops, *, start: int, prefill: bool,
                rate: float, now: float, rows: int) -> tuple[int, StepOutput]:
        """A decided row: cache, statistics, emission, counts and grammar state -> (drafts wanted, output)."""
        # Keep the newest token and the accepted drafts in the trunk cache, drop the rejected ones.
        self.cache.truncate(TRUNK, r.slot, start + (len(r.prompt) if prefill else 1 + a))
        if prefill:
            r.prefill_rate, r.t_first = rate, now
        elif r.drafts:
            r.verify_steps += 1
            r.accepted += a
            for j in range(len(r.drafts)):
                r.pos_tried[j] += 1
                r.pos_accepted[j] += j < a
            if self.policy:
                self.policy.observe_verify(r, len(r.drafts), a)
        slot = r.slot
        out = self._emit(r, toks[: a + 1], lps[: a + 1], now, tops[1][: a + 1] if tops else None)
        if r.finished:
            return 0, out
        self.rows.accepted(slot, r.params, out.new_token_ids)
        return self._draft_count(r, rows), out

    def _trunk_forward(self, reqs: list[Request], feeds: list[list[int]], prefill: bool):
        """Feed each row its tokens -> (lo, hi, lengths before, h [b, T, hidden], logits [n, T or 1, V] of
        the rows of `reqs`, the CompiledDecode used or None). A compiled decode step covers the static
        slot range [0, B) and T from their buckets (compile.py)."""
        compiled = None if prefill else self.compiled
        if compiled:
            lo, hi = 0, bucket_of(reqs[-1].slot + 1, compiled.batch_buckets)
            T = bucket_of(max(map(len, feeds)), compiled.token_buckets)
            compiled = compiled if compiled.covers(hi, T) else None
        if not compiled:
            lo, hi, T = reqs[0].slot, reqs[-1].slot + 1, max(map(len, feeds))
        feed = {r.slot - lo: f for r, f in zip(reqs, feeds)}
        ids = torch.zeros(hi - lo, T, dtype=torch.long)  # rows right-padded; idle rows all padding
        for i, f in feed.items():
            ids[i, : len(f)] = torch.tensor(f, dtype=torch.long)
        starts = self.cache.lengths[TRUNK][lo:hi]
        valid = [len(feed.get(i, ())) for i in range(hi - lo)]
        rows = torch.tensor([r.slot - lo for r in reqs], device=self.device)
        if compiled:  # the newest token and every draft
            self.cache.reserve(TRUNK, lo, hi, T, valid)
            h, logits = compiled.trunk(ids.to(self.device))  # [B, T, hidden], [B, T, V]
            logits = logits[rows]
        else:
            pos = self.cache.begin(TRUNK, lo, hi, T, valid)
            h = self.model.trunk(ids.to(self.device), pos, self.cache)  # [b, T, hidden]
            if prefill:  # only the last prompt token predicts something new
                last = torch.tensor([len(r.prompt) - 1 for r in reqs], device=self.device)
                logits = self.model.head(h[rows, last])[:, None]  # [n, 1, V]
            else:
                logits = self.model.head(h[rows])  # [n, T, V]
        if not compiled and any(r.params.speculative_tokens for r in reqs):  # module 0's inputs, for catching up
            self.drafter.record(0, lo, starts, valid, h)
        return lo, hi, starts, h, logits, compiled

    def _draft_count(self, r: Request, rows: int) -> int:
        limit = min(r.params.speculative_tokens, r.remaining - 1)
        if limit <= 0 or not self.policy:
            return max(limit, 0)
        n = self.cache.lengths[TRUNK][r.slot]
        lags = [n - self.cache.lengths[mtp_group(j)][r.slot] for j in range(limit)]
        self.policy.rows = rows
        return self.policy.choose(r, limit, lags)

    def _decide_rows(self, reqs: list[Request], logits: torch.Tensor, k: list[int]) -> list:
        """`_decide` over the batch, per row (a, tokens, logprobs, top logprobs) or the one-line error that
        row failed with. If the batch raises, every row is decided alone, its random stream first
        restored: the innocent rows get exactly what the batch would have given them."""
        states = [r.generator.get_state() if r.generator is not None else None for r in reqs]
        try:
            return list(zip(*self._decide(reqs, logits, k)))
        except Exception as e:  # noqa: BLE001 - find the row(s) that fail
            if len(reqs) == 1:
                log.warning("request %s failed: %s", reqs[0].id, _one_line(e))
                return [_one_line(e)]
        out = []
        for i, (r, state) in enumerate(zip(reqs, states)):
            if state is not None:
                r.generator.set_state(state)
            try:
                out += list(zip(*self._decide([r], logits[i: i + 1], k[i: i + 1])))
            except Exception as e:  # noqa: BLE001
                log.warning("request %s failed: %s", r.id, _one_line(e))
                out.append(_one_line(e))
        return out

    def _decide(self, reqs: list[Request], logits: torch.Tensor, k: list[int]):
        """logits [n, K+1, V] at the verified positions, k[i] drafts of row i (0 at prefill) ->
        per row: accepted draft count, the K+1 candidate tokens (accepted drafts, then the final token
        at index a), their logprobs, and None or (logprobs, top alternatives) for rows asking for them."""
        n, Tv, V = logits.shape
        K, dev = Tv - 1, self.device
        raw, logits = logits, self.rows.process(reqs, logits)  # grammar masks, processors
        drafts = torch.zeros(n, K, dtype=torch.long)
        for i, r in enumerate(reqs):
            if k[i]:
                drafts[i, : k[i]] = torch.tensor(r.drafts)
        drafts = drafts.to(dev)
        if all(r.params.temperature <= 0 for r in reqs):  # greedy rows only: no distributions needed
            best = logits.float().argmax(-1)  # [n, K+1]
            a = verify_greedy(best, drafts, torch.tensor(k, device=dev))
            lp = torch.log_softmax(logits.float(), -1).gather(-1, best[..., None]).squeeze(-1)
            return a.tolist(), best.tolist(), *self._logprobs(reqs, raw, logits, None, best, lp)
        temp, top_k, top_p = (t.repeat_interleave(Tv) for t in row_params([r.params for r in reqs], dev))
        p = target_probs(logits.reshape(n * Tv, V), temp, top_k, top_p).reshape(n, Tv, V)
        u = uniforms([r.generator for r in reqs], [ki + 1 for ki in k], K + 1, dev)  # k accept tests + 1 draw
        k_t = torch.tensor(k, device=dev)
        slots = torch.tensor([r.slot for r in reqs], device=dev)
        a, final = verify(p, drafts, self.drafter.q[slots, :K], k_t, u[:, :K], u.gather(1, k_t[:, None]).squeeze(1))
        emitted = torch.cat([drafts, torch.zeros(n, 1, dtype=torch.long, device=dev)], 1)  # [n, K+1]
        emitted[torch.arange(n, device=dev), a] = final
        lp = token_logprobs(logits.reshape(n * Tv, V), p.reshape(n * Tv, V), emitted.reshape(-1), temp <= 0)
        return a.tolist(), emitted.tolist(), *self._logprobs(reqs, raw, logits, p, emitted, lp.reshape(n, Tv))

    def _logprobs(self, reqs, raw, logits, p, emitted, lp) -> tuple[list, list]:
        """Token logprobs [n][K+1] and per row None or (logprobs, alternatives) for rows that ask; a
        row in logprobs_mode "raw" gets raw logprobs for its tokens too."""
        lp = lp.tolist()
        if all(r.params.logprobs is None for r in reqs):
            return lp, [None] * len(reqs)
        tops = self.rows.top_logprobs(reqs, raw, logits, p, emitted)
        return [t[0] if t else row for t, row in zip(tops, lp)], tops

    def _fail(self, r: Request, error: str) -> StepOutput:
        """Drop a row that failed; its StepOutput says why."""
        r.finish_reason, r.drafts = "error", []
        self.scheduler.release(r)
        return StepOutput(r.id, [], [], True, "error", error=error)

    def _emit(self, r: Request, tokens: list[int], logprobs: list[float], now: float, tops=None) -> StepOutput:
        """Append tokens to the request until it stops; a finished request leaves its slot."""
        new = []
        for tok, logprob in zip(tokens, logprobs):
            new.append(tok)
            if r.emit(tok, logprob):
                break
        r.drafts = []
        if r.finished:
            r.t_done = now
            self.scheduler.release(r)
        return StepOutput(r.id, new, logprobs[: len(new)], r.finished, r.finish_reason,
                          new_top_logprobs=None if tops is None else tops[: len(new)])


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def _contiguous(reqs: list[Request]) -> list[list[Request]]:
    """Split requests into runs of consecutive slots (each run is one prefill forward)."""
    runs: list[list[Request]] = []
    for r in sorted(reqs, key=lambda r: r.slot):
        if runs and runs[-1][-1].slot + 1 == r.slot:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs
