"""KVCache against the uncached forward: token-by-token decode, chunks of every size, rows of different
lengths, exact rollback after the sliding ring wrapped, and the MTP modules' own caches."""

import pytest
import torch

from stepflash.config import flash, tiny
from stepflash.inference.kv_cache import TRUNK, KVCache, cache_bytes, mtp_group
from stepflash.model import Step35ForCausalLM


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Step35ForCausalLM(tiny()).eval()
    with torch.no_grad():  # larger weights than the init so attention patterns matter
        for name, p in m.named_parameters():
            p.normal_(0, 0.2 if "norm" in name else 0.1)
    return m


def cached_logits(model, cache, slot, ids):
    """Run ids [T] through slot `slot` (alone) and return logits [T, V]."""
    pos = cache.begin(TRUNK, slot, slot + 1, len(ids))
    return model(torch.tensor([ids]), pos, cache)[0]


@torch.inference_mode()
def test_token_by_token_equals_uncached(model):
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (43,)).tolist()  # > 5x the window of 8
    ref = model(torch.tensor([ids]))[0]
    cache = KVCache(cfg, 1, capacity=4)  # capacity 4 forces several doublings
    got = [cached_logits(model, cache, 0, ids[:5])]
    got += [cached_logits(model, cache, 0, [t]) for t in ids[5:]]
    torch.testing.assert_close(torch.cat(got), ref, atol=2e-5, rtol=1e-4)
    assert (torch.cat(got) - ref).abs().max() < 1e-4


@torch.inference_mode()
@pytest.mark.parametrize("chunks", [[1] * 30, [3, 9, 2, 7, 1, 8], [12, 1, 10, 4, 3], [30]])
def test_chunks_of_any_size(model, chunks):
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (sum(chunks),)).tolist()
    ref = model(torch.tensor([ids]))[0]
    cache = KVCache(cfg, 1)
    out, at = [], 0
    for c in chunks:  # chunks <= slack + 1 go through the ring, longer ones through the concat path
        out.append(cached_logits(model, cache, 0, ids[at: at + c]))
        at += c
    torch.testing.assert_close(torch.cat(out), ref, atol=2e-5, rtol=1e-4)


@torch.inference_mode()
def test_rows_of_different_lengths_and_padding(model):
    """Two rows in one batch, different lengths and right padding, each equal to its own uncached run."""
    cfg = model.config
    a = torch.randint(0, cfg.vocab_size, (30,)).tolist()
    b = torch.randint(0, cfg.vocab_size, (21,)).tolist()
    refs = [model(torch.tensor([s]))[0] for s in (a, b)]
    cache = KVCache(cfg, 3)
    cache.reset(1)
    # Prefill: row 0 gets 11 tokens, row 1 gets 4 (padded to 11), row 2 is idle (all padding).
    pos = cache.begin(TRUNK, 0, 3, 11, valid=[11, 4, 0])
    ids = torch.zeros(3, 11, dtype=torch.long)
    ids[0], ids[1, :4] = torch.tensor(a[:11]), torch.tensor(b[:4])
    logits = model(ids, pos, cache)
    assert torch.isfinite(logits).all(), "padding rows must not produce NaN"
    got_a, got_b = [logits[0]], [logits[1, :4]]
    ia, ib = 11, 4
    while ib < len(b):  # decode: row 0 one token a step, row 1 up to three (like verifying drafts)
        nb = min(3, len(b) - ib)
        pos = cache.begin(TRUNK, 0, 2, 3, valid=[1, nb])
        ids = torch.zeros(2, 3, dtype=torch.long)
        ids[0, 0] = a[ia]
        ids[1, :nb] = torch.tensor(b[ib: ib + nb])
        out = model(ids, pos, cache)
        got_a.append(out[0, :1])
        got_b.append(out[1, :nb])
        ia, ib = ia + 1, ib + nb
    torch.testing.assert_close(torch.cat(got_a), refs[0][:ia], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(got_b), refs[1], atol=2e-5, rtol=1e-4)
    assert cache.lengths[TRUNK][:3] == [ia, len(b), 0]


