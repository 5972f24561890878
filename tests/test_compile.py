"""The compiled decode step (`Engine(compile=True)`) against independent references: transformers'
Step3p7TextModel without a cache, the eager engine, plain greedy under speculation, and the same
sampled tokens. One small model compiles three graphs (plain step, verify step, MTP draft step) once
for the module; the cache grows twice during the first generation, which must not recompile."""

import pytest
import torch

from stepflash.checkpoint.hf import hf_to_release
from stepflash.config import make_config
from stepflash.inference import compile as compile_mod
from stepflash.inference.engine import Engine
from stepflash.model import Step35ForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

# 16 experts top-2: a batch of 2 verifying 2 tokens is 8 rows, within the static "gather" path.
CFG = dict(full_heads=2, sliding_heads=4, kv_heads=1, head_dim=16, window=6, vocab=97, inter=48, experts=16,
           top_k=2, moe_inter=16, dense_layers=1, mtp=1, max_pos=256, rope_original=16)


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    if reason := compile_mod.compiler_missing(torch.device("cpu")):
        pytest.skip(reason)
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def pair():
    """(transformers model, lm_head, our model with its weights)."""
    pytest.importorskip("transformers.models.step3p7")
    from test_parity_hf import hf_model

    cfg = make_config(2, 32, **CFG)
    torch.manual_seed(0)
    hf = hf_model(cfg)
    lm_head = torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.2
    ours = Step35ForCausalLM(cfg).eval()
    state = ours.state_dict()
    state.update(hf_to_release({**hf.state_dict(), "lm_head.weight": lm_head}, cfg.num_hidden_layers))
    ours.load_state_dict(state)
    with torch.no_grad():  # the MTP layer (not in transformers) drafts from random weights
        for p in ours.mtp_layers[0].parameters():
            p.normal_(0, 0.15)
    ours.config.eos_token_id = []
    return hf, lm_head, ours


@pytest.fixture(scope="module")
def compiled(inductor_cache, pair):
    engine = Engine(pair[2], max_batch_size=2, cache_capacity=12, compile=True)
    assert engine.compiled is not None, engine.compile_note
    return engine


PROMPTS = [[5, 17, 3, 44, 9], [60, 2, 2, 81, 33, 7, 19, 52, 11, 4, 90]]


@torch.inference_mode()
def hf_greedy(hf, lm_head, prompt, n):
    ids = list(prompt)
    for _ in range(n):  # full recompute every step, no cache
        ids.append(int((hf(torch.tensor([ids])).last_hidden_state[0, -1] @ lm_head.T).argmax()))
    return ids[len(prompt):]


@pytest.mark.slow
def test_compiled_greedy_equals_transformers_and_eager(pair, compiled):
    hf, lm_head, model = pair
    out = compiled.generate(PROMPTS, 24)  # 11 + 24 tokens: the full layers' buffers grow 12 -> 24 -> 48
    assert compiled.cache.capacity >= 35
    eager = Engine(model, max_batch_size=2, cache_capacity=12).generate(PROMPTS, 24)
    for prompt, c, e in zip(PROMPTS, out, eager):
        assert c.token_ids == e.token_ids == hf_greedy(hf, lm_head, prompt, 24)
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(e.logprobs), atol=1e-4, rtol=1e-4)
    # Growth did not recompile: one graph for the plain step.
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(compiled.compiled._trunk_code())
    assert len(entries) == 1
    assert compiled.compile_seconds > 0


@pytest.mark.slow
def test_compiled_speculative_equals_plain(compiled):
    plain = compiled.generate(PROMPTS, 20)
    spec = compiled.generate(PROMPTS, 20, speculative_tokens=1)
    for p, s in zip(plain, spec):
        assert s.token_ids == p.token_ids and s.stats["verify_steps"] > 0
    # Oracle drafts: every draft accepted, output unchanged (the accept path of the compiled verify step).
    truth = {tuple(p): p + r.token_ids for p, r in zip(PROMPTS, plain)}
    compiled.drafter.draft_hook = lambda row, j, d: next(
        t for p, t in truth.items() if tuple(row.tokens[: len(p)]) == p)[row.n + 1 + j]
    # Drafting every step: the policy has learnt from the run above that this model's drafts fail.
    policy, compiled.policy = compiled.policy, None
    try:
        forced = compiled.generate(PROMPTS, 20, speculative_tokens=1)
    finally:
        compiled.drafter.draft_hook, compiled.policy = None, policy
    for p, f in zip(plain, forced):
        assert f.token_ids == p.token_ids and f.stats["acceptance_per_position"] == [1.0]


