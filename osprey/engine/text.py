"""Tokens -> streamed text for one row: incremental detokenization and stop strings.

Each step decodes only a short window (the tokens since the last emitted text, plus the few before them), not the
whole answer, so a step costs the same at token 5 and token 1,000. The window and the text before it are decoded
from the same start, so a SentencePiece leading space is kept or dropped the same way in both and the difference
is exactly the new text. An incomplete UTF-8 sequence (a byte token) waits for the token that completes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["TextStream"]


@dataclass
class TextStream:
    tokenizer: object
    stop: Sequence[str] = ()
    text: str = ""  # everything emitted so far (stop strings cut off)
    stopped: bool = False  # a stop string was found: the row is over
    tokens: list[int] = field(default_factory=list)
    _held: str = ""  # decoded, not yet emitted: could still be the start of a stop string
    _prefix_offset: int = 0
    _read_offset: int = 0

    def push(self, token: int) -> str:
        """Add a generated token -> the text it completes ("" while a character is incomplete or after a stop)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        before = self._decode(self._prefix_offset, self._read_offset)
        after = self._decode(self._prefix_offset, len(self.tokens))
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        return self._emit(after[len(before):])

    def flush(self) -> str:
        """At the end of the row: whatever is still held back (e.g. a trailing incomplete byte sequence)."""
        if self.stopped:
            return ""
        before = self._decode(self._prefix_offset, self._read_offset)
        after = self._decode(self._prefix_offset, len(self.tokens))
        self._read_offset = len(self.tokens)
        out = self._emit(after[len(before):]) if after.startswith(before) else ""
        if not self.stopped:
            out, self.text, self._held = out + self._held, self.text + self._held, ""
        return out

    def _emit(self, delta: str) -> str:
        """Add decoded text; emit what can no longer be the start of a stop string, cut at the first stop string.

        The last (longest stop - 1) characters are held back until the next token or `flush`, so a stop string
        that arrives over several tokens is never partly sent.
        """
        self._held += delta
        stops = [s for s in self.stop if s]
        found = [self._held.find(s) for s in stops]
        found = [position for position in found if position >= 0]
        if found:
            out, self._held, self.stopped = self._held[:min(found)], "", True
        else:
            keep = max((len(s) for s in stops), default=1) - 1
            cut = max(0, len(self._held) - keep)  # (held shorter than keep: a negative cut would emit its start)
            out, self._held = self._held[:cut], self._held[cut:]
        self.text += out
        return out

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True)
