"""The sliding window behind every *_peak_* series and the mean utilisation gauges."""

import pytest

from trainmetrics.exporters.window import SampleWindow


def test_mean_and_peak_cover_exactly_the_window():
    window = SampleWindow(1.0)
    assert (window.mean(), window.peak(), window.latest()) == (None, None, None)
    for now, value in ((0.0, 5.0), (0.5, 1.0), (0.9, 3.0)):
        window.add(now, value)
    assert (window.mean(), window.peak(), window.latest()) == (3.0, 5.0, 3.0)
    window.add(1.0, 2.0)  # the sample at 0.0 is now exactly 1 s old: out
    assert (window.peak(), window.mean(), len(window)) == (3.0, 2.0, 3)
    window.add(2.5, 0.5)
    assert (window.peak(), window.mean(), len(window)) == (0.5, 0.5, 1)


def test_rejects_empty_window():
    with pytest.raises(ValueError):
        SampleWindow(0)


def test_every_scrape_sees_a_short_spike_the_mean_and_latest_value_hide():
    """Samples every 100 ms, a 200 ms spike between two 250 ms scrapes, a 1 s window."""
    spike = (1.05, 1.25)
    peaks, latest = [], []
    window = SampleWindow(1.0)
    scrapes = [0.25 * k + 0.08 for k in range(16)]  # 1.08 and 1.33 straddle the spike
    samples = [k * 0.1 for k in range(40)]
    events = sorted([(t, "sample") for t in samples] + [(t, "scrape") for t in scrapes])
    for now, kind in events:
        if kind == "sample":
            window.add(now, 1.0 if spike[0] <= now < spike[1] else 0.1)
        else:
            peaks.append((now, window.peak()))
            latest.append((now, window.latest()))
    seen_by_peak = [now for now, value in peaks if value == 1.0]
    assert len(seen_by_peak) >= 3  # several consecutive scrapes: no scraper steals it from another
    assert all(value < 1.0 for _, value in latest)  # a scrape of the plain gauge misses it here


def test_the_mean_of_a_full_or_idle_window_is_exactly_its_value_after_hours_of_samples():
    """The running sum drifted by rounding: after 5 minutes of ordinary load a window of samples all 1.0 had a
    mean of 1.0000000000000022 and one all 0.0 of 2.3e-15 (a CPU ratio outside 0-1)."""
    import random

    generator = random.Random(1)
    window, now = SampleWindow(1.0), 0.0
    for _ in range(3000):
        now += 0.1
        window.add(now, generator.random())
    for value in (1.0, 0.0):
        for _ in range(10):
            now += 0.1
            window.add(now, value)
        assert window.mean() == value
