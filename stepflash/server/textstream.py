"""Token ids in, text out, for one generated sequence: incremental decoding and stop strings.

Decoding token by token is wrong for byte-level BPE: a character may span tokens, and decoding a
lone token gives U+FFFD. `TextStream` decodes a short window of recent ids (from `prefix` on) and
passes on only the text that the newest tokens added, waiting while it ends in an incomplete
character, so streamed text never splits a UTF-8 character. Stop strings are matched on that text by
`inference.stop_strings.StopMatcher` (across any token boundaries; text that could still become a stop
string is held back until the next tokens decide, so a streamed answer never shows a stop string's
first half). Special tokens stay in the text (the chat parser needs `</think>` and `<tool_call>`),
except the ids in `hidden_ids` (end-of-turn markers).
"""

from __future__ import annotations

from stepflash.inference.stop_strings import StopMatcher


class TextStream:
    def __init__(self, tokenizer, stop_strings: list[str] = (), hidden_ids=()):
        self.tokenizer = tokenizer
        self.matcher = StopMatcher(list(stop_strings))
        self.hidden_ids = set(hidden_ids)
        self.ids: list[int] = []
        self.prefix = 0  # decode from here: a few tokens of context so joins decode right
        self.read = 0  # ids before this have been turned into text

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped is not None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token_ids: list[int]) -> str:
        """Add generated ids; return the newly released text ("" while undecided)."""
        if self.stopped:
            return ""
        self.ids += [t for t in token_ids if t not in self.hidden_ids]
        if self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            after = self._decode(self.ids[self.prefix:])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.prefix, self.read = self.read, len(self.ids)
                return self.matcher.push(after[len(before):])
        return ""

    def finish(self) -> str:
        """The generation ended: release what was held back (an incomplete character decodes as U+FFFD)."""
        out = ""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            out = self.matcher.push(self._decode(self.ids[self.prefix:])[len(before):])
            self.read = len(self.ids)
        return out + self.matcher.finish()
