"""A scraper is a connection: one that closed scrapes no more under its name, and the job's linger waits for it
no longer than MIN_ACTIVE_SECONDS (long enough for it to come back on a new connection).

Seen after a rank was frozen (SIGSTOP, SIGCONT): Prometheus had timed its scrape out and moved to a new
connection; the request left queued on the old one was answered after the freeze, which made the freeze
that connection's interval, and the final linger waited three such intervals for a scraper long gone.
"""

import http.client
import queue
import threading
import time
import urllib.request

from trainmetrics.metrics_http import SCRAPE_TIMEOUT_HEADER
from trainmetrics.trainer.metrics import JobMetrics
from trainmetrics.trainer.telemetry import MIN_ACTIVE_SECONDS, Publication, Publish, ScraperLog

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


class HeldRender:
    """Publication's render, held when armed until told to go on: a scrape whose scraper hangs up meanwhile."""

    def __init__(self, monkeypatch):
        self.armed, self.rendering, self.go_on = threading.Event(), threading.Event(), threading.Event()
        render = Publication._render

        def held(publication, scrape):
            if self.armed.is_set():
                self.rendering.set()
                self.go_on.wait(5)
            return render(publication, scrape)

        monkeypatch.setattr(Publication, "_render", held)


def closes_seen(monkeypatch) -> queue.Queue:
    """The names of the scrapers whose connection's close the job has seen, in turn."""
    seen, closed = queue.Queue(), ScraperLog.closed

    def noted(log, scraper: str) -> None:
        closed(log, scraper)
        seen.put(scraper)

    monkeypatch.setattr(ScraperLog, "closed", noted)
    return seen


def test_a_closed_connection_is_owed_a_read_from_its_close_only_when_it_closed_on_a_scrape_given_up(
        tmp_path, monkeypatch):
    """A scraper that gave a scrape up comes back on a new connection: owed the final state for MIN_ACTIVE_SECONDS
    from its connection's close (seen late by a job frozen past them). Owed so from every close, a connection left
    idle past its scraper's window and closed then (the idle timeout, an eviction, its client) was owed a read
    again: a client leaving a connection open per scrape, each evicted in turn by its next, held a job's final
    linger 9.9 s instead of 1.8 s (at 250 ms), to its timeout at 500 ms."""
    render, seen = HeldRender(monkeypatch), closes_seen(monkeypatch)
    metrics = JobMetrics("closes", publish=Publish(targets_dir=tmp_path, linger_timeout=0.2))
    idle, giving_up, live = (KeepAliveScraper(metrics.metrics_port) for _ in range(3))
    try:
        idle.scrape(), giving_up.scrape()
        metrics.start()
        time.sleep(MIN_ACTIVE_SECONDS + 0.3)       # both past their window: owed nothing now
        metrics.finish("completed")
        live.scrape()
        # (its delivery is noted after the answer is written: the scraper can have read it before)
        assert metrics._publication.scrapers.wait(metrics.final_state_read, 5)
        idle.close()
        seen.get(timeout=5)
        assert metrics.final_state_read()           # (owed a read again, before, for MIN_ACTIVE_SECONDS)
        render.armed.set()
        giving_up.connection.request("GET", "/metrics", headers=COUNTING)
        assert render.rendering.wait(5)
        giving_up.close()                           # its timeout ran out: it hangs up before the answer
        render.go_on.set()
        seen.get(timeout=5)
        assert not metrics.final_state_read()       # owed a read until it can have come back
    finally:
        render.go_on.set()
        idle.close(), giving_up.close(), live.close()
        metrics.close()
