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
draft tokens and are recomputed next time with the verified ones. Module j's input z(t) for t >= c_j
comes from module j-1's outputs of this pass, except the first (t = c_j), which was module j-1's last
committed output of the previous pass: that one vector per module and row is kept in `carry`.

Acceptance (Leviathan et al. / Chen et al. speculative sampling): with p the target and q the draft
distribution (both after temperature/top-k/top-p), draft d is accepted with probability
min(1, p(d)/q(d)); at the first rejection the token is drawn from norm(max(p - q, 0)); if all K drafts
pass, a bonus token is drawn from p at the next position. The emitted tokens are distributed exactly
as sampling from p one token at a time. Greedy rows use one-hot p and q, which reduces the same rule
to "accept while the draft equals the argmax, then emit the argmax": plain greedy, token for token.
"""

from __future__ import annotations

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
    n_prev: int  # trunk length before that forward
    n: int  # trunk length after it; tokens[n] is the newest token
    tokens: list[int]  # x_0 .. x_n
    params: object  # SamplingParams
    generator: torch.Generator | None
    drafts: list[int] = field(default_factory=list)


class MTPDrafter:
    """Per-slot drafting state: the carried z of each module and the draft distributions q."""

    def __init__(self, model, cache: KVCache, max_batch_size: int, device, dtype):
        cfg = model.config
        self.model, self.cache = model, cache
        self.num_modules = cfg.num_nextn_predict_layers
        self.carry = torch.zeros(max_batch_size, self.num_modules, cfg.hidden_size, device=device, dtype=dtype)
        self.q = torch.zeros(max_batch_size, max(1, self.num_modules), cfg.vocab_size, device=device)
        self.device = device
        self.trace: list[dict] | None = None  # tests set a list to record every draft's logits
        # Optional (row, module j, drafted token) -> token replacing the draft (tests force acceptance with it).
        self.draft_hook = None

    def draft(self, lo: int, hi: int, rows: list[DraftRow], h: torch.Tensor, compiled=None) -> None:
        """Run the chain for `rows` of the slot range [lo, hi); h [b, T, hidden] is the trunk output of
        the forward that produced tokens[n_prev+1 .. n] (row r's first n - n_prev entries are real).
        Fills each row's `drafts` and `self.q[slot, :k]`. compiled: the engine's `CompiledDecode`
        (a decode step over its static slot range), or None for the model's modules run eagerly."""
        b, dev = hi - lo, self.device
        by_row = {r.row: r for r in rows}
        u = uniforms([by_row[i].generator if i in by_row else None for i in range(b)],
                     [by_row[i].k if i in by_row else 0 for i in range(b)], max(r.k for r in rows), dev)
        z_prev, starts_prev, carry_prev = None, None, None
        for j in range(max(r.k for r in rows)):
            active = [r for r in rows if r.k > j]
            group = mtp_group(j)
            starts, lens, toks = [0] * b, [0] * b, [[] for _ in range(b)]
            for r in active:
                c = self.cache.lengths[group][r.slot]
                assert c == max(0, r.n_prev - j), f"MTP module {j} cache of slot {r.slot} out of step"
                starts[r.row], lens[r.row] = c, r.n - c
                toks[r.row] = r.tokens[max(1 + j, r.n_prev + 1): r.n + 1] + r.drafts[:j]
                assert len(toks[r.row]) == r.n - c
            M = bucket_of(max(lens), compiled.token_buckets) if compiled else max(lens)
            ids = torch.zeros(b, M, dtype=torch.long)
            for i, t in enumerate(toks):
                ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            if j == 0:
                h_in = h[:, :M]
            else:
                # Row r's inputs are [carried z at c_j] + this pass's module j-1 outputs, or only the latter
                # when module j starts where module j-1 did (short prompts).
                both = torch.cat([carry_prev[:, None], z_prev], dim=1)  # [b, 1 + M_prev, hidden]
                skip = torch.tensor([0 if starts[i] < starts_prev[i] else 1 for i in range(b)], device=dev)
                idx = (torch.arange(M, device=dev)[None, :] + skip[:, None]).clamp(max=both.shape[1] - 1)
                h_in = both.gather(1, idx[:, :, None].expand(b, M, both.shape[-1]))
            last = torch.tensor([max(m - 1, 0) for m in lens], device=dev)
            if compiled:
                self.cache.reserve(group, lo, hi, M, lens)
                z, logits = compiled.mtp(j, ids.to(dev), h_in, last)  # [b, M, hidden], [b, vocab]
            else:
                pos = self.cache.begin(group, lo, hi, M, lens)
                z = self.model.mtp_block(j, ids.to(dev), h_in, pos, self.cache)  # [b, M, hidden]
                logits = self.model.mtp_head(j, z[torch.arange(b, device=dev), last])  # [b, vocab]
            act = torch.tensor([r.row for r in active], device=dev)
            probs = target_probs(logits[act], *row_params([r.params for r in active], dev))
            drafts = sample(probs, u[act, j]).tolist()
            if self.draft_hook is not None:
                forced = [self.draft_hook(r, j, d) for r, d in zip(active, drafts)]
                for i, (d, f) in enumerate(zip(drafts, forced)):
                    if d != f:  # the draft now comes from a point mass, and q must say so
                        probs[i].zero_()[f] = 1.0
                drafts = forced
            slots = torch.tensor([r.slot for r in active], device=dev)
            self.q[slots, j] = probs
            carry_prev = self.carry[lo:hi, j].clone()
            # Module j's last committed position is n-1-j: module j+1 starts there next pass.
            keep = torch.tensor([max(0, r.n - 1 - j - starts[r.row]) for r in active], device=dev)
            self.carry[slots, j] = z[act, keep]
            for r, d in zip(active, drafts):
                if self.trace is not None:
                    self.trace.append({"slot": r.slot, "j": j, "context": r.tokens[: r.n + 1] + r.drafts[:j],
                                       "logits": logits[r.row].clone()})
                r.drafts.append(d)
                self.cache.truncate(group, r.slot, max(0, r.n - j))
            z_prev, starts_prev = z, starts


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
