"""Rows in, text out: a `RegionDecoder` with one `TextStream` per row, the unit the pipeline and the server drive."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from osprey.engine.core import GroupRequest, RegionDecoder, TokenEvent
from osprey.engine.text import TextStream

__all__ = ["DecodeSession", "StreamEvent"]


@dataclass(frozen=True)
class StreamEvent:
    row: Hashable  # the row id given with the row
    text_delta: str
    token_id: int | None  # the generated token (None for EOS and cancellations)
    finished: bool
    finish_reason: str | None  # "stop" (EOS or a stop string) | "length" | "cancelled" | None


class DecodeSession:
    def __init__(self, decoder: RegionDecoder, tokenizer) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.streams: dict[Hashable, TextStream] = {}

    @property
    def has_work(self) -> bool:
        return self.decoder.has_work

    @property
    def live_rows(self) -> int:
        return self.decoder.live_rows

    def add(self, groups: Sequence[GroupRequest]) -> None:
        """Queue groups of rows; raises ValueError (nothing queued) when a row cannot fit the engine."""
        for group in groups:
            self.decoder.check(group)
        for group in groups:
            self.decoder.add(group)
            for row in group.rows:
                self.streams[row.row_id] = TextStream(self.tokenizer, row.params.stop)

    def cancel(self, row_id: Hashable) -> StreamEvent:
        """Stop a row now: its slot is freed before the next step."""
        self.decoder.release(row_id)
        self.streams.pop(row_id, None)
        return StreamEvent(row_id, "", None, True, "cancelled")

    def step(self) -> list[StreamEvent]:
        return [event for token in self.decoder.step() if (event := self._text(token)) is not None]

    def _text(self, token: TokenEvent) -> StreamEvent | None:
        stream = self.streams.get(token.row_id)
        if stream is None:  # cancelled while its last step ran
            return None
        delta = stream.push(token.token) if token.token is not None else ""
        reason = token.finish_reason
        if stream.stopped:
            reason = "stop"
            if not token.finished:
                self.decoder.release(token.row_id)
        elif token.finished:
            delta += stream.flush()
        if reason is not None:
            del self.streams[token.row_id]
        return StreamEvent(token.row_id, delta, token.token, reason is not None, reason)
