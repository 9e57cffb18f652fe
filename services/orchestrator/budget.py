"""The job's wall-clock budget (`max_minutes`): stop after the step in progress when one more
step would end past it.

Elapsed time counts from `run_job`'s start: Ray and the actors starting, the base model's
held-out evaluation and every step so far. One more step is estimated as the median of the
steps' wall times so far (from one step's end to the next, the first from the loop's start; so
an evaluation or checkpoint is in the step it follows, and the median keeps an occasional long
one from standing for all). Each `rft run` invocation, a resumed one too, has a budget of its
own from its own start, and trains at least one step.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence


def one_more_step_fits(elapsed_s: float, step_seconds: Sequence[float], budget_s: float) -> bool:
    """Would a step like the median of `step_seconds` end within `budget_s`?"""
    if not step_seconds:
        raise ValueError("no step time yet to estimate the next step from")
    return elapsed_s + statistics.median(step_seconds) <= budget_s


class WallClockBudget:
    def __init__(self, max_minutes: float | None, started_at: float):
        """`started_at`: `time.perf_counter()` when the job started."""
        self.budget_s = None if max_minutes is None else 60.0 * max_minutes
        self.started_at = started_at
        self.step_seconds: list[float] = []
        self._step_began = started_at

    def steps_begin(self) -> None:
        """The main loop starts: the first step's time counts from now."""
        self._step_began = time.perf_counter()

    def step_ended(self) -> bool:
        """A step's training is done; True = there is time for one more."""
        now = time.perf_counter()
        self.step_seconds.append(now - self._step_began)
        self._step_began = now
        if self.budget_s is None:
            return True
        return one_more_step_fits(now - self.started_at, self.step_seconds, self.budget_s)
