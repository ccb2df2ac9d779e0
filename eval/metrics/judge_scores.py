"""Parsing the LLM judge's review into the two 1-10 scores, and the relative score.

The judge is asked (LLaVA review rule) to put the scores for Assistant 1 (reference) and Assistant 2 (ours)
alone on the first line. Judges often don't, so after the official first-line rule we try a few patterns;
anything still unclear is reported as unparseable (None), never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_NUM = r"(10(?:\.0+)?|\d(?:\.\d+)?)(?!\d)"  # a score in [0, 10], not part of a longer number
_PATTERNS = [
    # "Assistant 1: 8 ... Assistant 2: 7" (also "Assistant 1 receives a score of 8")
    re.compile(
        r"assistant\s*1\D{0,40}?"
        + _NUM
        + r"(?:\s*/\s*10)?\b.*?assistant\s*2\D{0,40}?"
        + _NUM
        + r"(?:\s*/\s*10)?\b",
        re.IGNORECASE | re.DOTALL,
    ),
    # "8/10 and 7/10"
    re.compile(_NUM + r"\s*/\s*10\b.*?" + _NUM + r"\s*/\s*10\b", re.DOTALL),
    # "Scores: 8 and 7", "8 vs 7", "8 - 7", "(8, 7)"
    re.compile(
        r"(?<![\d.])" + _NUM + r"\s*(?:,|and|vs\.?|-|;|\|)?\s*" + _NUM + r"(?![\d.]|\s*/)", re.IGNORECASE
    ),
]


def _in_range(values: Iterable[float]) -> bool:
    return all(0.0 <= v <= 10.0 for v in values)


def parse_scores(review: str) -> tuple[float, float] | None:
    """(score of assistant 1, score of assistant 2) or None when the review holds no clear pair.

    First the official rule: the first line, commas as spaces, exactly two numbers. Then the patterns
    above on the first line, then on the whole review.
    """
    if not review or not review.strip():
        return None
    first = review.strip().splitlines()[0]
    parts = first.replace(",", " ").split()
    if len(parts) == 2:
        try:
            pair = (float(parts[0]), float(parts[1]))
        except ValueError:
            pair = None
        if pair is not None and _in_range(pair):
            return pair
    for text in (first, review):
        for pattern in _PATTERNS:
            m = pattern.search(text)
            if m:
                pair = (float(m.group(1)), float(m.group(2)))
                if _in_range(pair):
                    return pair
    return None


def relative_score(pairs: Iterable[tuple[float, float]]) -> float:
    """Sum of our scores over the sum of the reference's, x100 (the official summary's mean ratio)."""
    pairs = list(pairs)
    ref = sum(p[0] for p in pairs)
    if ref <= 0:
        raise ValueError("relative score is undefined: the reference answers received no score")
    return 100.0 * sum(p[1] for p in pairs) / ref
