"""Sliding windows over internal samples: the mean and the peak of a gauge over the last N seconds.

The sampler reads a gauge far more often than Prometheus scrapes it; a scrape that only saw the latest
value would miss a 200 ms spike between two 250 ms scrapes. Exporting the max over a window at least
twice the scrape interval means every scrape (and every one of several scrapers) sees every spike.
"""

import math
from collections import deque


class SampleWindow:
    """Mean and max of the values added during the last `window` seconds: the max O(1) amortised per sample,
    the mean summed afresh when asked (a window holds about ten samples: its seconds x the sampling rate). Each
    value weighs its `weight` in the mean: a ratio over an interval weighs the interval's length, and only the part
    of that interval inside the window counts (`since`, the interval's start)."""

    __slots__ = ("window", "_values", "_maxima")

    def __init__(self, window: float):
        if not 0 < window < math.inf:      # NaN passed `<= 0`: no sample ever left the window
            raise ValueError(f"window must be finite and > 0 seconds, got {window}")
        self.window = window
        self._values: deque[tuple[float, float, float, float | None]] = deque()     # (time, value, weight, since)
        # Monotonically decreasing values: the front is always the max of the window.
        self._maxima: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float, weight: float = 1.0, since: float | None = None) -> None:
        """Record value sampled at monotonic time now and forget samples older than the window. A value over the
        interval from `since` to now (a ratio between two readings) weighs in the mean only with its share of that
        interval still inside the window."""
        self._values.append((now, value, weight, since))
        maxima = self._maxima
        while maxima and maxima[-1][1] <= value:
            maxima.pop()
        maxima.append((now, value))
        self.expire(now)

    def expire(self, now: float) -> None:
        """Forget the samples older than the window at monotonic time now, with no new sample: a source whose
        reading failed must not keep its earlier readings in the window past their time."""
        horizon = now - self.window
        values = self._values
        while values and values[0][0] <= horizon:
            values.popleft()
        maxima = self._maxima
        while maxima and maxima[0][0] <= horizon:
            maxima.popleft()

    def __len__(self) -> int:
        return len(self._values)

    def mean(self) -> float | None:
        """The weighted mean of the samples in the window, or None when it is empty. Summed exactly (math.fsum)
        each time: a running sum, added to and subtracted from for every sample, drifted by rounding (a window of
        samples all 1.0 had a mean of 1.0000000000000022, a CPU ratio above 1)."""
        values = self._values
        if not values:
            return None
        horizon = values[-1][0] - self.window
        weights = [self._weight_inside(now, weight, since, horizon) for now, _, weight, since in values]
        return math.fsum(value * weight for (_, value, *_), weight in zip(values, weights)) / math.fsum(weights)

    @staticmethod
    def _weight_inside(now: float, weight: float, since: float | None, horizon: float) -> float:
        """The sample's weight times the share of its interval after the horizon: a sample taken late (its sampler
        starved for 1.5 s) kept its whole weight while it was in the window, the 1.4 s of it before the window
        included (a host idle for 0.9 s of a 1 s window read 0.625 busy)."""
        if since is None or since >= horizon or now <= since:
            return weight
        return weight * (now - horizon) / (now - since)

    def peak(self) -> float | None:
        """The largest sample in the window, or None when it is empty."""
        return self._maxima[0][1] if self._maxima else None

    def latest(self) -> float | None:
        """The most recent sample, or None when the window is empty."""
        return self._values[-1][1] if self._values else None
