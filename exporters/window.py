"""Sliding windows over internal samples: the mean and the peak of a gauge over the last N seconds.

The sampler reads a gauge far more often than Prometheus scrapes it; a scrape that only saw the latest
value would miss a 200 ms spike between two 250 ms scrapes. Exporting the max over a window at least
twice the scrape interval means every scrape (and every one of several scrapers) sees every spike.
"""

from collections import deque


class SampleWindow:
    """Mean and max of the values added during the last `window` seconds, O(1) amortised per sample."""

    __slots__ = ("window", "_values", "_sum", "_maxima")

    def __init__(self, window: float):
        if window <= 0:
            raise ValueError(f"window must be > 0 seconds, got {window}")
        self.window = window
        self._values: deque[tuple[float, float]] = deque()
        self._sum = 0.0
        # Monotonically decreasing values: the front is always the max of the window.
        self._maxima: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        """Record value sampled at monotonic time now and forget samples older than the window."""
        self._values.append((now, value))
        self._sum += value
        maxima = self._maxima
        while maxima and maxima[-1][1] <= value:
            maxima.pop()
        maxima.append((now, value))
        self._expire(now)

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        values = self._values
        while values and values[0][0] <= horizon:
            self._sum -= values.popleft()[1]
        maxima = self._maxima
        while maxima and maxima[0][0] <= horizon:
            maxima.popleft()
        if not values:
            self._sum = 0.0

    def __len__(self) -> int:
        return len(self._values)

    def mean(self) -> float | None:
        """The mean of the samples in the window, or None when it is empty."""
        return self._sum / len(self._values) if self._values else None

    def peak(self) -> float | None:
        """The largest sample in the window, or None when it is empty."""
        return self._maxima[0][1] if self._maxima else None

    def latest(self) -> float | None:
        """The most recent sample, or None when the window is empty."""
        return self._values[-1][1] if self._values else None
