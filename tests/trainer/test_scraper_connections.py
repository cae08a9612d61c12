"""A scraper is a connection: one that closed scrapes no more under its name, and the job's linger waits for it
no longer than MIN_ACTIVE_SECONDS (long enough for it to come back on a new connection).

Seen after a rank was frozen (SIGSTOP, SIGCONT): Prometheus had timed its scrape out and moved to a new
connection; the request left queued on the old one was answered after the freeze, which made the freeze
that connection's interval, and the final linger waited three such intervals for a scraper long gone.
"""

import http.client
import threading
import time
import urllib.request

from trainmetrics.metrics_http import SCRAPE_TIMEOUT_HEADER
from trainmetrics.trainer.metrics import JobMetrics
from trainmetrics.trainer.telemetry import MIN_ACTIVE_SECONDS, Publish

COUNTING = {SCRAPE_TIMEOUT_HEADER: "0.5"}      # (0.5 s: see test_metrics.Scraper)


class KeepAliveScraper:
    """Prometheus' way: one keep-alive connection, the scrape-timeout header on every GET."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def scrape(self) -> bytes:
        self.connection.request("GET", "/metrics", headers=COUNTING)
        return self.connection.getresponse().read()

    def close(self) -> None:
        self.connection.close()


def scrape_once(port: int) -> bytes:
    """A scraper without keep-alive: a connection per scrape (urllib closes it after the answer)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=COUNTING)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.read()


def linger_seconds(metrics: JobMetrics, scrape) -> float:
    """How long close() lingers while `scrape()` runs every 50 ms, as a live Prometheus would."""
    closer = threading.Thread(target=metrics.close)
    began = time.monotonic()
    closer.start()
    while closer.is_alive():
        scrape()
        closer.join(timeout=0.05)
    return time.monotonic() - began


def test_a_connection_answered_late_then_closed_does_not_hold_the_final_linger(tmp_path):
    metrics = JobMetrics("late-answer", publish=Publish(targets_dir=tmp_path, linger_timeout=10))
    live, stale = KeepAliveScraper(metrics.metrics_port), KeepAliveScraper(metrics.metrics_port)
    try:
        live.scrape(), stale.scrape()
        metrics.start()
        # The process frozen for a while: the request queued on the stale connection is answered late (its
        # interval becomes the freeze), and its scraper, which had long moved on, closes it.
        time.sleep(MIN_ACTIVE_SECONDS * 1.5)
        live.scrape(), stale.scrape()
        stale.close()
        metrics.finish("completed")
        # At most the closed connection's last MIN_ACTIVE_SECONDS (it waited three freezes, 9 s, before).
        assert linger_seconds(metrics, live.scrape) < MIN_ACTIVE_SECONDS + 0.5
    finally:
        live.close(), stale.close()


def test_an_ha_replica_reconnecting_at_the_end_still_reads_the_final_state(tmp_path):
    """One Prometheus of an HA pair whose connection closed near the end comes back on a new connection: the
    linger waits for it (a closed connection stays owed a read for MIN_ACTIVE_SECONDS), not only for the
    replica that kept its connection."""
    metrics = JobMetrics("ha-pair", publish=Publish(targets_dir=tmp_path, linger_timeout=10))
    steady, replica = KeepAliveScraper(metrics.metrics_port), KeepAliveScraper(metrics.metrics_port)
    back = None
    try:
        steady.scrape(), replica.scrape()
        metrics.start()
        steady.scrape(), replica.scrape()
        replica.close()
        metrics.finish("completed")
        ended = metrics._end_monotonic
        reread = []

        def both():
            nonlocal back
            steady.scrape()
            if back is None and time.monotonic() - ended > 0.5:
                back = KeepAliveScraper(metrics.metrics_port)
            if back is not None and not reread:
                back.scrape()
                reread.append(time.monotonic())

        closer = threading.Thread(target=metrics.close)
        closer.start()
        while closer.is_alive():
            both()
            closer.join(timeout=0.05)
        assert reread, "the linger ended before the replica read the final state again"
    finally:
        steady.close(), replica.close()
        if back is not None:
            back.close()


def test_scrapers_without_keep_alive_end_the_linger_at_their_first_scrape_after_the_end(tmp_path):
    metrics = JobMetrics("no-keep-alive", publish=Publish(targets_dir=tmp_path, linger_timeout=10))
    port = metrics.metrics_port
    starter = threading.Thread(target=metrics.start)
    starter.start()
    while starter.is_alive():          # its first scrape ends start()'s wait, its connection closed at once
        scrape_once(port)
        starter.join(timeout=0.05)
    metrics.finish("completed")
    # Each scrape's connection closes after it: owed a read for MIN_ACTIVE_SECONDS at most, which the first
    # scrape after the end pays for all of them (from the same client).
    assert linger_seconds(metrics, lambda: scrape_once(port)) < MIN_ACTIVE_SECONDS + 0.5
