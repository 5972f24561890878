"""Logits processors and logprobs against naive per-token Python written from vLLM's definitions
(`vllm/v1/sample/sampler.py` order; `apply_penalties` formulas), including the positions of
speculative verification, where position t must see the drafts before it."""

import math

import pytest
import torch

from stepflash.errors import UserError
from stepflash.inference.logits_process import (
    LogitsParams,
    TokenCounts,
    apply_processors,
    sampled_logprobs,
    top_logprobs,
)
from stepflash.inference.sampling import sample, target_probs, uniforms

V = 40


def naive(logits, prompt, output, p: LogitsParams, stop_ids):
    """One row, one position: the processed logits as plain Python floats."""
    x = [float(v) for v in logits]
    for tok, bias in p.logit_bias.items():
        x[tok] += bias
    for tok in p.banned_token_ids:
        x[tok] = -math.inf
    if len(output) < p.min_tokens:
        for tok in stop_ids:
            x[tok] = -math.inf
    seen = set(prompt) | set(output)
    for tok in range(len(x)):
        if tok in seen:
            x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
        count = output.count(tok)
        x[tok] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return x


CASES = [  # (params, prompt, output so far, drafts)
    (LogitsParams(presence_penalty=0.7), [1, 2], [3, 3, 4], [3, 9]),
    (LogitsParams(frequency_penalty=-1.3), [5], [6, 6, 6, 7], [6]),
    (LogitsParams(repetition_penalty=1.8), [1, 2, 30], [2, 8], [30, 31, 2]),
    (LogitsParams(repetition_penalty=0.5, frequency_penalty=0.2, presence_penalty=-0.4), [0], [0, 1, 1], []),
    (LogitsParams(min_tokens=3), [1], [5], [7, 8]),  # positions 0, 1 (output 1, 2 tokens) may not stop
    (LogitsParams(logit_bias={4: 100.0, 5: -100.0}, presence_penalty=2.0), [], [4], [4]),
    (LogitsParams(), [1, 2], [3], [4]),  # inactive row batched with active ones
    (LogitsParams(banned_token_ids=(7, 9), logit_bias={7: 50.0}), [], [], [7]),
]
STOPS = {0: [1, 11], 1: [1], 2: [1, 12], 3: [1], 4: [1, 13], 5: [1], 6: [1], 7: [1]}


def test_processors_match_naive_at_every_verified_position():
    g = torch.Generator().manual_seed(0)
    T = 1 + max(len(c[3]) for c in CASES)
    logits = torch.randn(len(CASES), T, V, generator=g) * 3
    counts = TokenCounts(8, V)
    slots = [6, 0, 3, 1, 2, 5, 4, 7]  # rows are not in slot order
    for (params, prompt, output, _), slot in zip(CASES, slots):
        counts.reset(slot, prompt)
        counts.add(slot, output)
    stop_ids = [STOPS[i] for i in range(len(CASES))]
    got = apply_processors(logits, slots, [c[0] for c in CASES], counts, stop_ids, [c[3] for c in CASES])
    for i, (params, prompt, output, drafts) in enumerate(CASES):
        for t in range(len(drafts) + 1):
            want = torch.tensor(naive(logits[i, t], prompt, output + drafts[:t], params, stop_ids[i]))
            torch.testing.assert_close(got[i, t], want, rtol=1e-6, atol=1e-5)
    assert torch.equal(got[6], logits[6])  # no processor: untouched
    assert torch.isinf(got[4, :2, 13]).all() and torch.isfinite(got[4, 2, 13])  # min_tokens lifts at position 2


def test_min_tokens_yields_to_a_grammar_that_only_allows_stopping():
    logits = torch.full((2, 1, V), float("-inf"))
    logits[:, 0, 1] = 0.5  # a complete grammar: only the stop id 1 is allowed
    logits[1, 0, 2] = 0.1  # here another token is allowed too, so min_tokens applies
    counts = TokenCounts(2, V)
    counts.reset(0, [])
    counts.reset(1, [])
    got = apply_processors(logits, [0, 1], [LogitsParams(min_tokens=5)] * 2, counts, [[1], [1]])
    assert got[0, 0, 1] == 0.5 and torch.isfinite(got[0]).sum() == 1
    assert torch.isinf(got[1, 0, 1]) and got[1, 0, 2] == 0.1


