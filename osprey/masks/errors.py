"""The errors of mask decoding: each names the offending value, and carries a code callers can map."""

from __future__ import annotations


class MaskError(ValueError):
    """A region mask that cannot be decoded; the message names the offending value.

    `code` says what kind of problem it is (an HTTP server maps it to its error code), `where` names the
    region in the request or file (`regions[2].box`) once the region decoder knows it.
    """

    def __init__(self, message: str, *, code: str = "invalid_mask", where: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.message = message
        self.code = code
        self.where = where


class MaskWarning(UserWarning):
    """A mask that decodes but looks suspicious (e.g. a self-intersecting polygon)."""
