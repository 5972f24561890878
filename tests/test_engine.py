"""Engine: greedy parity with transformers' Step3p7TextModel run without cache, batching and continuous
batching equal to running alone, sampling settings, logprobs, stop tokens, errors, and the CLI."""

import pytest
import torch

import stepflash
from stepflash.config import make_config, tiny
from stepflash.errors import UserError
from stepflash.inference.cli import GenerateArgs, run
from stepflash.inference.engine import Engine, SamplingParams
from stepflash.inference.sampling import target_probs
from stepflash.checkpoint.hf import hf_to_release
from stepflash.model import Step35ForCausalLM


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    m = Step35ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0, 0.2 if "norm" in name else 0.1)
    m.config.eos_token_id = []
    return m


@pytest.fixture(scope="module")
def model():
    return random_model(tiny())


def prompts_of(*lengths, vocab=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def greedy_uncached(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---- parity with transformers --------------------------------------------------------------------

def test_greedy_matches_transformers_without_cache():
    step3p7 = pytest.importorskip("transformers.models.step3p7")
    cfg = make_config(4, 64, full_heads=4, sliding_heads=8, kv_heads=2, head_dim=16, window=6, vocab=97,
                      inter=80, experts=8, top_k=3, moe_inter=24, dense_layers=1, max_pos=512, rope_original=16)
    hf_cfg = step3p7.Step3p7TextConfig(**cfg.to_dict())
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = step3p7.Step3p7TextModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.08)
        for layer in hf.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    lm_head = torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.1
    ours = Step35ForCausalLM(cfg)
    state = ours.state_dict()  # MTP layers stay random: transformers' text model has none
    state.update(hf_to_release({**hf.state_dict(), "lm_head.weight": lm_head}, cfg.num_hidden_layers))
    ours.load_state_dict(state)
    ours.config.eos_token_id = []
    prompts = prompts_of(9, 4, vocab=97)
    results = Engine(ours, max_batch_size=2).generate(prompts, 20)  # 9 + 20 tokens: ~5 windows
    for prompt, res in zip(prompts, results):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(20):  # full recompute every step, no cache on the transformers side
                ids.append(int((hf(torch.tensor([ids])).last_hidden_state[0, -1] @ lm_head.T).argmax()))
        assert res.token_ids == ids[len(prompt):]


# ---- batching ------------------------------------------------------------------------------------

def test_batched_prompts_of_different_lengths_equal_alone(model):
    prompts = prompts_of(3, 17, 8, 1, 25)
    engine = Engine(model, max_batch_size=3)  # 5 prompts through 3 slots: queueing and slot reuse too
    batched = engine.generate(prompts, 24)
    for p, r in zip(prompts, batched):
        assert r.token_ids == greedy_uncached(model, p, 24)
        assert r.finish_reason == "length"
    # (No top-p here: its cut is discontinuous, so a last-digit difference between batch shapes can move
    # a token across it; temperature and top-k change the distribution continuously.)
    sampled = engine.generate(prompts, 12, temperature=0.9, top_k=50, seed=7)
    alone = [Engine(model, max_batch_size=1).generate([p], 12, temperature=0.9, top_k=50, seed=7 + i)[0]
             for i, p in enumerate(prompts)]
    for s, a in zip(sampled, alone):
        assert s.token_ids == a.token_ids
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=1e-4)


def test_continuous_batching_join_and_abort(model):
    prompts = prompts_of(5, 12, 7, 3)
    engine = Engine(model, max_batch_size=2)
    a = engine.add_request(prompts[0], SamplingParams(max_new_tokens=20))
    got = {a: []}
    for _ in range(4):
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    b = engine.add_request(prompts[1], SamplingParams(max_new_tokens=20, speculative_tokens=2))  # joins mid-run
    c = engine.add_request(prompts[2], SamplingParams(max_new_tokens=20))  # waits: both slots busy
    got.update({b: [], c: []})
    finished = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                finished[out.request_id] = out.finish_reason
        if steps == 3:
            slot_b = engine.scheduler.requests[b].slot
            assert engine.abort(b)
            d = engine.add_request(prompts[3], SamplingParams(max_new_tokens=20))
            got[d] = []
        if steps == 4:  # the waiting request took the aborted one's slot
            assert engine.scheduler.requests[c].slot == slot_b
    assert finished == {a: "length", c: "length", d: "length"}
    assert got[a] == greedy_uncached(model, prompts[0], 20)
    assert got[c] == greedy_uncached(model, prompts[2], 20)
    assert got[d] == greedy_uncached(model, prompts[3], 20)
    assert got[b] == greedy_uncached(model, prompts[1], 20)[: len(got[b])] and len(got[b]) < 20
    assert not engine.abort(b) and not engine.has_unfinished()
    assert engine.scheduler.free == [0, 1]


def test_stream_equals_generate(model):
    p = prompts_of(6)[0]
    engine = Engine(model, max_batch_size=2)
    assert list(engine.stream(p, 15)) == engine.generate([p], 15)[0].token_ids
    it = engine.stream(p, 15)
    next(it)
    it.close()  # a consumer that stops early aborts its request
    assert not engine.has_unfinished()


# ---- sampling, logprobs, stopping ------------------------------------------------------------------

