"""The learning-rate schedule both training loops use, and the time box that fits it into a time limit.

A run on a time-boxed machine should end annealed, not cut mid-schedule: `TimeBox` measures the pace after a few warm
steps and sets the cosine's horizon to the steps that fit (at most the planned ones), re-estimated every step, so
the rate still reaches its end in time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


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


class FittedHorizon:
    """The schedule's last step under a time limit, as a run goes: `update(step)` after every optimiser step refits
    it with the `TimeBox` (rank 0's clock decides for every rank, so all stop at the same step) and says whether the
    limit is reached. Without a limit the horizon stays `planned`."""

    def __init__(self, limit: float, start_step: int, planned: int, device: torch.device, *, horizon: int | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.limit, self.planned, self.device = limit, planned, device
        self.horizon = horizon or planned  # a resumed run's fitted horizon, else the plan
        self.time_box = (TimeBox(limit, start_step) if clock is None else TimeBox(limit, start_step, clock)) \
            if limit > 0 else None
        self.logged = self.horizon != planned  # a resumed run logged its fit already

    def update(self, step: int) -> bool:
        """Refit after `step`; True when the time limit is reached (the horizon is then `step`)."""
        from train.deepspeed_utils import broadcast_from_rank0

        if self.time_box is None:
            return False
        horizon, out_of_time = self.time_box.fit(step, self.horizon, self.planned)
        horizon, out_of_time = broadcast_from_rank0([horizon, int(out_of_time)], self.device)
        if out_of_time:
            if step < self.horizon:
                logger.warning("time limit of %.0f s reached at step %d of %d: stopping before the schedule's end",
                               self.limit, step, self.horizon)
            horizon = step
        if horizon != self.horizon and not self.logged:  # later refits move it a step or two as the pace settles
            logger.info("time limit %.0f s: the schedule now ends at step %d (was %d)", self.limit, horizon,
                        self.horizon)
            self.logged = True
        self.horizon = horizon
        return bool(out_of_time)
