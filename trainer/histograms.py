"""Step-time, data-wait and checkpoint histograms filled on the hot path for the price of a bisect.

An OpenTelemetry histogram costs ~3 µs a record in Python, and a step records two values: at 0.7 ms steps
that alone is a 1 % slowdown. These keep bucket counts, sum and count themselves (~0.4 µs a value); series.py
writes them as the OpenTelemetry exporter wrote its histograms (names, labels, buckets). When OTLP push is on,
the values also go to the OpenTelemetry histograms (in batches, off the hot path) so the push carries them.
"""

from bisect import bisect_left

# Reads a snapshot makes before it takes what it read (the loop counting many values between two of its reads).
READS = 3


class DurationHistogram:
    """Counts of durations per bucket (le semantics: a value lands in the first bucket whose bound is >= it),
    their sum and count. One writer (the training loop); readers take a snapshot()."""

    __slots__ = ("bounds", "counts", "totals", "agreed")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)       # the last one is +Inf
        # (values, their sum, the sum before the last value), stored in one go before the value's bucket is
        # counted: a reader between the two stores can tell, and take the sum its buckets agree with.
        self.totals: tuple[int, float, float] = (0, 0.0, 0.0)
        # The last snapshot whose buckets and sum agreed (readers only): what a snapshot that found none gives.
        self.agreed: tuple[list[int], float] = (list(self.counts), 0.0)

    def observe(self, value: float) -> None:
        """Count one duration."""
        count, total, _ = self.totals
        self.totals = (count + 1, total + value, total)
        self.counts[bisect_left(self.bounds, value)] += 1

    @property
    def sum(self) -> float:
        """The durations' sum."""
        return self.totals[1]

    @property
    def count(self) -> int:
        """Durations counted."""
        return sum(self.counts)

    def snapshot(self) -> tuple[list[int], float]:
        """The bucket counts and the sum of the same values, read while the loop may be counting one: read
        separately, a scrape between the loop's two stores wrote a _sum of one value more or less than its
        _count and buckets."""
        for _ in range(READS):
            counts = list(self.counts)      # one copy: the buckets and the count agree
            count, total, before = self.totals
            counted = sum(counts)
            if count == counted + 1:        # the last value is in the sum, not yet in its bucket
                return self._agree(counts, before)
            if count <= counted:            # (fewer only for buckets set directly: no later values to wait for)
                return self._agree(counts, total)
            # The loop counted whole values between the two reads: read again.
        # Every read found the loop values on: the newest pair that agreed (older, never wrong). This read's buckets
        # with its sum wrote a _sum values past _count, and the next scrape's took the sum back (a counter reset).
        return self.agreed

    def _agree(self, counts: list[int], total: float) -> tuple[list[int], float]:
        """Keep a pair that agrees (the newest of those read) and return it."""
        if sum(counts) >= sum(self.agreed[0]):
            self.agreed = (counts, total)
        return counts, total
