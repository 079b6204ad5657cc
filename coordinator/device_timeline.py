"""When a worker's device should be done with what has been sent to it.

Batches and training steps run one after another on a worker's device, so
each one sent is expected to end its (measured) time after the one before
it; the scheduler sends the next batch to arrive as the last one ends.
"""

from __future__ import annotations

import itertools


class DeviceTimeline:
    """Expected end times of the work in flight on one device."""

    def __init__(self):
        self._ends: dict[int, float] = {}
        self._keys = itertools.count()

    def sent(self, now: float, seconds: float) -> int:
        """Work expected to take the device `seconds` after everything in
        flight; returns its key for `ended`."""
        key = next(self._keys)
        self._ends[key] = max([now, *self._ends.values()]) + seconds
        return key

    def ended(self, key: int) -> None:
        self._ends.pop(key, None)

    def busy_until(self) -> float | None:
        """When the device should be done with everything in flight; None
        when nothing is."""
        return max(self._ends.values(), default=None)
