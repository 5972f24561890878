"""Preallocated KV cache that knows the S3F1 layout: full layers keep every token, sliding layers a ring.

Layers are grouped by who writes them together: group 0 is the trunk (layers 0..L-1), group 1+j is MTP
module j (layer L+j, its own cache). Every batch slot (row) has its own length per group, so sequences
of different lengths share one batch without left padding.

A forward over the contiguous slot range [lo, hi) is announced with `begin(group, lo, hi, T, valid)`:
each row r writes `valid[r] <= T` tokens at positions length[r] .. length[r]+valid[r]-1 (the rest of
its T columns are padding). `begin` builds the write indices and the attention masks once per step and
per layer kind; `update(layer_idx, k, v)` (called by attention, see `stepflash/model/attention.py`)
then only scatters k/v and returns views. `truncate` rolls rows back, e.g. after rejected drafts.

Storage, per layer, `[slots, kv_heads, columns, head_dim]` with column 0 a trash column: padding
tokens write there and padding queries attend only to it, so they never touch real entries and never
see an empty (NaN-producing) key set.
- full layer: position p lives in column p + 1; columns grow by doubling (never per step), and
  attention reads all of them (the mask hides the unwritten ones), so shapes change only on growth.
- sliding layer: a ring of R = window + slack columns (+ trash); position p lives in 1 + p % R. The
  slack makes rollback exact after the ring wrapped: rolling back d <= slack tokens still leaves the
  window before the new end in the ring, and a chunk of T <= slack + 1 tokens can be written before
  attention without evicting a key one of its own queries needs. Longer chunks (prefill) attend to
  the old ring concatenated with the new keys, then keep only the last R valid keys.
`slot_pos[group]` [slots, R + 1] records which position each ring column holds (-1 = empty); every
sliding layer of a group holds the same positions, so one table per group suffices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stepflash.config import Step35Config

TRUNK = 0


def mtp_group(j: int) -> int:
    return 1 + j


@dataclass
class _Plan:
    """What one `begin` decided for the layers of its group; read by every `update` of that forward.
    `reserve` fills the host part, `plan_tensors` the tensors (inside a compiled step, if there is one)."""
    group: int
    lo: int
    hi: int
    T: int
    start: torch.Tensor  # [b, 1] each row's length before this forward
    valid: torch.Tensor  # [b, 1] real tokens of each row
    ring_concat: bool  # a chunk longer than the ring slack (prefill): attend to [old ring | new keys]
    rows: torch.Tensor | None = None  # [b, 1] slot of each row, for advanced indexing into the whole buffers
    full_cols: torch.Tensor | None = None  # [b, T] write column per token (0 = trash)
    full_mask: torch.Tensor | None = None  # [b, 1, T, 1 + capacity]
    ring_cols: torch.Tensor | None = None  # [b, T]
    ring_mask: torch.Tensor | None = None  # [b, 1, T, R+1] or [b, 1, T, R+1+T] when concatenating


class KVCache:
    def __init__(self, cfg: Step35Config, max_batch_size: int, *, device=None, dtype=torch.float32,
                 slack: int = 8, capacity: int = 256, max_len: int | None = None):
        self.cfg, self.batch, self.slack = cfg, max_batch_size, slack
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self.window = cfg.sliding_window
        self.ring = cfg.sliding_window + slack  # R: ring columns, trash excluded
        self.max_len = max_len or cfg.max_position_embeddings
        self.capacity = min(capacity, self.max_len + slack)
        L, n = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
        self.num_groups = 1 + n
        self.group_of = [TRUNK] * L + [mtp_group(j) for j in range(n)]
        self.sliding = [cfg.is_sliding(i) for i in range(L + n)]
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i in range(L + n):
            cols = 1 + (self.ring if self.sliding[i] else self.capacity)
            shape = (max_batch_size, cfg.num_kv_heads(i), cols, cfg.head_dim_of(i))
            self.k.append(torch.zeros(shape, device=self.device, dtype=dtype))
            self.v.append(torch.zeros(shape, device=self.device, dtype=dtype))
        self.lengths = [[0] * max_batch_size for _ in range(self.num_groups)]  # host-side: no device syncs
        self.slot_pos = [torch.full((max_batch_size, self.ring + 1), -1, dtype=torch.long, device=self.device)
                         for _ in range(self.num_groups)]
        self._kinds = set(zip(self.group_of, self.sliding))  # (group, is_sliding) pairs that exist
        self._plans: dict[int, _Plan] = {}  # group -> the plan of its forward in progress

    # ---- bookkeeping --------------------------------------------------------------------------
    def reset(self, slot: int) -> None:
        """Empty one slot in every group (a freed slot is reused by a new request)."""
        for g in range(self.num_groups):
            self.lengths[g][slot] = 0
            self.slot_pos[g][slot].fill_(-1)

    def _grow(self, needed: int) -> None:
        """Enlarge every full-layer buffer to hold `needed` positions (amortised doubling, not per step)."""
        if needed <= self.capacity:
            return
        new_cap = min(max(needed, 2 * self.capacity), self.max_len + self.slack)
        assert needed <= new_cap, f"{needed} positions exceed the cache limit {new_cap}"
        for i, sliding in enumerate(self.sliding):
            if sliding:
                continue
            for buf in (self.k, self.v):
                old = buf[i]
                new = old.new_zeros(old.shape[0], old.shape[1], 1 + new_cap, old.shape[3])
                new[:, :, : old.shape[2]] = old
                buf[i] = new
        self.capacity = new_cap

    def _group_has(self, group: int, sliding: bool) -> bool:
        return (group, sliding) in self._kinds

    # ---- one forward --------------------------------------------------------------------------
    def begin(self, group: int, lo: int, hi: int, T: int, valid: list[int] | None = None) -> torch.Tensor:
        """Announce a forward of T tokens per row over slots [lo, hi); returns position ids [b, T].

        Row r's first valid[r] tokens are real, the rest padding; lengths advance by valid[r]."""
        self.reserve(group, lo, hi, T, valid)
        return self.plan_tensors(group)

    def reserve(self, group: int, lo: int, hi: int, T: int, valid: list[int] | None = None) -> None:
        """The host half of `begin`: lengths, buffer growth and the plan's inputs (no tensor math)."""
        b = hi - lo
        valid = [T] * b if valid is None else list(valid)
        assert len(valid) == b and all(0 <= v <= T for v in valid)
        starts = self.lengths[group][lo:hi]
        ends = [s + v for s, v in zip(starts, valid)]
        if self._group_has(group, sliding=False):
            self._grow(max(ends))
        for r, e in enumerate(ends):
            self.lengths[group][lo + r] = e
        both = torch.tensor([starts, valid], device=self.device)[:, :, None]  # [2, b, 1]
        self._plans[group] = _Plan(group, lo, hi, T, both[0], both[1], T > self.slack + 1)

    def plan_tensors(self, group: int) -> torch.Tensor:
        """The tensor half of `begin`: write columns and masks of the group's reserved forward, and the
        ring's position table; returns position ids [b, T]. Pure tensor code, so a compiled step includes
        it. (Groups are planned independently: one compiled step may run several MTP modules.)"""
        plan, dev = self._plans[group], self.device
        t = torch.arange(plan.T, device=dev)[None, :]  # [1, T]
        pos = plan.start + t  # [b, T]
        real = t < plan.valid  # [b, T] real (non-padding) tokens
        plan.rows = torch.arange(plan.lo, plan.hi, device=dev)[:, None]
        if self._group_has(plan.group, sliding=False):
            # Attention sees every column (masked past each row's end): the key count changes only when
            # the buffers grow, not every step, which is what a compiled decode step needs.
            keys = self.k[self.sliding.index(False)].shape[2]  # 1 + capacity
            plan.full_cols = torch.where(real, pos + 1, 0)
            kpos = torch.arange(keys, device=dev) - 1  # [S] position held by each column, trash = -1
            see = (kpos >= 0) & (kpos[None, None, :] <= pos[:, :, None])  # [b, T, S]
            plan.full_mask = self._pad_queries(see, real)
        if self._group_has(plan.group, sliding=True):
            self._plan_ring(plan, pos, real)
        return pos

    def _pad_queries(self, see: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Padding queries attend only to the trash column 0. see [b, T, S] -> mask [b, 1, T, S]."""
        trash_only = torch.zeros_like(see[0, 0])
        trash_only[0] = True
        return torch.where(real[:, :, None], see, trash_only)[:, None]

    def _plan_ring(self, plan: _Plan, pos, real) -> None:
        R, W, T = self.ring, self.window, plan.T
        sp = self.slot_pos[plan.group][plan.lo: plan.hi]  # [b, R+1] view
        q = pos[:, :, None]  # [b, T, 1]
        if not plan.ring_concat:
            # Write first, then attend over the ring: the chunk evicts nothing its own queries need.
            cols = torch.where(real, 1 + pos % R, 0)  # [b, T]
            sp.scatter_(1, cols, torch.where(real, pos, -1))
            sp[:, 0] = -1
            kp = sp[:, None, :]  # [b, 1, R+1]
            see = (kp >= 0) & (kp <= q) & (kp > q - W)
        else:
            # Long chunk: attend to [old ring | new keys]; then keep the last R real keys of each row.
            kp_old = sp[:, None, :]
            see_old = (kp_old >= 0) & (kp_old <= q) & (kp_old > q - W)  # [b, T, R+1]
            kp_new = torch.where(real, pos, -1)[:, None, :]  # [b, 1, T]
            see_new = (kp_new >= 0) & (kp_new <= q) & (kp_new > q - W)  # [b, T, T]
            see = torch.cat([see_old, see_new], dim=-1)
            keep = real & (torch.arange(T, device=pos.device)[None, :] >= plan.valid - R)
            cols = torch.where(keep, 1 + pos % R, 0)
            sp.scatter_(1, cols, torch.where(keep, pos, -1))
            sp[:, 0] = -1
        plan.ring_cols = cols
        plan.ring_mask = self._pad_queries(see, real)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [b, kv_heads, T, head_dim] of this step -> (keys, values, mask) for attention."""
        plan = self._plans.get(self.group_of[layer_idx])
        assert plan is not None and plan.rows is not None, f"layer {layer_idx} written outside a begin() of its group"
        kbuf, vbuf = self.k[layer_idx], self.v[layer_idx]
        k, v = k.to(kbuf.dtype), v.to(vbuf.dtype)
        k_tok, v_tok = k.transpose(1, 2), v.transpose(1, 2)  # [b, T, kv_heads, D]: layout of kbuf[rows, :, cols]
        cols = plan.ring_cols if self.sliding[layer_idx] else plan.full_cols
        # Written into the whole buffer (not a slice view of it), so a compiled step scatters in place.
        kb, vb = kbuf[plan.lo: plan.hi], vbuf[plan.lo: plan.hi]
        if self.sliding[layer_idx] and plan.ring_concat:  # prefill only: old ring + new keys
            keys, values = torch.cat([kb, k], dim=2), torch.cat([vb, v], dim=2)
            kbuf[plan.rows, :, cols] = k_tok
            vbuf[plan.rows, :, cols] = v_tok
            return keys, values, plan.ring_mask
        kbuf[plan.rows, :, cols] = k_tok
        vbuf[plan.rows, :, cols] = v_tok
        return kb, vb, plan.ring_mask if self.sliding[layer_idx] else plan.full_mask

    def truncate(self, group: int, slot: int, length: int) -> None:
        """Roll one row of a group back to `length` tokens (drop rejected drafts)."""
        old = self.lengths[group][slot]
        assert 0 <= length <= old, f"cannot truncate slot {slot} from {old} to {length} tokens"
        if length == old:
            return
        if self._group_has(group, sliding=True):
            # Exact only while the window before `length` is still in the ring.
            assert old - length <= self.slack or length == 0, \
                f"rollback of {old - length} tokens exceeds the ring slack {self.slack}"
            sp = self.slot_pos[group][slot]
            sp.masked_fill_(sp >= length, -1)
        self.lengths[group][slot] = length

    def can_skip(self, group: int) -> bool:
        """Whether `skip` is allowed: only ring (sliding) layers, whose masks read recorded positions."""
        return not self._group_has(group, sliding=False)

    def skip(self, group: int, slot: int, length: int) -> None:
        """Move one row of a sliding-only group forward to `length` without writing the positions in
        between: later queries simply see no keys there (an MTP module that sat out too long)."""
        assert self.can_skip(group) and length >= self.lengths[group][slot]
        self.lengths[group][slot] = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def cache_bytes(cfg: Step35Config, seq_len: int, batch: int = 1, dtype_bytes: int = 2, slack: int = 0,
                layer_types: list[str] | None = None, mtp: bool = True) -> int:
    """KV bytes to hold `seq_len` tokens: full layers store all of them, sliding layers min(seq, window+slack).
    `layer_types` overrides the trunk layout (e.g. all full) to compare designs."""
    L, n = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    types_ = list(layer_types or cfg.layer_types[:L]) + (cfg.layer_types[L:] if mtp else [])
    other = cfg.attention_other_setting or {}
    total = 0
    for t in types_:
        if t == "full_attention":
            kept, heads, dim = seq_len, cfg.num_attention_groups, cfg.head_dim
        else:
            kept = min(seq_len, cfg.sliding_window + slack)
            heads = other.get("num_attention_groups", cfg.num_attention_groups)
            dim = other.get("head_dim", cfg.head_dim)
        total += 2 * heads * dim * kept
    return total * batch * dtype_bytes