def test_counts_reset_between_requests_in_a_slot():
    counts = TokenCounts(2, V)
    counts.reset(0, [1, 2])
    counts.add(0, [3, 3])
    counts.reset(0, [7])
    counts.add(0, [8])
    assert counts.output[0].nonzero().flatten().tolist() == [8] and counts.prompt[0].nonzero().flatten().tolist() == [7]
    assert counts.generated[0] == 1


def test_penalties_change_what_is_sampled():
    """Negative control for the pipeline: a strong presence penalty moves greedy off a repeated argmax."""
    logits = torch.zeros(1, 1, V)
    logits[0, 0, 3] = 1.0
    counts = TokenCounts(1, V)
    counts.reset(0, [])
    counts.add(0, [3])
    plain = apply_processors(logits, [0], [LogitsParams()], counts, [[]])
    penalised = apply_processors(logits, [0], [LogitsParams(presence_penalty=2.0)], counts, [[]])
    assert plain[0, 0].argmax() == 3 and penalised[0, 0].argmax() != 3


@pytest.mark.parametrize("params, fragment", [
    (LogitsParams(presence_penalty=2.5), "presence_penalty"),
    (LogitsParams(frequency_penalty=float("nan")), "frequency_penalty"),
    (LogitsParams(repetition_penalty=0.0), "repetition_penalty"),
    (LogitsParams(repetition_penalty=float("inf")), "repetition_penalty"),
    (LogitsParams(min_tokens=-1), "min_tokens"),
    (LogitsParams(logit_bias={V: 1.0}), "logit_bias"),
    (LogitsParams(logit_bias={1: 101.0}), "logit_bias"),
])
def test_check_refuses_values_vllm_refuses(params, fragment):
    with pytest.raises(UserError, match=fragment):
        params.check(V)


def test_logprobs_are_of_the_sampled_distribution():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, V, generator=g) * 2
    temp = torch.tensor([0.0, 0.7, 1.3, 1.0])
    top_k = torch.tensor([0, 5, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 0.8, 1.0])
    probs = target_probs(logits, temp, top_k, top_p)
    lp = sampled_logprobs(logits, probs, temp <= 0)
    ids = torch.tensor([int(logits[0].argmax()), 2, 3, 4])
    chosen, top_ids, top_lps = top_logprobs(lp, ids, 3)
    # Greedy row: log-softmax of the logits at temperature 1; sampled rows: log of what was sampled from.
    torch.testing.assert_close(lp[0], torch.log_softmax(logits[0], -1))
    ref = torch.log_softmax(logits[3] / 1.0, -1)
    torch.testing.assert_close(lp[3], ref)
    scaled = logits[1] / 0.7
    kth = scaled.sort(descending=True).values[4]
    ref1 = torch.log_softmax(scaled.masked_fill(scaled < kth, -math.inf), -1)
    torch.testing.assert_close(lp[1], ref1)
    assert math.isinf(lp[1].min()) and (lp[1] > -math.inf).sum() == 5  # outside top-k: -inf
    for r in range(4):
        assert chosen[r] == lp[r, ids[r]]
        want = sorted(range(V), key=lambda t: (-float(lp[r, t]), t))[:3]
        assert top_ids[r].tolist() == want
        assert top_lps[r].tolist() == [float(lp[r, t]) for t in want]
    empty = top_logprobs(lp, ids, 0)
    assert empty[1].shape == (4, 0)


def test_seeded_rows_sample_the_same_alone_or_batched_with_processors():
    """Per-row seeded sampling: a row's tokens depend on its seed and its own history only."""
    g = torch.Generator().manual_seed(2)
    steps = [torch.randn(3, 1, V, generator=g) for _ in range(6)]
    params = [LogitsParams(presence_penalty=1.0), LogitsParams(), LogitsParams(repetition_penalty=1.5)]

    def run(rows):
        counts = TokenCounts(3, V)
        gens = {r: torch.Generator().manual_seed(100 + r) for r in rows}
        for r in rows:
            counts.reset(r, [r])
        out = {r: [] for r in rows}
        for step in steps:
            x = apply_processors(step[rows], rows, [params[r] for r in rows], counts, [[] for _ in rows])[:, 0]
            probs = target_probs(x, torch.ones(len(rows)), torch.zeros(len(rows), dtype=torch.long),
                                 torch.ones(len(rows)))
            u = uniforms([gens[r] for r in rows], [1] * len(rows), 1, "cpu")[:, 0]
            for r, tok in zip(rows, sample(probs, u).tolist()):
                out[r].append(tok)
                counts.add(r, [tok])
        return out

    together = run([0, 1, 2])
    assert [together[r] for r in range(3)] == [run([r])[r] for r in range(3)]
