"""What a scraper slower than MIN_ACTIVE_SECONDS, or one that timed a scrape out, is shown of a job: the final
state and every evaluation (docs/metrics.md: "held until every scraper has read it", "every one")."""

import subprocess
import sys
import threading
import time

from trainmetrics.metrics_http import SCRAPE_TIMEOUT_HEADER
from trainmetrics.trainer.evaluations import SLOTS
from trainmetrics.trainer.metrics import JobMetrics
from trainmetrics.trainer.telemetry import Publish

from .test_metrics import Scraper


def test_a_slow_scraper_reads_the_final_state_before_its_second_scrape(tmp_path):
    """A second Prometheus scraping every 5 s (timeout 4 s) has scraped the job once when the job ends 2.5 s later:
    with no interval measured yet it counted as gone after 2 s, the linger ended at the fast scraper's read and the
    slow one never read the end ("the final state is held until every scraper has read it")."""
    metrics = JobMetrics("slow-scraper", publish=Publish(targets_dir=tmp_path, linger_timeout=15))
    fast, slow = Scraper(metrics.metrics_port), Scraper(metrics.metrics_port)
    slow.headers = {SCRAPE_TIMEOUT_HEADER: "4"}
    fast.scrape()
    slow_first = time.monotonic()
    slow.scrape()
    metrics.start()
    stop = threading.Event()

    def fast_loop():
        while not stop.is_set():
            try:
                fast.scrape()
            except OSError:
                return
            time.sleep(0.25)

    scraping = threading.Thread(target=fast_loop)
    scraping.start()
    closer = threading.Thread(target=metrics.close)
    try:
        time.sleep(2.5)
        metrics.finish("completed")
        closer.start()
        time.sleep(max(0.0, slow_first + 5.0 - time.monotonic()))
        found = slow.scrape()
        assert [s.labels["state"] for s in found["trainer_job_state"] if s.value == 1] == ["completed"]
    finally:
        stop.set()
        scraping.join()
        if closer.is_alive() or not metrics.ended:
            closer.join(timeout=20)
        fast.close(), slow.close()
    assert not closer.is_alive()


def test_a_slow_scraper_is_shown_every_evaluation_between_its_first_two_scrapes(tmp_path, monkeypatch):
    """The same slow scraper: gone after 2 s in the evaluation history's eyes, the evaluations it had not read yet
    were dropped once the fast one had them (LATE_SCRAPER_SECONDS after they came: 1 s here, 30 s in a job), and
    its second scrape began after the newest: 9 to 12 of 20 never reached it."""
    from trainmetrics.trainer import evaluations

    monkeypatch.setattr(evaluations, "LATE_SCRAPER_SECONDS", 1.0)
    metrics = JobMetrics("slow-scraper-evals", publish=Publish(targets_dir=tmp_path, linger_timeout=15), log_every=1)
    fast, slow = Scraper(metrics.metrics_port), Scraper(metrics.metrics_port)
    slow.headers = {SCRAPE_TIMEOUT_HEADER: "4"}
    fast.scrape()
    metrics.start()
    for step in range(1, 21):
        metrics.step(samples=1)
        metrics.eval(loss=1.0 / step)
    seen = set()

    def indices(found):
        return {int(s.value) for s in found.get("trainer_eval_history_index", [])}

    for _ in range(3):
        fast.scrape()
    seen |= indices(slow.scrape())
    deadline = time.monotonic() + 3.0        # the fast one scrapes on; the slow one comes back 5 s later
    while time.monotonic() < deadline:
        fast.scrape()
        time.sleep(0.25)
    for _ in range(3):
        seen |= indices(slow.scrape())
    metrics.finish("completed")
    closer = threading.Thread(target=metrics.close)
    closer.start()
    fast.scrape(), slow.scrape()
    closer.join(timeout=20)
    fast.close(), slow.close()
    assert sorted(seen) == list(range(1, 2 * SLOTS + 5))


def test_an_answer_its_scraper_timed_out_on_is_not_the_final_state_read(tmp_path):
    """Prometheus gives a scrape its timeout (its header: 0.2 s in deploy/) and drops an answer that comes later,
    then scrapes again on a new connection. The job still counted the late answer as read once it was written (into
    the closed connection's buffer): the linger ended on it, and the scraper never read the end."""
    import http.client

    metrics = JobMetrics("late-answer", publish=Publish(targets_dir=tmp_path, linger_timeout=10))
    port = metrics.metrics_port
    first = Scraper(port)
    first.headers = {SCRAPE_TIMEOUT_HEADER: "0.2"}      # as deploy/prometheus asks
    first.scrape()
    metrics.start()
    metrics.finish("completed")
    closer = threading.Thread(target=metrics.close)
    lock = metrics._publication._render_lock
    lock.acquire()                          # the render is late (the GIL held elsewhere: a pickle, a C call)
    try:
        closer.start()
        first.connection.sock.settimeout(0.2)
        try:
            first.scrape()
            raise AssertionError("the scrape was not late")
        except TimeoutError:
            first.close()                   # Prometheus gives the scrape up and closes its connection
        time.sleep(0.1)
    finally:
        lock.release()                      # the late answer is written into the closed connection
    time.sleep(0.15)                        # Prometheus' next scrape, 250 ms on, on a new connection
    second = Scraper(port)
    try:
        found = second.scrape()
    except (ConnectionError, http.client.HTTPException) as error:
        raise AssertionError(f"the job was gone before the scraper read its end: {error!r}") from None
    finally:
        closer.join(timeout=20)
        second.close()
    assert [s.labels["state"] for s in found["trainer_job_state"] if s.value == 1] == ["completed"]


# Runs `trainmetrics train`, noting every module imported once the job's endpoint serves (the "import" audit event
# comes for a module not yet imported).
IMPORTS_WHILE_SERVING = """
import runpy, sys
from trainmetrics import metrics_http
serving, late = [], []
serve = metrics_http.MetricsHTTPServer.serve_in_background
def noted(server, *args, **kwargs):
    serving.append(True)
    return serve(server, *args, **kwargs)
metrics_http.MetricsHTTPServer.serve_in_background = noted
sys.addaudithook(lambda event, args: late.append(args[0]) if event == "import" and serving else None)
sys.argv = ["trainmetrics", *sys.argv[1:]]
try:
    runpy.run_module("trainmetrics", run_name="__main__")
finally:
    print("imported while serving:", *sorted(set(late)))
"""


def test_a_job_imports_nothing_heavy_once_its_endpoint_serves(tmp_path):
    """The optimizer's constructor imported torch._dynamo (sympy, onnx and all: 1-1.5 s holding the GIL) after the
    job's endpoint served: every job's scrapes of its start timed out through it, Prometheus's series of it went
    stale, and on a busy host the answers to those abandoned scrapes came late enough to look read."""
    result = subprocess.run([sys.executable, "-c", IMPORTS_WHILE_SERVING, "train", "--dataset", "blobs",
                             "--epochs", "1", "--metrics-listen", "127.0.0.1:0", "--linger-timeout", "0",
                             "--job-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    late = result.stdout.split("imported while serving:")[1].split()
    assert "trainmetrics.trainer.runner" not in late        # (the probe saw the endpoint start before the loop)
    heavy = [name for name in late if name.split(".")[0] == "sympy" or name.startswith(("torch._dynamo", "torch.onnx"))]
    assert heavy == [], heavy
