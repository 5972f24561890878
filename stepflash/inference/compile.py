"""The engine's compiled decode step: the model's own modules under `torch.compile`, with static shapes.

A decode step of a small model is a few hundred small tensor ops, so eager PyTorch spends as much time
dispatching them as computing. Compiled (inductor's C++ backend on CPU; Triton and CUDA graphs on GPU,
mode "reduce-overhead") the step becomes a handful of fused kernels. Three functions are compiled:
- `trunk`: ids [B, T] -> (trunk hidden [B, T, hidden], logits [B, T, vocab]), cache update included;
- `mtp`: MTP module j over [B, T] fed positions -> (z [B, T, hidden], logits at one position per row).
- `chain`: every MTP module in one graph for greedy drafting, each module's argmax feeding the next.
Prefill stays eager: any length, once per request.

Shapes are static so that a graph (or CUDA graph) is reused step after step:
- batch: a decode forward covers slots [0, B), B the smallest of `batch_buckets` holding every running
  slot; rows with nothing to feed are padding (they write the cache's trash column and read only it);
- tokens per row: 1 (plain decoding), 2 (one draft, as a paused row probes), or the newest token and
  its drafts padded to 1 + the most drafts K; an MTP module's positions (up to 1 + 2K) padded to 1 + 2K: so speculative decoding needs one verify
  graph and one graph per MTP module, whatever it accepts (plus one per module, made when first needed,
  for catching up after it sat out steps: `speculative.MTPDrafter.history`);
- keys: sliding layers read a fixed ring; full layers read their whole buffer, whose size changes only
  when it doubles. That dimension is marked dynamic, so growth does not recompile (on CUDA each size
  gets a CUDA graph of its own, recorded once).
The routed experts must take a static path (`model/moe.py`): "gather" while a step's rows (batch x
tokens x top-k) do not outnumber the experts, or CUDA's grouped GEMM. A bigger step would break the
graph at every MoE layer; it runs eager instead (`covers`), where per-op costs are spread over its rows.
On CUDA the cache buffers are marked as static addresses, which CUDA graphs need for inputs they write.

Compile time is measured (the first call of each shape, `compile_seconds`) and the artefacts are cached
between runs by inductor's FX-graph and AOTAutograd caches, under ~/.cache/stepflash/inductor unless
TORCHINDUCTOR_CACHE_DIR says otherwise: a second run traces again but skips code generation and the
C++ build. Without a working compiler `compiler_missing` says why and the engine stays eager.
"""

from __future__ import annotations

import logging
import os
import time
import types

import torch

from stepflash.inference.kv_cache import TRUNK, mtp_group
from stepflash.model.moe import choose_path

log = logging.getLogger(__name__)

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "stepflash", "inductor")


def compiler_missing(device: torch.device) -> str | None:
    """None when torch.compile can generate code for `device`, else the reason in one phrase. Call it
    before anything else touches inductor: it also points inductor's cache at CACHE_DIR (first use wins)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", CACHE_DIR)
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        return None
    if device.type != "cpu":
        return f"no compiled decode for device {device.type}"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - any failure to find a compiler means eager
        return f"no C++ compiler for inductor ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def buckets(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself."""
    out = [1]
    while out[-1] * 2 < limit:
        out.append(out[-1] * 2)
    return out + ([limit] if limit > 1 else [])


