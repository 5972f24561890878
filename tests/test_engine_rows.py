"""Per-row features of the engine (issue #12 phase 2), through `Engine.add_request` / `step`:
- isolation: a row that fails inside the engine fails alone, innocent rows equal their solo runs;
- logits processors (vLLM's definitions) against a naive full-forward loop, with and without MTP drafts;
- ignore_eos, min_tokens; logprobs and top logprobs against a full forward (raw and processed);
- grammar-constrained sampling with random weights: only the mask can make the output valid.
"""

import json
import math

import pytest
import torch
from test_engine import naive_probs_rows, prompts_of, random_model
from test_logits_process import naive
from test_structured import SCHEMA, STOPS, TOK, V, valid

from stepflash.config import tiny
from stepflash.inference.engine import Engine, SamplingParams
from stepflash.inference.structured import GrammarCompiler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(tiny())


def run(engine, rows):
    """rows: [(prompt, SamplingParams)] added at once -> {index: (tokens, logprobs, tops, finish, error)}."""
    rids = {engine.add_request(p, sp): i for i, (p, sp) in enumerate(rows)}
    got = {i: ([], [], [], None, None) for i in rids.values()}
    while engine.has_unfinished():
        for out in engine.step():
            toks, lps, tops, _, _ = got[rids[out.request_id]]
            toks += out.new_token_ids
            lps += out.new_logprobs
            tops += out.new_top_logprobs or []
            if out.finished:
                got[rids[out.request_id]] = (toks, lps, tops, out.finish_reason, out.error)
    return [got[i] for i in range(len(rows))]


class ExplodingGrammar:
    """A grammar matcher that raises after a few steps (a bug or a hostile state in one row)."""

    def __init__(self, after=2):
        self.calls, self.after = 0, after

    def masks_along_drafts(self, drafts, out):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("grammar state corrupted")
        return len(drafts) + 1

    def consume(self, tokens):
        return True


class EmptyGrammar(ExplodingGrammar):
    """A grammar that allows no token at all: the row has no distribution to sample from."""

    def masks_along_drafts(self, drafts, out):
        out.zero_()
        return len(drafts) + 1


INNOCENT = [dict(max_new_tokens=12), dict(max_new_tokens=12, temperature=0.8, top_k=30, seed=5),
            dict(max_new_tokens=12, speculative_tokens=2), dict(max_new_tokens=12, temperature=1.0, seed=9,
                                                                speculative_tokens=3, presence_penalty=0.5)]


@pytest.mark.parametrize("poison", ["grammar", "nan", "nothing_allowed"])
def test_a_poisoned_row_fails_alone_and_innocent_rows_equal_their_solo_runs(model, poison):
    prompts = prompts_of(5, 9, 3, 7, 6)
    solo = [run(Engine(model, max_batch_size=1), [(p, SamplingParams(**kw))])[0]
            for p, kw in zip(prompts, INNOCENT)]
    engine = Engine(model, max_batch_size=5)
    bad = SamplingParams(max_new_tokens=12, temperature=0.7, seed=1)
    rows = [(p, SamplingParams(**kw)) for p, kw in zip(prompts, INNOCENT)]
    rows.insert(2, (prompts[4], bad))
    rids = [engine.add_request(p, sp) for p, sp in rows]
    for _ in range(2):  # poison the row once it is running (the engine's own checks would refuse it)
        engine.step()
    req = engine.scheduler.requests[rids[2]]
    if poison == "grammar":
        req.params.grammar = ExplodingGrammar()
    elif poison == "nan":
        req.params.logit_bias = {3: math.nan}
    else:
        req.params.grammar = EmptyGrammar()
    # The first two steps' tokens are in each request's output already.
    got = {r: (list(engine.scheduler.requests[r].output), None, None) for r in rids}
    while engine.has_unfinished():
        for out in engine.step():
            toks, _, _ = got[out.request_id]
            toks += out.new_token_ids
            if out.finished:
                got[out.request_id] = (toks, out.finish_reason, out.error)
    toks, reason, error = got[rids[2]]
    assert reason == "error" and error and "\n" not in error
    innocent = [got[r] for i, r in enumerate(rids) if i != 2]
    assert [g[0] for g in innocent] == [s[0] for s in solo]
    assert not engine.has_unfinished() and engine.scheduler.free == list(range(5))
    # The slot is usable again.
    again = run(engine, [(prompts[0], SamplingParams(**INNOCENT[0]))])[0]
    assert again[0] == solo[0][0]