@pytest.mark.slow
def test_compiled_sampling_equals_eager(pair, compiled):
    kw = dict(temperature=0.9, top_k=20, seed=3)
    got = compiled.generate(PROMPTS, 16, **kw)
    want = Engine(pair[2], max_batch_size=2).generate(PROMPTS, 16, **kw)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=1e-4)


def test_no_compiler_falls_back_to_eager(pair, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(compile_mod, "compiler_missing", lambda device: "no C++ compiler for inductor (test)")
    monkeypatch.setattr("stepflash.inference.engine.compiler_missing", compile_mod.compiler_missing)
    engine = Engine(pair[2], max_batch_size=2, compile=True)
    assert engine.compiled is None and "decoding eager" in engine.compile_note
    want = Engine(pair[2], max_batch_size=2).generate(PROMPTS, 6)
    assert [r.token_ids for r in engine.generate(PROMPTS, 6)] == [r.token_ids for r in want]
    import stepflash
    from stepflash.inference.cli import GenerateArgs, run

    stepflash.save_model(pair[2], str(tmp_path))
    assert run(GenerateArgs(str(tmp_path), prompt_ids="5,17,3", max_new_tokens=4, compile=True)) == 0
    assert "decoding eager" in capsys.readouterr().out


def test_buckets():
    assert compile_mod.buckets(8) == [1, 2, 4, 8] and compile_mod.buckets(6) == [1, 2, 4, 6]
    assert compile_mod.buckets(1) == [1]
    assert compile_mod.bucket_of(3, [1, 2, 4, 6]) == 4


@pytest.mark.slow
def test_fused_draft_chain_equals_module_by_module(inductor_cache):
    """Greedy drafting runs every MTP module in one compiled graph, each module's argmax feeding the next
    module's tokens in-graph; step by step its drafts equal the eager module-by-module chain's."""
    from stepflash.inference.engine import SamplingParams
    from test_engine import random_model

    model = random_model(make_config(2, 32, **{**CFG, "mtp": 2}))
    engines = [Engine(model, max_batch_size=1, adaptive_drafts=False, compile=c) for c in (False, True)]
    rids = [e.add_request(PROMPTS[1], SamplingParams(max_new_tokens=20, speculative_tokens=2)) for e in engines]
    reqs = [e.scheduler.requests[rid] for e, rid in zip(engines, rids)]
    steps = 0
    while not reqs[0].finished:
        outs = [e.step() for e in engines]
        assert [o.new_token_ids for o in outs[0]] == [o.new_token_ids for o in outs[1]]
        assert reqs[0].drafts == reqs[1].drafts
        steps += bool(reqs[0].drafts)
    assert steps > 5 and reqs[1].finished
    assert any(shape[0] == "chain" for shape, _ in engines[1].compiled._timed)  # the fused graph ran
    # Adaptive drafting (deterministic here: costs stay at the prior): random drafts are rejected, drafting
    # stops, and the probes after 24 and 48 steps catch module 0 up from the history the compiled trunk
    # step wrote; the drafts still equal the eager engine's.
    from stepflash.inference.speculative import DraftPolicy

    for e in engines:
        e.policy = DraftPolicy(2, e.drafter.S)
        e.policy.observe = lambda *args: None
    rids = [e.add_request(PROMPTS[0], SamplingParams(max_new_tokens=60, speculative_tokens=2)) for e in engines]
    reqs = [e.scheduler.requests[rid] for e, rid in zip(engines, rids)]
    while not reqs[0].finished:
        outs = [e.step() for e in engines]
        assert [o.new_token_ids for o in outs[0]] == [o.new_token_ids for o in outs[1]]
        assert reqs[0].drafts == reqs[1].drafts
    assert 3 <= reqs[0].verify_steps <= 8 and reqs[0].verify_steps == reqs[1].verify_steps
