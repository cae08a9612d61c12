"""The VictoriaMetrics the tests start answers a range query's newest points from what it stores, as
Prometheus does: the tests compare the two backends' answers point by point."""

import time
import urllib.request

from trainmetrics.prometheus_process import VictoriaMetricsServer


def test_the_newest_points_of_a_range_query_are_not_held_back(tmp_path):
    """VictoriaMetrics replaces the points of a range query within -search.latencyOffset of its clock by the
    point before them (its guard against samples still arriving), for steps under
    -search.maxStepForPointsAdjustment; 1.79 keeps at least one second of that offset whatever the flag
    says. Seen in CI: the fleet summary's newest running-jobs point 4 here, 3 on Prometheus."""
    victoria = VictoriaMetricsServer(tmp_path).start()
    try:
        # One sample every 100 ms from 10 s ago to 30 s ahead, each holding its own time in ms.
        now_ms = int(time.time() * 1000)
        times = range(now_ms - 10_000, now_ms + 30_000, 100)
        body = "".join(f"clock_ms {t} {t}\n" for t in times).encode()
        urllib.request.urlopen(urllib.request.Request(f"{victoria.url}/api/v1/import/prometheus", data=body),
                               timeout=10).close()
        # Stored within a second; a search before then keeps finding nothing for seconds more (1.79 caches
        # the miss), so the first look waits that second.
        time.sleep(1.1)
        deadline = time.monotonic() + 20
        while [s["value"][1] for s in victoria.query("count_over_time(clock_ms[1m])", times[-1] / 1000)] != \
                [str(len(times))]:
            assert time.monotonic() < deadline, "the samples were not all stored within 20 s"
            time.sleep(0.1)

        end = time.time()   # the grid's last point lies within the second before VictoriaMetrics' clock
        points = victoria.query_range("max_over_time(clock_ms[1s])", end - 5, end, 1)[0]["values"]
        assert len(points) == 6 and end < times[-1] / 1000, points
        for at, value in points:
            newest_sample = max(t for t in times if t <= round(float(at) * 1000))
            assert float(value) == newest_sample, (at, points)
    finally:
        victoria.stop()


def test_the_summary_and_job_list_answer_over_the_longest_range(tmp_path):
    """The summary's check of where the recorded series cover the range read a point a minute over all of it:
    past ~20.8 days that is over VictoriaMetrics' 30,000 points a series, and every range from 21d to the 90d
    the API takes was a 502 (Prometheus answered)."""
    from tests.analytics.conftest import serve
    from trainmetrics.analytics.app import Settings

    victoria = VictoriaMetricsServer(tmp_path / "victoria").start()
    try:
        with serve(Settings(prometheus_url=victoria.url)) as client:
            for path in ("/api/training/analytics/summary", "/api/training/analytics/jobs"):
                for span in ("21d", "90d"):
                    response = client.get(path, params={"range": span})
                    assert response.status_code == 200, (path, span, response.text)
    finally:
        victoria.stop()