def bucket_of(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


class CompiledDecode:
    def __init__(self, model, cache, history: list[torch.Tensor], max_batch_size: int, max_tokens: int):
        """history: the drafter's per-module input history (`MTPDrafter.history`, [slots, S + 1, hidden]
        each); max_tokens: the most tokens a row feeds in one decode step (1 + the most drafts)."""
        self.model, self.cache, self.history = model, cache, history
        catch_up = history[0].shape[1] - 1  # a module that sat out catches up over its history's length
        self.batch_buckets = buckets(max_batch_size)
        self.token_buckets = sorted({1, 2, max_tokens})  # 2: a row probing with one draft
        # An MTP module j feeds the newly verified positions and j more (up to 1 + 2 x drafts); a module
        # that sat out steps catches up over up to its history's length.
        self.draft_buckets = sorted({2 * max_tokens - 1, 32, catch_up + 2 * max_tokens})
        # Every (batch, tokens) shape of the trunk step, and every (batch, module, positions) one of the MTP
        # step, is a graph of its own code object; dynamo's default limit (8 per code object) would send
        # the rest eager without a word beyond a warning (max_batch_size 8 with MTP-3 has 4 x 3 x 3 MTP
        # shapes). Raised, never lowered: the limit is global.
        shapes = len(self.batch_buckets) * max(len(self.token_buckets), (max_tokens - 1) * len(self.draft_buckets))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * shapes)
        cuda = next(model.parameters()).device.type == "cuda"
        # CPU: the generated wrapper in C++ (a Python wrapper costs ~1 ms a step at these sizes).
        options = {"triton.cudagraphs": True} if cuda else {"cpp_wrapper": True}
        self._trunk = torch.compile(_own_code(self._trunk_step), dynamic=False, options=options)
        self._mtp = torch.compile(_own_code(self._mtp_step), dynamic=False, options=options)
        self._chain = torch.compile(_own_code(self._chain_step), dynamic=False, options=options)
        self.cuda = cuda
        self.compile_seconds = 0.0
        self._guarded: set[tuple] = set()  # (shape, cache capacity) called once with full guards
        self._timed: set[tuple] = set()

    # ---- the compiled functions (the model's own modules) -------------------------------------
    def _trunk_code(self):
        """The code object dynamo keeps the trunk step's graphs on (tests count them)."""
        return self._trunk._torchdynamo_orig_callable.__func__.__code__

    def covers(self, batch: int, tokens: int) -> bool:
        """Whether a decode step of this many slots and tokens per row runs compiled."""
        cfg, weight = self.model.config, self.model.lm_head.weight
        return choose_path(weight, batch * tokens * cfg.moe_top_k, cfg.moe_num_experts) != "loop"

    # The cache's masks and write columns are computed inside the step (`plan_tensors`): fused, not
    # a dozen small eager ops.
    def _trunk_step(self, ids: torch.Tensor):
        """Also keeps h in the history of MTP module 0's inputs (`MTPDrafter.record`), here at no cost."""
        h = self.model.trunk(ids, self.cache.plan_tensors(TRUNK), self.cache)  # [B, T, hidden]
        history = self.history[0]
        plan, S = self.cache._plans[TRUNK], history.shape[1] - 1
        t = torch.arange(ids.shape[1], device=ids.device)[None, :]
        keep = (t < plan.valid) & (t >= plan.valid - S)
        history[plan.rows, torch.where(keep, (plan.start + t) % S, S)] = h.to(history.dtype)
        return h, self.model.head(h)

    def _mtp_step(self, j: int, ids: torch.Tensor, h_in: torch.Tensor, last: torch.Tensor):
        z = self.model.mtp_block(j, ids, h_in, self.cache.plan_tensors(mtp_group(j)), self.cache)  # [B, T, hidden]
        return z, self.model.mtp_head(j, z[torch.arange(z.shape[0], device=z.device), last])

    def _chain_step(self, ids: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, last: torch.Tensor,
                    slots: torch.Tensor):
        """Every MTP module, greedy, in one graph: module j's argmax draft goes into module j+1's tokens.
        ids [K, B, M] (draft positions 0), slots [K, B, K] position of module i's draft in module j's
        tokens (M: none), idx [K, B, M] indices into cat(history[j], module j's direct source: h for
        j = 0, module j-1's z after), last [K, B] the position each row drafts from."""
        K, B, M = ids.shape
        rows = torch.arange(B, device=ids.device)
        direct, drafts, zs = h, [], []
        for j in range(K):
            tokens = ids[j]
            if drafts:
                padded = torch.cat([tokens, tokens.new_zeros(B, 1)], 1)  # column M takes the unplaced
                tokens = padded.scatter(1, slots[j, :, :j], torch.stack(drafts, 1))[:, :M]
            history = self.history[j][:B]
            src = torch.cat([history, direct.to(history.dtype)], 1)
            h_in = src.gather(1, idx[j][:, :, None].expand(B, M, src.shape[-1])).to(h.dtype)
            z = self.model.mtp_block(j, tokens, h_in, self.cache.plan_tensors(mtp_group(j)), self.cache)
            drafts.append(self.model.mtp_head(j, z[rows, last[j]]).argmax(-1))  # [B]
            zs.append(z)
            direct = z
        return torch.stack(drafts), torch.stack(zs)

    # ---- what the engine calls --------------------------------------------------------------
    def chain(self, ids, h, idx, last, slots):
        """After `cache.reserve` of every MTP group: (drafts [K, B], z [K, B, M, hidden])."""
        return self._call(("chain", *ids.shape, h.shape[1]), self._chain, ids, h, idx, last, slots)


    def trunk(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """After `cache.reserve(TRUNK, 0, B, T, ...)`: (h [B, T, hidden], logits [B, T, vocab]); h also goes
        into the drafter's history."""
        return self._call(("trunk", *ids.shape), self._trunk, ids)

    def mtp(self, j: int, ids: torch.Tensor, h_in: torch.Tensor, last: torch.Tensor):
        """After `cache.reserve(mtp_group(j), 0, B, T, ...)`: (z [B, T, hidden], logits [B, vocab] at `last`)."""
        return self._call(("mtp", j, *ids.shape), self._mtp, j, ids, h_in, last)

    def _call(self, shape: tuple, fn, *args):
        self._mark_dynamic()
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        key = (shape, self.cache.capacity, torch.get_num_threads())
        if key in self._guarded:
            # Guards of ~1000 module attributes cost ~1.5 ms a step on CPU. A shape (and cache size: CUDA
            # graphs hold buffer addresses; and thread count) seen before ran the full guards once; now
            # only those telling the compiled graphs apart are checked. (So changing the model's Python
            # attributes after the first step is not seen: make a new Engine.) Should dynamo still want
            # to recompile, the call is repeated with every guard.
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return _owned(fn(*args), self.cuda)
            except RuntimeError as e:
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
        t0 = time.perf_counter()
        out = _owned(fn(*args), self.cuda)
        self._guarded.add(key)
        if key[::2] not in self._timed:  # the first call of a shape (and thread count) compiles
            self._timed.add(key[::2])
            self.compile_seconds += time.perf_counter() - t0
            log.info("compiled decode %s in %.1f s", shape, time.perf_counter() - t0)
        return out

    def _mark_dynamic(self) -> None:
        """CPU: full-layer buffers change size when the cache grows; one graph serves every size.
        CUDA: CUDA graphs need the cache at fixed addresses; a grown buffer is a new graph."""
        cache = self.cache
        for i, sliding in enumerate(cache.sliding):
            for buf in (cache.k[i], cache.v[i]):
                if self.cuda:
                    torch._dynamo.mark_static_address(buf, guard=True)
                elif not sliding and 2 not in getattr(buf, "_dynamo_dynamic_indices", ()):
                    torch._dynamo.mark_dynamic(buf, 2)
        if self.cuda:  # the ring position tables and the drafter's history are written by the steps too
            for table in cache.slot_pos + self.history[:1]:
                torch._dynamo.mark_static_address(table, guard=True)


def _own_code(method):
    """The bound method with a code object of its own: dynamo keeps compiled graphs (and counts them
    against its recompile limit) per code object, so every engine gets a cache of its own."""
    f = method.__func__
    fresh = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(fresh, method.__self__)


def _owned(out: tuple, cuda: bool) -> tuple:
    """CUDA graph outputs live in a pool the next replay overwrites: keep copies."""
    return tuple(t.clone() for t in out) if cuda else out
