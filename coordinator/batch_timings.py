"""How long the device takes per batch shape: the scheduler's cost model."""

from __future__ import annotations

import collections
import statistics
import time
from typing import Callable, Hashable


class BatchTimings:
    """Recent seconds of the device per batch shape.

    A shape's first run is left out (it includes the compilation). The
    estimate is the median of the last `keep` runs, so one slow batch (a GC
    pause, a burst of load on a shared host) does not sway it.

    Args:
        keep: runs per shape the median is taken over.
        clock: seconds, monotonic (a test can pass its own).
    """

    def __init__(self, keep: int = 5, clock: Callable[[], float] = time.monotonic):
        self._keep, self._clock = keep, clock
        self._runs: dict[Hashable, collections.deque[float]] = {}
        self._updated: dict[Hashable, float] = {}
        self._compiled: set[Hashable] = set()

    def record(self, shape: Hashable, seconds: float) -> None:
        if shape not in self._compiled:
            self._compiled.add(shape)
            return
        self._runs.setdefault(shape, collections.deque(maxlen=self._keep)).append(seconds)
        self._updated[shape] = self._clock()

    def seconds(self, shape: Hashable, max_age_s: float | None = None) -> float | None:
        """The estimate; None if the shape has no timed run, or none within
        `max_age_s` when given."""
        runs = self._runs.get(shape)
        if not runs or (max_age_s is not None
                        and self._clock() - self._updated[shape] > max_age_s):
            return None
        return statistics.median(runs)
