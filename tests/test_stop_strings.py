"""Stop strings split across pieces, against the one-shot reference: the text before the earliest
occurrence of any stop string (what vLLM returns without include_stop_str_in_output)."""

import random

import pytest

from stepflash.inference.stop_strings import SEED_MODULUS, StopMatcher, choice_seeds, fan_out


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def run(pieces: list[str], stops: list[str]):
    m = StopMatcher(stops)
    released = []
    for piece in pieces:
        out = m.push(piece)
        released.append(out)
        # Never release a stop string or the start of one that is still open.
        assert not any(s in "".join(released) for s in stops)
    released.append(m.finish())
    return "".join(released), m.stopped is not None, released


@pytest.mark.parametrize("text, stops, pieces", [
    ("Hello world, bye", ["world"], ["Hel", "lo wo", "rld, bye"]),  # split over three pieces
    ("aaab", ["aab"], ["a", "a", "a", "b"]),  # overlapping prefix: the match starts one char later
    ("abcabd", ["abd", "cab"], ["ab", "ca", "bd"]),  # earliest start wins
    ("no stop here", ["xyz"], ["no st", "op here"]),
    ("end<|im", ["<|im_end|>"], ["end<|", "im"]),  # held at the end, released by finish()
    ("東京 ✓ stop", ["✓ s"], ["東", "京 ", "✓", " stop"]),  # multi-byte characters
    ("xx", ["x", "xx"], ["xx"]),
])
def test_cases(text, stops, pieces):
    assert "".join(pieces) == text
    got, stopped, _ = run(pieces, stops)
    assert (got, stopped) == reference(text, stops)


def test_held_text_is_released_as_soon_as_it_cannot_be_a_stop():
    m = StopMatcher(["</answer>"])
    assert m.push("42 </ans") == "42 "
    assert m.push("wer") == ""  # "</answer" is still a prefix
    assert m.push("!") == "</answer!"
    assert m.push("</answer> tail") == "" and m.stopped == "</answer>" and m.push("more") == ""


def test_random_splits_match_the_reference():
    rng = random.Random(0)
    alphabet = "ab<>/ é"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        got, stopped, _ = run(pieces, stops)
        assert (got, stopped) == reference(text, stops), (text, stops, pieces)


def test_choice_seeds_and_fan_out():
    assert choice_seeds(None, 2) == [None, None]
    assert choice_seeds(11, 3) == [11, 12, 13]
    assert choice_seeds(SEED_MODULUS - 1, 2) == [SEED_MODULUS - 1, 0]  # never past int64
    assert fan_out(2, 3) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