@pytest.mark.parametrize("spec", [0, 3])
def test_penalties_and_bias_equal_a_naive_full_forward_loop(model, spec):
    """Greedy with vLLM's penalties, written per token over a full forward without cache."""
    prompt = prompts_of(6)[0]
    sp = SamplingParams(max_new_tokens=14, repetition_penalty=1.7, frequency_penalty=0.6, presence_penalty=0.3,
                        logit_bias={7: 2.5, 11: -3.0}, speculative_tokens=spec, logprobs=2, logprobs_mode="raw")
    toks, lps, tops, _, _ = run(Engine(model, max_batch_size=2), [(prompt, sp)])[0]
    out = []
    with torch.no_grad():
        for _ in range(14):
            logits = model(torch.tensor([prompt + out]))[0, -1]
            x = naive(logits, prompt, out, sp, stop_ids=())  # the processors' reference, test_logits_process
            out.append(max(range(len(x)), key=x.__getitem__))
        full = model(torch.tensor([prompt + out]))[0, len(prompt) - 1: -1]
    assert toks == out
    raw = torch.log_softmax(full.float(), -1)
    torch.testing.assert_close(torch.tensor(lps), raw.gather(-1, torch.tensor(out)[:, None]).squeeze(-1),
                               atol=1e-4, rtol=1e-4)
    assert [[t for t, _ in row] for row in tops] == raw.topk(2, -1).indices.tolist()
    # Negative control: without the processors greedy decoding differs.
    plain = run(Engine(model, max_batch_size=1), [(prompt, SamplingParams(max_new_tokens=14))])[0][0]
    assert plain != out


@pytest.mark.parametrize("spec", [0, 2])
def test_processed_logprobs_are_the_sampled_distribution(model, spec):
    prompt = prompts_of(7)[0]
    sp = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, seed=3, logprobs=3, speculative_tokens=spec)
    toks, lps, tops, _, _ = run(Engine(model, max_batch_size=1), [(prompt, sp)])[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + toks]))[0, len(prompt) - 1: -1]
    ref = naive_probs_rows(logits, 0.7, 20, 1.0).log()
    torch.testing.assert_close(torch.tensor(lps), ref.gather(-1, torch.tensor(toks)[:, None]).squeeze(-1),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor([[v for _, v in row] for row in tops]), ref.topk(3, -1).values,
                               atol=1e-4, rtol=1e-4)


def test_ignore_eos_and_min_tokens(model):
    prompt = prompts_of(5)[0]
    plain = run(Engine(model, max_batch_size=1), [(prompt, SamplingParams(max_new_tokens=20))])[0][0]
    eos = plain[3]
    engine = Engine(model, max_batch_size=2)
    engine.eos = frozenset({eos})  # the 4th greedy token is now an eos id
    stopped = run(engine, [(prompt, SamplingParams(max_new_tokens=20))])[0]
    assert stopped[3] == "stop" and stopped[0] == plain[: plain.index(eos) + 1]
    ignored = run(engine, [(prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))])[0]
    assert ignored[3] == "length" and len(ignored[0]) == 20
    held = run(engine, [(prompt, SamplingParams(max_new_tokens=20, min_tokens=8))])[0]
    assert eos not in held[0][:8]


# ---- grammar --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grammar_model():
    return random_model(tiny().replace(vocab_size=V))


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(TOK, V, STOPS)


