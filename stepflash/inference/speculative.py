"""MTP-3 self-speculative decoding: draft with the chained MTP modules, verify with one trunk forward.

Positions and inputs (SPEC section 5). Let the trunk hold positions 0..n-1 and x_n be the newest token
(sampled, not yet through the trunk). Module j at position t reads h_prev(t) (trunk hidden for j = 0,
module j-1's z(t) otherwise) and the token x[t+1+j], and predicts x[t+2+j]. Drafting runs every
module at position n-1: module 0 with (h(n-1), x_n) drafts d1 = x[n+1], module 1 with (z0(n-1), d1)
drafts d2, module 2 with (z1(n-1), d2) drafts d3. The trunk then verifies [x_n, d1..dK] at positions
n..n+K in one forward, and the accepted prefix plus one corrected/bonus token is emitted.

MTP caches. Module j's cache must hold, for every earlier position t, the entry computed from the
true tokens, as in the teacher-forced chain (`model.mtp_logits`). At position t it needs x[t+1+j],
which is known only for t <= n-1-j; so each draft pass feeds module j the positions from its cache
length c_j up to n-1 (the verified hidden states of the newly accepted tokens, as vLLM/SGLang feed
them), drafts from the last one, then rolls its cache back to n-j entries: positions past n-1-j used
draft tokens and are recomputed next time with the verified ones. Module j's inputs for positions
before this pass's trunk forward (or module j-1's first output of this pass) come from its history.

Paying for drafts. A draft costs an MTP module pass and a wider verify step (which, in a MoE, reads
the experts of every verified token); drafts that are rejected are pure loss. `DraftPolicy` sets each
row's draft count from its measured acceptance and the measured step costs, down to none (with a
probe now and then); modules that sit out steps catch up exactly from `MTPDrafter.history` (or, after
more than its S positions, resume with a gap in their sliding window).

Acceptance (Leviathan et al. / Chen et al. speculative sampling): with p the target and q the draft
distribution (both after temperature/top-k/top-p), draft d is accepted with probability
min(1, p(d)/q(d)); at the first rejection the token is drawn from norm(max(p - q, 0)); if all K drafts
pass, a bonus token is drawn from p at the next position. The emitted tokens are distributed exactly
as sampling from p one token at a time. Greedy rows use one-hot p and q, which reduces the same rule
to "accept while the draft equals the argmax, then emit the argmax": plain greedy, token for token.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch

from stepflash.inference.compile import bucket_of
from stepflash.inference.kv_cache import KVCache, mtp_group
from stepflash.inference.sampling import row_params, sample, target_probs, uniforms


@dataclass
class DraftRow:
    """One row that wants drafts after a trunk forward."""
    row: int  # index within the forward's slot range
    slot: int
    k: int  # number of drafts wanted (>= 1)
    n_prev: int  # trunk length before that forward (its first fed position)
    n: int  # trunk length after it; tokens[n] is the newest token
    tokens: list[int]  # x_0 .. x_n
    params: object  # SamplingParams
    generator: torch.Generator | None
    drafts: list[int] = field(default_factory=list)


class MTPDrafter:
    """Per-slot drafting state: each module's input history and the draft distributions q.

    `history[j]` [slots, S + 1, hidden] holds module j's inputs (trunk hidden states for j = 0, module
    j-1's outputs otherwise) for the last S positions, at column position % S (column S is a trash
    column for writes nobody reads). Module j's inputs for a pass are the history from its cache length
    up to where this pass's direct source (the trunk forward's h, or module j-1's outputs of this pass)
    starts, then that source: so a module that sat out some steps catches up exactly."""

    def __init__(self, model, cache: KVCache, max_batch_size: int, device, dtype, history: int = 64):
        cfg = model.config
        self.model, self.cache = model, cache
        self.num_modules = cfg.num_nextn_predict_layers
        self.S = history
        self.history = [torch.zeros(max_batch_size, history + 1, cfg.hidden_size, device=device, dtype=dtype)
                        for _ in range(max(1, self.num_modules))]
        self.q = torch.zeros(max_batch_size, max(1, self.num_modules), cfg.vocab_size, device=device)
        self.device = device
        self.trace: list[dict] | None = None  # tests set a list to record every draft's logits
        # Optional (row, module j, drafted token) -> token replacing the draft (tests force acceptance with it).
        self.draft_hook = None

    def record(self, level: int, lo: int, first: list[int], count: list[int], x: torch.Tensor) -> None:
        """Keep x [b, T, hidden] (row r: positions first[r] .. first[r] + count[r] - 1 of slot lo + r)
        in history level `level`; only each row's last S positions are written."""
        b, T = x.shape[:2]
        dev = self.device
        t = torch.arange(T, device=dev)[None, :]
        first_t, count_t = (torch.tensor(v, device=dev)[:, None] for v in (first, count))
        keep = (t < count_t) & (t >= count_t - self.S)
        cols = torch.where(keep, (first_t + t) % self.S, self.S)  # [b, T]
        rows = torch.arange(lo, lo + b, device=dev)[:, None]
        self.history[level][rows, cols] = x.to(self.history[level].dtype)

    def _input_index(self, starts: list[int], M: int, direct_first: list[int], width: int) -> torch.Tensor:
        """Where module inputs come from: [b, M] indices into cat(history level [b, S+1], direct [b, D])
        for positions starts[r] .. + M - 1 (before direct_first[r]: the history; then the direct source)."""
        dev = self.device
        t = torch.tensor(starts, device=dev)[:, None] + torch.arange(M, device=dev)[None, :]  # [b, M] positions
        f = torch.tensor(direct_first, device=dev)[:, None]
        return torch.where(t < f, t % self.S, self.S + 1 + (t - f)).clamp(max=width - 1)

    def _inputs(self, j: int, lo: int, hi: int, starts: list[int], lens: list[int], direct: torch.Tensor,
                direct_first: list[int], M: int) -> torch.Tensor:
        """Module j's inputs [b, M, hidden]: row r's positions starts[r] .. + lens[r] - 1, from the history
        before direct_first[r] and from `direct` [b, D, hidden] (whose column 0 is position direct_first[r])."""
        for s, n, f in zip(starts, lens, direct_first):
            assert not n or f - s <= self.S, f"MTP module {j} is {f - s} positions behind, more than its history"
        src = torch.cat([self.history[j][lo:hi], direct.to(self.history[j].dtype)], dim=1)  # [b, S+1+D, hidden]
        idx = self._input_index(starts, M, direct_first, src.shape[1])
        return src.gather(1, idx[:, :, None].expand(*idx.shape, src.shape[-1])).to(direct.dtype)

    def draft(self, lo: int, hi: int, rows: list[DraftRow], h: torch.Tensor, compiled=None) -> bool:
        """Run the chain for `rows` of the slot range [lo, hi); h [b, T, hidden] is the trunk output of
        the forward that fed positions n_prev .. (row r's first n - n_prev entries are real).
        Fills each row's `drafts` and `self.q[slot, :k]`. compiled: the engine's `CompiledDecode`
        (a decode step over its static slot range), or None for the model's modules run eagerly.
        Returns False when a module had to catch up on positions it sat out (a slower pass than usual)."""
        if compiled and self._draft_fused(lo, hi, rows, h, compiled):
            return True
        b, dev = hi - lo, self.device
        regular = True
        by_row = {r.row: r for r in rows}
        u = uniforms([by_row[i].generator if i in by_row else None for i in range(b)],
                     [by_row[i].k if i in by_row else 0 for i in range(b)], max(r.k for r in rows), dev)
        direct, direct_first = h, [by_row[i].n_prev if i in by_row else 0 for i in range(b)]
        for j in range(max(r.k for r in rows)):
            active = [r for r in rows if r.k > j]
            group = mtp_group(j)
            starts, lens, toks = [0] * b, [0] * b, [[] for _ in range(b)]
            for r in active:
                c = self.cache.lengths[group][r.slot]
                assert c <= r.n - j or c == 0, f"MTP module {j} cache of slot {r.slot} ahead of the trunk"
                first = direct_first[r.row]
                if first - c > self.S:  # sat out longer than its history: resume where the history starts
                    self.cache.skip(group, r.slot, first - self.S)
                    c = first - self.S
                starts[r.row], lens[r.row] = c, r.n - c
                # Module j at position t reads x[t+1+j]: a verified token, or one of this pass's drafts.
                toks[r.row] = (r.tokens[: r.n + 1] + r.drafts[:j])[c + 1 + j: r.n + 1 + j]
            M = max(lens)
            regular &= M <= 2 * self.num_modules + 1
            use = compiled if compiled and M <= compiled.draft_buckets[-1] else None
            M = bucket_of(M, use.draft_buckets) if use else M
            ids = torch.zeros(b, M, dtype=torch.long)
            for i, t in enumerate(toks):
                ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            h_in = self._inputs(j, lo, hi, starts, lens, direct, direct_first, M)
            last = torch.tensor([max(m - 1, 0) for m in lens], device=dev)
            if use:
                self.cache.reserve(group, lo, hi, M, lens)
                z, logits = use.mtp(j, ids.to(dev), h_in, last)  # [b, M, hidden], [b, vocab]
            else:
                pos = self.cache.begin(group, lo, hi, M, lens)
                z = self.model.mtp_block(j, ids.to(dev), h_in, pos, self.cache)  # [b, M, hidden]
                logits = self.model.mtp_head(j, z[torch.arange(b, device=dev), last])  # [b, vocab]
            if j + 1 < self.num_modules:
                self.record(j + 1, lo, starts, lens, z)
            direct, direct_first = z, starts
            self._take_drafts(j, group, active, logits, u, dev)
        return regular

    def _draft_fused(self, lo: int, hi: int, rows: list[DraftRow], h: torch.Tensor, compiled) -> bool:
        """Every MTP module in one compiled call (`CompiledDecode.chain`): greedy rows, each module within
        one step of the trunk, no test hooks. Rows wanting fewer drafts keep the first ones. False when
        it does not apply (the caller then runs module by module)."""
        K, M, b = self.num_modules, compiled.draft_buckets[0], hi - lo
        if self.draft_hook or self.trace is not None or any(r.params.temperature > 0 for r in rows):
            return False
        starts = [[0] * b for _ in range(K)]
        lens = [[0] * b for _ in range(K)]
        for j in range(K):
            for r in rows:
                c = self.cache.lengths[mtp_group(j)][r.slot]
                starts[j][r.row], lens[j][r.row] = c, r.n - c
            if max(lens[j]) > M:
                return False
        ids = torch.zeros(K, b, M, dtype=torch.long)
        slots = torch.full((K, b, K), M, dtype=torch.long)  # where module j puts module i's draft (M: nowhere)
        last = torch.zeros(K, b, dtype=torch.long)
        for j in range(K):
            for r in rows:
                c, L = starts[j][r.row], lens[j][r.row]
                known = r.tokens[c + 1 + j: r.n + 1]  # module j at position t reads x[t+1+j]
                ids[j, r.row, : len(known)] = torch.tensor(known, dtype=torch.long)
                for i in range(j):  # module i's draft is x[n+1+i]: position index L - j + i
                    if L - j + i >= 0:
                        slots[j, r.row, i] = L - j + i
                last[j, r.row] = L - 1
        firsts = [[next((r.n_prev for r in rows if r.row == i), 0) for i in range(b)]] + starts[:-1]
        widths = [self.S + 1 + h.shape[1]] + [self.S + 1 + M] * (K - 1)
        idx = torch.stack([self._input_index(starts[j], M, firsts[j], widths[j]) for j in range(K)])
        for j in range(K):
            self.cache.reserve(mtp_group(j), lo, hi, M, lens[j])
        dev = self.device
        drafts, zs = compiled.chain(ids.to(dev), h, idx, last.to(dev), slots.to(dev))
        drafts = drafts.tolist()  # [K][b]
        for j in range(K):
            if j + 1 < self.num_modules:
                self.record(j + 1, lo, starts[j], lens[j], zs[j])
        for r in rows:
            r.drafts.extend(drafts[j][r.row] for j in range(r.k))
            for j in range(K):
                self.cache.truncate(mtp_group(j), r.slot, max(0, r.n - j))
        return True

    def _take_drafts(self, j: int, group: int, active: list[DraftRow], logits: torch.Tensor, u, dev) -> None:
        act = torch.tensor([r.row for r in active], device=dev)
        greedy = all(r.params.temperature <= 0 for r in active)
        if greedy:  # verified by argmax (`verify_greedy`): q is not needed
            drafts = logits[act].float().argmax(-1).tolist()
        else:
            probs = target_probs(logits[act], *row_params([r.params for r in active], dev))
            drafts = sample(probs, u[act, j]).tolist()
        if self.draft_hook is not None:
            forced = [self.draft_hook(r, j, d) for r, d in zip(active, drafts)]
            for i, (d, f) in enumerate(zip(drafts, forced)):
                if d != f and not greedy:  # the draft now comes from a point mass, and q must say so
                    probs[i].zero_()[f] = 1.0
            drafts = forced
        if not greedy:
            self.q[torch.tensor([r.slot for r in active], device=dev), j] = probs
        for r, d in zip(active, drafts):
            if self.trace is not None:
                self.trace.append({"slot": r.slot, "j": j, "context": r.tokens[: r.n + 1] + r.drafts[:j],
                                   "logits": logits[r.row].clone()})
            r.drafts.append(d)
            # Positions past n-1-j used drafts: recomputed next pass from the verified tokens.
            self.cache.truncate(group, r.slot, max(0, r.n - j))