def naive_probs(logits, temperature, top_k, top_p):
    """Straight-line reference for one row."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    probs = torch.softmax(logits / temperature, -1)
    if top_k:
        kth = sorted(logits.tolist(), reverse=True)[top_k - 1]
        probs = torch.where(logits >= kth, probs, 0.0)
        probs = probs / probs.sum()
    keep, mass = torch.zeros_like(probs, dtype=torch.bool), 0.0
    for i in probs.argsort(descending=True).tolist():
        if mass >= top_p:
            break
        keep[i], mass = True, mass + probs[i].item()
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


def test_target_probs_matches_naive():
    torch.manual_seed(0)
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6), (2.0, 1, 0.3)]
    logits = torch.randn(len(settings), 40) * 2
    got = target_probs(logits, *[torch.tensor(col) for col in zip(*settings)])
    for row, (t, k, p) in zip(range(len(settings)), settings):
        torch.testing.assert_close(got[row], naive_probs(logits[row], t, k, p), atol=1e-6, rtol=1e-5)


def test_logprobs_are_those_sampled_from(model):
    p = prompts_of(7)[0]
    engine = Engine(model, max_batch_size=1)
    for params in (dict(), dict(temperature=0.7, top_k=20, seed=3)):
        res = engine.generate([p], 10, **params)[0]
        with torch.no_grad():
            logits = model(torch.tensor([p + res.token_ids]))[0, len(p) - 1: -1]  # [10, V]
        if params:
            ref = naive_probs_rows(logits, 0.7, 20, 1.0).log()
        else:
            ref = torch.log_softmax(logits, -1)
        expect = ref.gather(-1, torch.tensor(res.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(res.logprobs), expect, atol=1e-4, rtol=1e-4)


def naive_probs_rows(logits, t, k, p):
    return torch.stack([naive_probs(row, t, k, p) for row in logits])


def test_seeds(model):
    p = prompts_of(4)[0]
    engine = Engine(model, max_batch_size=2)
    one = engine.generate([p], 12, temperature=1.0, seed=11)[0].token_ids
    assert engine.generate([p], 12, temperature=1.0, seed=11)[0].token_ids == one
    assert engine.generate([p], 12, temperature=1.0, seed=12)[0].token_ids != one


def test_stop_tokens_and_eos(model):
    p = prompts_of(5)[0]
    ref = greedy_uncached(model, p, 12)
    stop = ref[6]
    first = ref.index(stop)
    engine = Engine(model, max_batch_size=1)
    res = engine.generate([p], 12, stop_token_ids=[stop])[0]
    assert res.token_ids == ref[: first + 1] and res.finish_reason == "stop"
    model.config.eos_token_id = [stop]
    try:
        res = Engine(model, max_batch_size=1).generate([p], 12, speculative_tokens=3)[0]
    finally:
        model.config.eos_token_id = []
    assert res.token_ids == ref[: first + 1] and res.finish_reason == "stop"


def test_user_errors(model):
    engine = Engine(model, max_batch_size=1)
    ctx = model.config.max_position_embeddings
    with pytest.raises(UserError, match="context"):
        engine.generate([[1] * (ctx + 3)], 4)
    with pytest.raises(UserError, match="max_new_tokens"):
        engine.generate([[1] * 10], ctx - 5)
    with pytest.raises(UserError, match="empty"):
        engine.generate([[]], 4)
    with pytest.raises(UserError, match="speculative_tokens"):
        engine.generate([[1]], 4, speculative_tokens=4)
    with pytest.raises(UserError, match="top_p"):
        engine.add_request([1], SamplingParams(top_p=0.0))
    with pytest.raises(UserError, match="token ids"):
        engine.generate([[1, 999]], 4)
    # the processors' own rules are checked at submission too, not first inside a batched step
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.add_request([1], SamplingParams(logit_bias={model.config.vocab_size: 1.0}))
    with pytest.raises(UserError, match="logit_bias"):
        engine.add_request([1], SamplingParams(logit_bias={3: float("nan")}))
    with pytest.raises(UserError, match="repetition_penalty"):
        engine.add_request([1], SamplingParams(repetition_penalty=0.0))
    with pytest.raises(UserError, match="logprobs_mode"):
        engine.add_request([1], SamplingParams(logprobs=1, logprobs_mode="sampled"))
    assert not engine.has_unfinished()


# ---- CLI ---------------------------------------------------------------------------------------------

def test_cli_generate(model, tmp_path, capsys):
    stepflash.save_model(model, str(tmp_path))
    p = prompts_of(5)[0]
    ref = greedy_uncached(model, p, 6)
    assert run(GenerateArgs(str(tmp_path), prompt_ids=",".join(map(str, p)), max_new_tokens=6, mtp=2)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ",".join(map(str, ref)) and "decode" in out[1] and "mean accepted" in out[1]
    with pytest.raises(UserError, match="tokenizer"):
        run(GenerateArgs(str(tmp_path), prompt="hello"))
    with pytest.raises(UserError, match="no checkpoint"):
        run(GenerateArgs(str(tmp_path / "missing"), prompt_ids="1,2"))
    with pytest.raises(UserError, match="exactly one"):
        run(GenerateArgs(str(tmp_path)))
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|bos|>", "<|eos|>"] + [f"w{i}" for i in range(254)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert run(GenerateArgs(str(tmp_path), prompt=" ".join(words[i] for i in p), max_new_tokens=6)) == 0
    text = capsys.readouterr().out.splitlines()[0]
    assert text.split() == [words[i] for i in ref]