def _json(tokens):
    text = TOK.decode([t for t in tokens if t not in STOPS], skip_special_tokens=False)
    try:
        return json.loads(text)
    except ValueError:
        return None


@pytest.mark.parametrize("spec", [0, 3])
def test_json_schema_rows_are_valid_only_with_the_grammar(grammar_model, compiler, spec):
    grammar = compiler.json_schema(SCHEMA)
    engine = Engine(grammar_model, max_batch_size=4)
    engine.eos = frozenset(STOPS)
    prompts = prompts_of(4, 6, 3, 5, vocab=V)
    rows = [(p, SamplingParams(max_new_tokens=120, temperature=t, seed=i, speculative_tokens=spec,
                               grammar=compiler.matcher(grammar)))
            for i, (p, t) in enumerate(zip(prompts, (0.0, 1.0, 0.7, 0.0)))]
    rows.append((prompts[0], SamplingParams(max_new_tokens=30, temperature=1.0, seed=1)))  # unconstrained
    results = run(engine, rows)
    for toks, _, _, reason, _ in results[:4]:
        assert reason == "stop" and valid(_json(toks), SCHEMA), TOK.decode(toks)
    assert _json(results[4][0]) is None  # negative control: random weights do not write JSON
    if spec:  # greedy with drafts checked against the grammar equals greedy without drafts
        plain = run(engine, [(prompts[0], SamplingParams(max_new_tokens=120, grammar=compiler.matcher(grammar)))])
        assert plain[0][0] == results[0][0]


def test_grammar_rows_with_continuous_batching(grammar_model, compiler):
    grammar = compiler.json_object()
    engine = Engine(grammar_model, max_batch_size=2)
    engine.eos = frozenset(STOPS)
    prompts = prompts_of(3, 5, 4, 6, 2, vocab=V)
    rows = [(p, SamplingParams(max_new_tokens=60, temperature=1.0, seed=i, grammar=compiler.matcher(grammar)))
            for i, p in enumerate(prompts)]  # 5 rows through 2 slots: slots are reused
    results = run(engine, rows)
    for toks, _, _, reason, _ in results:  # every row's output is a prefix the grammar accepts
        ok = compiler.matcher(grammar).validate([t for t in toks if t not in STOPS])
        assert ok == len([t for t in toks if t not in STOPS]), TOK.decode(toks)
    assert any(isinstance(_json(r[0]), dict) for r in results)


@pytest.mark.parametrize("poison", [False, True])
def test_masks_overlapped_with_the_forward_equal_the_inline_path(grammar_model, compiler, poison):
    """On an accelerator the grammar masks are computed in a worker thread through llguidance's parallel
    executor while the forward runs (`RowLogits.overlap`); forced on here, on the CPU. With MTP drafts
    every step, mixed temperatures and an unconstrained row, every token and logprob equals the inline
    path; a row whose grammar raises fails alone there too."""
    grammar = compiler.json_schema(SCHEMA)
    prompts = prompts_of(4, 6, 3, 5, vocab=V)

    def rows():
        out = [(p, SamplingParams(max_new_tokens=120, temperature=t, seed=i, speculative_tokens=3,
                                  grammar=compiler.matcher(grammar)))
               for i, (p, t) in enumerate(zip(prompts, (0.0, 1.0, 0.7)))]
        return out + [(prompts[3], SamplingParams(max_new_tokens=30, temperature=1.0, seed=3, speculative_tokens=2))]

    results = []
    for overlap in (False, True):
        engine = Engine(grammar_model, max_batch_size=4, adaptive_drafts=False)
        engine.eos, engine.rows.overlap = frozenset(STOPS), overlap
        batch = rows()
        if poison:
            batch[1][1].grammar = ExplodingGrammar(after=3)
        results.append(run(engine, batch))
    assert results[0] == results[1]
    assert [r[3] for r in results[1][:3]] == ["stop", "error" if poison else "stop", "stop"]
    assert all(valid(_json(results[1][i][0]), SCHEMA) for i in ((0, 2) if poison else (0, 1, 2)))
