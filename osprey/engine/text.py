"""Tokens -> streamed text for one row: incremental detokenization and stop strings.

Each new token goes through the tokenizers library's own incremental decoder (`DecodeStream`: it decodes a short
window of the latest tokens, keeps SentencePiece's leading space as a full decode does, and holds an incomplete UTF-8
sequence until the token that completes it), called on the Rust tokenizer directly: a step costs ~1 us a row, where
two Python-level `decode` calls per row cost ~4 ms a step at 256 rows, time the GPU would wait for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenizers.decoders import DecodeStream

__all__ = ["TextStream"]


@dataclass
class TextStream:
    tokenizer: object  # a transformers tokenizer with a Rust backend (osprey.tokenization builds them all so)
    stop: Sequence[str] = ()
    text: str = ""  # everything emitted so far (stop strings cut off)
    stopped: bool = False  # a stop string was found: the row is over
    tokens: list[int] = field(default_factory=list)
    _held: str = ""  # decoded, not yet emitted: could still be the start of a stop string
    _decoder: DecodeStream = field(default_factory=lambda: DecodeStream(skip_special_tokens=True))

    def push(self, token: int) -> str:
        """Add a generated token -> the text it completes ("" while a character is incomplete or after a stop)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        delta = self._decoder.step(self.tokenizer.backend_tokenizer, token)
        return self._emit(delta) if delta else ""

    def flush(self) -> str:
        """At the end of the row: whatever is still held back (a stop string's possible start, or a trailing
        incomplete byte sequence, which a full decode gives as replacement characters)."""
        if self.stopped:
            return ""
        decoded = self.text + self._held  # without a stop, everything the decoder gave is emitted or held
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        out = self._emit(full[len(decoded):]) if full.startswith(decoded) else ""
        if not self.stopped:
            out, self.text, self._held = out + self._held, self.text + self._held, ""
        return out

    def _emit(self, delta: str) -> str:
        """Add decoded text; emit what can no longer be the start of a stop string, cut at the first stop string.

        The last (longest stop - 1) characters are held back until the next token or `flush`, so a stop string
        that arrives over several tokens is never partly sent.
        """
        stops = [s for s in self.stop if s]
        if not stops:  # nothing to hold back: the common case, one concatenation a token
            self.text += delta
            return delta
        self._held += delta
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