class DraftPolicy:
    """How many tokens each speculative row drafts next: the count that maximises expected tokens per
    second, so that speculation costs little when drafts are rejected and pays when they are accepted.

    Expected tokens of a step with k drafts: E(k) = 1 + sum_i prod_{j<=i} alpha_j, with alpha_j the
    row's acceptance rate of draft position j given the previous ones were accepted (a moving average
    over its verify steps; a position is not trusted more than the one before it, which also covers
    positions never tested), mixed with `prior`, every row's acceptance (the mean over their verify steps
    and one optimistic pseudo-step, then a moving average over the last 64), whose weight grows with its
    evidence to 3/4 after 16 verify steps; a row not verified yet starts at the prior. So requests after
    the first do not pay for drafts a model never gets accepted, and a row of a model that is usually
    right does not stop drafting for `probe_every` steps after two or three unlucky rejections (on the
    recipe's MTP checkpoint that stop made adaptive drafting 1.16x plain where fixed K=3 gave 1.33x); a
    row whose drafts keep failing while others' pass still stops.

    Cost of k drafts: the measured wall time of a step cycle with k drafts (from the end of one verify
    step to the end of the next: drafting, verifying and the engine's bookkeeping) over that of a plain
    step, at the same number of rows (1 + 0.6 k until measured). A row that stops drafting probes with
    one draft after `probe_every` steps (twice as long after each failed probe, up to 8x), so a run of
    good drafts is found again. A module that sat out longer than its history (S positions) resumes
    where the history starts, with a gap in its attention window (its layers are sliding); one with
    full-attention layers is run before it would fall that far behind."""

    def __init__(self, num_modules: int, history: int, probe_every: int = 24, rate: float = 0.2,
                 can_skip: bool = True):
        self.num_modules, self.history, self.can_skip = num_modules, history, can_skip
        self.probe_every, self.rate = probe_every, rate
        # every row's acceptance per position: the mean of one optimistic pseudo-observation (1) and the
        # observations, a moving average over the last ~`prior_window` once there are that many
        self.prior, self.prior_seen, self.prior_window = [1.0] * num_modules, [0] * num_modules, 64
        # ("verify" | "draft" | "cycle", rows in the step, drafts) -> the last times; their minimum is the cost
        # (other processes only ever add time, so the minimum is the least noisy estimate)
        self.seconds: dict[tuple[str, int, int], collections.deque] = {}
        self.rows = 1  # rows of the step being decided, set by the engine
        self._last_verify: float | None = None  # clock at the last "verify" observation

    def observe(self, kind: str, rows: int, k: int, seconds: float, now: float | None = None) -> None:
        """kind "verify": a trunk step whose rows fed up to k drafts; "draft": a pass drafting up to k.
        A "verify" also closes a cycle: the wall time since the previous one (at `now`, default the
        clock) is what a step with k drafts costs in all: drafting them, the verify step, and the
        engine's bookkeeping around both, which a plain step pays too (timing only the verify and
        draft parts overstated the cost of drafting by ~15% on a 1-ms step)."""
        self.seconds.setdefault((kind, rows, k), collections.deque(maxlen=16)).append(seconds)
        if kind == "verify":
            now = time.perf_counter() if now is None else now
            if self._last_verify is not None:
                cycle = self.seconds.setdefault(("cycle", rows, k), collections.deque(maxlen=16))
                cycle.append(now - self._last_verify)  # a prefill or an idle wait between: the minimum drops it
            self._last_verify = now

    def cost(self, k: int) -> float:
        """Seconds of a step with k drafts over a plain step, at the current number of rows."""
        cycles = [self.seconds.get(("cycle", self.rows, n)) for n in (k, 0)]
        if not k or not all(c and len(c) >= 3 for c in cycles):
            return 1.0 + 0.6 * k
        return max(min(cycles[0]) / min(cycles[1]), 1.0)  # a wider step is never cheaper; noise can say so

    def observe_verify(self, r, k: int, accepted: int) -> None:
        """Row r's k drafts were verified and the first `accepted` kept."""
        for j in range(min(k, accepted + 1)):  # positions past the first rejection were not tested
            hit = 1.0 if j < accepted else 0.0
            r.accept_rate[j] += self.rate * (hit - r.accept_rate[j])
            self.prior_seen[j] += 1
            self.prior[j] += (hit - self.prior[j]) / min(self.prior_seen[j] + 1, self.prior_window)
        if r.probing:  # a failed probe doubles the wait for the next one (up to 8x)
            r.probe_backoff, r.probing = (1 if accepted else min(2 * r.probe_backoff, 8)), False

    def choose(self, r, limit: int, lags: list[int]) -> int:
        """Drafts for row r (at most `limit`); lags[j] = positions MTP module j is behind the trunk."""
        if getattr(r, "verify_steps", None) == 0:  # an engine request with no estimate of its own yet
            r.accept_rate[:] = self.prior[: len(r.accept_rate)]
        expected, keep, rate, best, best_rate = 1.0, 1.0, 1.0, 0, 1.0 / self.cost(0)
        for k in range(1, limit + 1):
            w = 0.75 * min(self.prior_seen[k - 1], 16) / 16  # the prior's weight grows with its evidence
            rate = min(rate, (1 - w) * r.accept_rate[k - 1] + w * self.prior[k - 1])  # nor a later draft more
            keep *= rate
            expected += keep
            if expected / self.cost(k) > best_rate:
                best, best_rate = k, expected / self.cost(k)
        r.since_draft = 0 if best else r.since_draft + 1
        if not best and r.since_draft >= self.probe_every * r.probe_backoff:
            best, r.since_draft, r.probing = 1, 0, True
        if not self.can_skip:  # a module with full-attention layers must never fall out of its history
            for j, lag in enumerate(lags[:limit]):
                if lag >= self.history - 2 * (self.num_modules + 1):
                    best = max(best, j + 1)
        return min(best, limit)


