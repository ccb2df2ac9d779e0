"""The learning-rate schedule both training loops use, and the time box that fits it into a time limit.

A run on a time-boxed machine should end annealed, not cut mid-schedule: `TimeBox` measures the pace after a few warm
steps and sets the cosine's horizon to the steps that fit (at most the planned ones), re-estimated every step, so
the rate still reaches its end in time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The rate factor of transformers' `get_cosine_schedule_with_warmup` (half a cosine) at `step`."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int,
                    horizon: Callable[[], int]) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine to 0 at `horizon()`, read at every step (a time limit may move it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_with_warmup(step, warmup, horizon()))


class TimeBox:
    """How many optimiser steps fit in `limit` seconds from now on, from the pace measured after a few warm steps
    (the first steps pay for data-loader start-up and kernel warm-up), up to the planned number of steps.

    The horizon follows the pace measured so far at every step, in both directions: the first estimate comes while the
    data loader's workers are still filling and is often pessimistic, and locking it in wastes the time it
    underestimated (on one H100, a 360 s CLIP run fixed its horizon at 997 steps from its first five measured steps
    and finished 70 s early). Checkpoint saves are part of the pace as they come."""

    WARM_STEPS = 3  # steps not measured
    PACE_STEPS = 5  # steps measured before the first estimate

    def __init__(self, limit: float, start_step: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.limit, self.start_step, self.clock = limit, start_step, clock
        self.started = clock()
        self.mark: tuple[int, float] | None = None  # (step, time) where the pace is measured from

    def fit(self, step: int, horizon: int, planned: int) -> tuple[int, bool]:
        """(the horizon: the steps that fit, at most `planned`, or `horizon` as it is until the pace is measured;
        whether the limit is already reached) after `step`."""
        now = self.clock()
        elapsed = now - self.started
        if elapsed >= self.limit:
            return step, True
        if self.mark is None:
            if step - self.start_step >= self.WARM_STEPS:
                self.mark = (step, now)
            return horizon, False
        measured = step - self.mark[0]
        if measured < self.PACE_STEPS:
            return horizon, False
        per_step = (now - self.mark[1]) / measured
        return min(planned, step + int((self.limit - elapsed) / per_step)), False
