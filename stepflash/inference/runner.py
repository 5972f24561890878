"""A lean CPU forward for the engine: the model's math with a fraction of the tensor ops.

At decode on CPU (hidden 256, one token) a step is a few hundred small ops, so per-op dispatch and
Python overhead cost as much as the matrix-vector products themselves. This runner reads the weights
of `Step35ForCausalLM` through the module's own Parameter objects and computes the same function:
- no nn.Module calls; weights are looked up once into plain per-layer records;
- q/k/v/gate as one product, and (fp32 models) the router with the shared expert's gate/up as one
  product: these concatenated copies, like (1 + w) of every norm, are memoised and re-made whenever
  a source tensor changes in place (its version counter), so an optimizer step is seen at once;
- q and k normed together per head, RoPE as x * C + x[..., perm] * S with C/S built once per step
  for each rotary table (the permutation does rotate-half; zeros in S pass non-rotary dims through);
- routed experts without `torch._grouped_mm`, whose CPU version loops over every expert with a host
  sync per expert: rows are sorted by expert and only the experts actually hit are multiplied.
The copies cost the attention and shared-expert weights once more in memory, fine for the CPU-sized
models this runner is for; on CUDA the engine uses the model's own modules (grouped GEMM kernels).
`tests/test_engine.py` checks this runner against the model's forward.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


class LeanRunner:
    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.cfg, self.eps = cfg, cfg.rms_norm_eps
        self.layers = [self._record(layer) for layer in model.model.layers]
        self._memo: dict = {}
        self._rope_cache: dict[int, tuple] = {}
        self.spec_dim = {model.rope_of[i]: r.dim for i, r in enumerate(self.layers)}

    @staticmethod
    def _record(layer) -> SimpleNamespace:
        a = layer.self_attn
        r = SimpleNamespace(
            idx=layer.layer_idx, in_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
            wq=a.q_proj.weight, wk=a.k_proj.weight, wv=a.v_proj.weight, wo=a.o_proj.weight,
            wg=a.g_proj.weight if a.use_gate else None, q_norm=a.q_norm.weight, k_norm=a.k_norm.weight,
            heads=a.num_heads, kv_heads=a.num_kv_heads, dim=a.head_dim, is_moe=layer.is_moe, attn=a)
        if layer.is_moe:
            m, s = layer.moe, layer.share_expert
            r.moe = m
            r.shared = (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight, s.limit)
        else:
            d = layer.mlp
            r.mlp = (d.gate_proj.weight, d.up_proj.weight, d.down_proj.weight, d.limit)
        return r

    # ---- small pieces -----------------------------------------------------------------------
    def _derived(self, key, sources: tuple, fn):
        """fn(*sources), recomputed only when a source was modified in place (version counter) or moved,
        so an optimizer step on the model is seen by the next forward."""
        stamp = tuple((t._version, t.data_ptr()) for t in sources)
        hit = self._memo.get(key)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = (stamp, fn(*sources))
            self._memo[key] = hit
        return hit[1]

    def _plus_one(self, w: torch.Tensor) -> torch.Tensor:
        return self._derived(("1+w", id(w)), (w,), lambda t: 1.0 + t.float())

    def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self._plus_one(w), self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self._plus_one(w), self.eps).to(x.dtype)

    def rope_tables(self, position_ids: torch.Tensor, dtype, specs=None) -> dict[int, tuple]:
        """Per rotary spec: (C, S, perm) with C, S [b, T, 1, head_dim] and perm [head_dim]."""
        out = {}
        for spec in range(len(self.model.rotary)) if specs is None else specs:
            cos, sin = self.model.rotary[spec](position_ids, dtype)  # [b, T, rd]
            rd, dim = cos.shape[-1], self.spec_dim[spec]
            perm, sign = self._rope_cache.get(spec, (None, None))
            if perm is None or perm.device != cos.device or sign.dtype != dtype:
                half = rd // 2
                perm = torch.cat([torch.arange(half, rd), torch.arange(half), torch.arange(rd, dim)]).to(cos.device)
                sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(cos.device, dtype)
                self._rope_cache[spec] = (perm, sign)
            pad = dim - rd
            C = torch.cat([cos, cos.new_ones(*cos.shape[:-1], pad)], -1) if pad else cos
            S = sin * sign
            S = torch.cat([S, S.new_zeros(*S.shape[:-1], pad)], -1) if pad else S
            out[spec] = (C[:, :, None], S[:, :, None], perm)
        return out

    @staticmethod
    def _rope(x: torch.Tensor, table) -> torch.Tensor:
        C, S, perm = table
        return torch.addcmul(x * C, x[..., perm], S)

    @staticmethod
    def _swiglu(x, wg, wu, wd, limit):
        a = F.silu(F.linear(x, wg))
        u = F.linear(x, wu)
        if limit > 0:
            a, u = a.clamp(max=limit), u.clamp(-limit, limit)
        return F.linear(a * u, wd)

    # ---- blocks -----------------------------------------------------------------------------
    def attention(self, r, x: torch.Tensor, table, cache) -> torch.Tensor:
        b, T, _ = x.shape
        H, Hkv, D = r.heads, r.kv_heads, r.dim
        srcs = (r.wq, r.wk, r.wv) + ((r.wg,) if r.wg is not None else ())
        fused = self._derived(("qkvg", r.idx), srcs, lambda *w: torch.cat(w))  # one GEMV instead of four
        qkvg = F.linear(x, fused)  # [b, T, (H + 2 Hkv) D (+ H)]
        nq, nk = H * D, Hkv * D
        qk = qkvg[..., : nq + nk].view(b, T, H + Hkv, D)
        qk_w = self._derived(("qk_norm", r.idx), (r.q_norm, r.k_norm), lambda wq, wk: torch.cat(
            [(1.0 + wq.float()).expand(H, D), (1.0 + wk.float()).expand(Hkv, D)]))  # [H + Hkv, D]
        qk = F.rms_norm(qk.float(), (D,), None, self.eps) * qk_w  # q and k normed (per head) in one op
        qk = self._rope(qk.to(x.dtype), table)
        q, k = qk[:, :, :H], qk[:, :, H:]
        v = qkvg[..., nq + nk: nq + 2 * nk].view(b, T, Hkv, D)
        keys, values, mask = cache.update(r.idx, k.transpose(1, 2), v.transpose(1, 2))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                             scale=D ** -0.5, enable_gqa=H != Hkv)
        out = out.transpose(1, 2)  # [b, T, H, D]
        if r.wg is not None and r.attn.use_gate:
            out = out * torch.sigmoid(qkvg[..., nq + 2 * nk:])[..., None]
        return F.linear(out.reshape(b, T, H * D), r.wo)

    def routed(self, m, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """Routed experts for x [N, hidden] given fp32 router logits [N, E]; routing as in MoE.route."""
        probs = torch.sigmoid(router_logits)  # [N, E]
        scores = probs + m.router_bias if m.use_bias else probs
        topk_idx = torch.topk(scores, m.top_k, dim=-1).indices  # [N, k]
        w = probs.gather(-1, topk_idx)
        w = (w * (m.scaling / w.sum(-1, keepdim=True))).to(x.dtype)  # [N, k]
        wg, wu, wd = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
        n = x.shape[0]
        if n == 1:  # decode of one sequence: k experts, one row each, no sorting needed
            out = None
            for e, we in zip(topk_idx[0].tolist(), w[0, :, None]):
                ye = self._swiglu(x, wg[e], wu[e], wd[e], m.limit) * we
                out = ye if out is None else out + ye
            return out
        # Rows sorted by expert; each hit expert multiplies one contiguous slice of them.
        flat = topk_idx.reshape(-1)  # [N*k]
        order = torch.argsort(flat, stable=True)
        token_of_row = order // m.top_k
        counts = torch.bincount(flat, minlength=m.num_experts).tolist()
        rows = x[token_of_row]  # [N*k, hidden]
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                outs.append(self._swiglu(rows[start: start + c], wg[e], wu[e], wd[e], m.limit))
                start += c
        y = torch.cat(outs) * w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token_of_row, y)

    def shared_and_router(self, r, x: torch.Tensor):
        """Shared-expert output and fp32 router logits; one GEMV for the router and the shared gate/up
        when the model is fp32 (the router must run in fp32)."""
        m = r.moe
        wg, wu, wd, limit = r.shared
        if x.dtype != torch.float32:
            return self._swiglu(x, *r.shared), F.linear(x.float(), m.gate.weight.float())
        fused = self._derived(("router+shared", r.idx), (m.gate.weight, wg, wu), lambda *w: torch.cat(w).float())
        y = F.linear(x, fused)
        e, i = m.num_experts, wg.shape[0]
        a, u = F.silu(y[:, e: e + i]), y[:, e + i:]
        if limit > 0:
            a, u = a.clamp(max=limit), u.clamp(-limit, limit)
        return F.linear(a * u, wd), y[:, :e]

    def layer(self, r, h: torch.Tensor, table, cache) -> torch.Tensor:
        h = h + self.attention(r, self.norm(h, r.in_norm), table, cache)
        x = self.norm(h, r.post_norm)
        if r.is_moe:
            shape = x.shape
            flat = x.reshape(-1, shape[-1])
            shared, router_logits = self.shared_and_router(r, flat)
            return h + (shared + self.routed(r.moe, flat, router_logits)).reshape(shape)
        return h + self._swiglu(x, *r.mlp)

    # ---- what the engine calls --------------------------------------------------------------
    def trunk(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        """Same as model.trunk(input_ids, position_ids, cache): hidden [b, T, hidden] before model.norm."""
        h = self.model.model.embed_tokens.weight[input_ids]
        rope_of = self.model.rope_of[: self.cfg.num_hidden_layers]
        tables = self.rope_tables(position_ids, h.dtype, sorted(set(rope_of)))
        for i in range(self.cfg.num_hidden_layers):
            h = self.layer(self.layers[i], h, tables[rope_of[i]], cache)
        return h

    def mtp_block(self, j: int, next_ids: torch.Tensor, h_prev: torch.Tensor, position_ids: torch.Tensor, cache):
        """Same as speculative.mtp_block: MTP module j without its head."""
        idx = self.cfg.num_hidden_layers + j
        layer = self.model.model.layers[idx]
        emb = self.model.model.embed_tokens.weight[next_ids]
        z = F.linear(torch.cat([self.norm(emb, layer.enorm.weight), self.norm(h_prev, layer.hnorm.weight)], -1),
                     layer.eh_proj.weight)
        spec = self.model.rope_of[idx]
        table = self.rope_tables(position_ids, z.dtype, [spec])[spec]
        return self.layer(self.layers[idx], z, table, cache)