def verify(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, k: torch.Tensor, u_accept: torch.Tensor,
           u_final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative acceptance for a batch.

    p [b, K+1, V] target probabilities at the verified positions; drafts [b, K] (row r uses its first
    k[r]); q [b, K, V] draft probabilities; u_accept [b, K], u_final [b] uniforms.
    Returns accepted counts a [b] and the final token [b] (correction at a, or bonus at k)."""
    b, K = drafts.shape
    rows = torch.arange(b, device=p.device)
    if K == 0:
        return torch.zeros(b, dtype=torch.long, device=p.device), sample(p[:, 0], u_final)
    p_d = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)  # [b, K] target prob of each draft
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)  # [b, K] draft prob of each draft (> 0: it was drawn)
    ok = (u_accept * q_d < p_d) & (torch.arange(K, device=p.device)[None, :] < k[:, None])  # u < p/q
    a = ok.long().cumprod(-1).sum(-1)  # [b] leading accepted drafts
    residual = (p[:, :K] - q).clamp(min=0)[rows, a.clamp(max=K - 1)]  # [b, V] norm(max(p - q, 0)) at a
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, a.clamp(max=K - 1)])
    dist = torch.where((a >= k)[:, None], p[rows, k], residual)  # bonus from p when every draft passed
    return a, sample(dist, u_final)


def verify_greedy(best: torch.Tensor, drafts: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`verify` for greedy rows, where p and q are one-hot: best [b, K+1] argmax of the target at each
    verified position, drafts [b, K], k [b] -> accepted counts a [b]. A draft is accepted while it equals
    the argmax; the final token is best[a] (the correction, or the bonus when a = k), so the emitted
    tokens are best[:, : a + 1], exactly plain greedy decoding."""
    K = drafts.shape[1]
    ok = (drafts == best[:, :K]) & (torch.arange(K, device=best.device)[None, :] < k[:, None])
    return ok.long().cumprod(-1).sum(-1)