@torch.inference_mode()
@pytest.mark.parametrize("depth", [1, 4, 8])
def test_rollback_exact_after_wrap(model, depth):
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (40,)).tolist()
    ref = model(torch.tensor([ids]))[0]
    cache = KVCache(cfg, 1, slack=8)
    got = [cached_logits(model, cache, 0, ids[:20])]  # ring of 16 has wrapped
    for at in range(20, 40, 2):
        # Two true tokens then `depth` wrong ones (like rejected drafts), which are rolled back.
        junk = torch.randint(0, cfg.vocab_size, (depth,)).tolist()
        got.append(cached_logits(model, cache, 0, ids[at: at + 2] + junk)[:2])
        cache.truncate(TRUNK, 0, at + 2)
    torch.testing.assert_close(torch.cat(got), ref, atol=2e-5, rtol=1e-4)


@torch.inference_mode()
def test_rollback_past_slack_is_refused(model):
    cache = KVCache(model.config, 1, slack=4)
    cached_logits(model, cache, 0, list(range(20)))
    with pytest.raises(AssertionError, match="slack"):
        cache.truncate(TRUNK, 0, 15)


@torch.inference_mode()
def test_ring_memory_does_not_grow(model):
    cache = KVCache(model.config, 1, capacity=64)
    before = [t.shape for t in cache.k]
    cached_logits(model, cache, 0, list(range(60)))
    for i, (t, shape) in enumerate(zip(cache.k, before)):
        if cache.sliding[i]:
            assert t.shape == shape and t.shape[2] == 1 + model.config.sliding_window + cache.slack


@torch.inference_mode()
def test_mtp_caches_match_uncached_chain(model):
    """Each MTP module's cache, fed in chunks with rollbacks, reproduces the uncached teacher-forced chain."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 36))
    T = ids.shape[1]
    h = model.trunk(ids)
    ref, hj = [], h
    for j in range(cfg.num_nextn_predict_layers):  # module j at position t reads token t+1+j
        hj, logits = model.mtp(j, ids[:, 1 + j:], hj[:, : T - 1 - j])
        ref.append((hj, logits))
    cache = KVCache(cfg, 1)
    hj = h
    for j in range(cfg.num_nextn_predict_layers):
        n = T - 1 - j
        zs, ls, at = [], [], 0
        for c in [10, 1, 3, 2, 5, 4, 1, 7, 3] * 2:
            c = min(c, n - at)
            if c <= 0:
                break
            pos = cache.begin(mtp_group(j), 0, 1, c + 2)  # two extra junk entries, rolled back below
            tok = torch.cat([ids[:, 1 + j + at: 1 + j + at + c], torch.zeros(1, 2, dtype=torch.long)], 1)
            hin = torch.cat([hj[:, at: at + c], torch.randn(1, 2, cfg.hidden_size)], 1)
            z, logits = model.mtp(j, tok, hin, pos, cache)
            cache.truncate(mtp_group(j), 0, at + c)
            zs.append(z[:, :c])
            ls.append(logits[:, :c])
            at += c
        assert at == n
        torch.testing.assert_close(torch.cat(zs, 1), ref[j][0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(torch.cat(ls, 1), ref[j][1], atol=2e-5, rtol=1e-4)
        hj = ref[j][0]
    assert cache.lengths[TRUNK][0] == 0  # the trunk group was never touched


def test_cache_bytes_formula():
    cfg = flash()
    per_tok_layer = 8 * 128 * 2 * 2  # 8 KV heads x 128 dims x (K, V) x bf16 = 4 KiB (SPEC section 4)
    s3f1 = cache_bytes(cfg, 8192, mtp=False)
    assert s3f1 == per_tok_layer * (12 * 8192 + 33 * 512)
    full = cache_bytes(cfg, 8192, layer_types=["full_attention"] * 45, mtp=False)
    assert full == per_tok_layer * 45 * 8192
    assert cache_bytes(cfg, 8192) == s3f1 + per_tok_layer * 3 * 512  # MTP layers are sliding
