"""Stop strings across token boundaries, and n > 1 fan-out.

`StopMatcher` works on text as it is decoded, piece by piece of any size (a token, several accepted
MTP drafts). A stop string may be split over pieces, so the matcher holds back the longest tail that
could still become the start of one, and releases it once the next piece decides. On a match the
text from the stop string on is dropped and the matcher stops: the released text never shows a stop
string or a first half of one (OpenAI's and vLLM's `stop`, without `include_stop_str_in_output`).
Matching is on characters of the decoded text, so the caller must push whole characters (a byte-level
tokenizer can split one across tokens; `server/textstream.py` waits for the rest before pushing).

Cost: a push scans only the held tail plus the new text, so a stream of any length costs O(total
length x number of stops) overall; stop strings are short (the server caps their length).

`choice_seeds` gives the seeds of the n choices of one request: choice j samples with seed + j (as
`Engine.generate` seeds prompt i with seed + i), wrapped into [0, 2**63) so seed + j never overflows
the int64 a torch.Generator takes.
"""

from __future__ import annotations

SEED_MODULUS = 2**63


class StopMatcher:
    def __init__(self, stop_strings: list[str]):
        self.stops = [s for s in stop_strings if s]
        self.held = ""  # text not yet released: it may be the start of a stop string
        self.stopped: str | None = None  # the stop string that matched

    def push(self, text: str) -> str:
        """Add decoded text; return what may be released now ("" while undecided or after a stop)."""
        if self.stopped is not None:
            return ""
        buf = self.held + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            at, self.stopped = min(hits)
            self.held = ""
            return buf[:at]
        keep = max((_partial(buf, s) for s in self.stops), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> str:
        """Generation ended without a stop string: release what was held back."""
        out, self.held = ("" if self.stopped is not None else self.held), ""
        return out


def _partial(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    last = text[-1:] if text else ""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop[n - 1] == last and text.endswith(stop[:n]):
            return n
    return 0


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """Seeds of the n choices of a request: seed + j modulo 2**63; all None without a seed."""
    return [None if seed is None else (seed + j) % SEED_MODULUS for j in range(n)]


def fan_out(num_prompts: int, n: int) -> list[tuple[int, int]]:
    """(prompt index, choice of that prompt) per engine row, in the order of OpenAI's `choices`
    (index = prompt * n + choice)."""
    return [(p, j) for p in range(num_prompts) for j in range(n)]
