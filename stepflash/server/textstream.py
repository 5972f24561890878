"""Token ids in, text out, for one generated sequence: incremental decoding and stop strings.

Decoding token by token is wrong for byte-level BPE: a character may span tokens, and decoding a
lone token gives U+FFFD. `TextStream` decodes a short window of recent ids (from `prefix` on) and
releases only the text that the newest tokens added, waiting while it ends in an incomplete
character. Stop strings are matched on the decoded text; the text from the match on is dropped.
Text that could still turn into a stop string is held back until the next tokens decide it, so a
streamed answer never shows a stop string's first half. Special tokens stay in the text (the chat
parser needs `</think>` and `<tool_call>`), except the ids in `hidden_ids` (end-of-turn markers).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop_strings: list[str] = (), hidden_ids=()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.hidden_ids = set(hidden_ids)
        self.ids: list[int] = []
        self.prefix = 0  # decode from here: a few tokens of context so joins decode right
        self.read = 0  # ids before this have been turned into text
        self.text = ""  # all decoded text (after a stop: up to the stop string)
        self.sent = 0  # chars of `text` already released
        self.stopped = False

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
                self.text += after[len(before):]
                self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: release what was held back (an incomplete character decodes as U+FFFD)."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            self.text += self._decode(self.ids[self.prefix:])[len(before):]
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped and self.stop_strings:
            longest = max(len(s) for s in self.stop_strings)
            start = max(0, self.sent - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text)
        if not (final or self.stopped):
            end -= max((_held(self.text, s) for s in self.stop_strings), default=0)
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out


def _held(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
