"""Registering a job's /metrics with the job server (trainer/registration.py) against a real socket whose answers
are not what a job server sends: a failure is said, never raised, and the job trains and ends as usual."""

import logging
import socket
import subprocess
import sys
import threading
import time

import pytest

from trainmetrics.trainer import registration

from trainmetrics.trainer.metrics import JobMetrics
from trainmetrics.trainer.telemetry import Publish

REGISTERED = (b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 18\r\n\r\n"
              b'{"watched": false}')
NOT_HTTP = b"-ERR unknown command 'POST'\r\n"            # a port that is no job server's (Redis here)
CUT_SHORT = b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n{\"wat"     # a proxy that dropped the answer


def serve(answers: dict[str, bytes], requests: list[bytes] | None = None) -> socket.socket:
    """A listening socket answering each request with the bytes given for its method, then closing; each
    request's first bytes go to `requests` when given."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def answer_all():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:         # closed: the test is over
                return
            with connection:
                request = connection.recv(65536)
                if requests is not None:
                    requests.append(request)
                connection.sendall(answers[request.split(b" ", 1)[0].decode()])

    threading.Thread(target=answer_all, daemon=True).start()
    return listener


def endpoints_url(listener: socket.socket, job_id: str = "reg-1") -> str:
    """The job server's endpoints route of a job, as a stand-in listening at `listener` serves it."""
    return f"http://127.0.0.1:{listener.getsockname()[1]}/api/internal/jobs/{job_id}/endpoints"


def register_at(listener: socket.socket) -> bool:
    """A rank 0's registration with the stand-in at `listener` (closed after): whether the job server took it."""
    try:
        return registration.Registration(endpoints_url(listener), 0).register("127.0.0.1:9", "http")
    finally:
        listener.close()


@pytest.mark.parametrize("answers", [{"POST": NOT_HTTP}, {"POST": CUT_SHORT},
                                     {"POST": REGISTERED, "DELETE": NOT_HTTP}],
                         ids=["registration-not-http", "registration-cut-short", "withdrawal-not-http"])
def test_an_answer_that_is_no_http_or_is_cut_short_is_said_and_the_job_trains_and_ends(answers, caplog):
    """http.client's own errors (BadStatusLine, IncompleteRead) are no OSError: raised out of the registration,
    JobMetrics() raised and the job never started; raised out of the withdrawal, the job's end stopped there, its
    /metrics still served, its claim on its files held and its last OTLP push never sent."""
    listener = serve(answers)
    url = endpoints_url(listener)
    try:
        with caplog.at_level(logging.WARNING, logger="trainmetrics.trainer"):
            metrics = JobMetrics("reg-1", publish=Publish(register_url=url, targets_dir=None, job_dir=None))
            with metrics:
                metrics.step(loss=0.5, samples=8)
    finally:
        listener.close()
    assert metrics.state == "completed" and metrics.metrics_port is None     # ended, and no longer served
    said = [record.getMessage() for record in caplog.records if "job endpoint" in record.getMessage()]
    assert len(said) == 1 and url in said[0], said


def serve_once(answer) -> tuple[socket.socket, dict]:
    """A listening socket whose first connection gets `answer(connection)`; the dict says what the answer
    managed to send before the job closed the connection, and whether it ran out first."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    seen = {"sent": 0, "ran_out": False}

    def answer_one():
        try:
            connection, _ = listener.accept()
        except OSError:         # closed, never asked: the test is over
            return
        with connection:
            connection.recv(65536)
            try:
                answer(connection, seen)
                seen["ran_out"] = True
            except OSError:         # the job cut the connection
                pass

    threading.Thread(target=answer_one, daemon=True).start()
    return listener, seen


def trickle(connection: socket.socket, seen: dict) -> None:
    """Headers that never end, a byte every 50 ms for up to 30 s."""
    connection.sendall(b"HTTP/1.1 201 Created\r\nX-Slow: ")
    for _ in range(600):
        connection.sendall(b"a")
        seen["sent"] += 1
        time.sleep(0.05)


def flood(connection: socket.socket, seen: dict) -> None:
    """A 201 whose body is 64 MiB."""
    connection.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                       % (64 << 20))
    chunk = b" " * (64 << 10)
    for _ in range(1024):
        connection.sendall(chunk)
        seen["sent"] += len(chunk)


def test_a_job_server_trickling_its_answer_is_given_up_on_at_the_registrations_deadline(monkeypatch, caplog):
    """The timeout was per read: headers coming a byte every 50 ms never timed out, and the job waited at its
    start for as long as the server kept sending (here 30 s, for ever for a server that never stops)."""
    monkeypatch.setattr(registration, "TOTAL_SECONDS", 1.0)
    listener, seen = serve_once(trickle)
    with caplog.at_level(logging.WARNING, logger="trainmetrics.trainer"):
        assert not register_at(listener)
    assert not seen["ran_out"] and seen["sent"] > 0, seen
    assert any("no whole answer within 1 s" in record.getMessage() for record in caplog.records)


def test_a_job_server_answering_a_huge_body_is_not_read_whole_into_the_jobs_memory(caplog):
    """The answer was read whole (response.read()): a body of gigabytes, or one without end, took the job's
    memory at its start. Now at most MAX_ANSWER_BYTES are read, and the connection is closed."""
    listener, seen = serve_once(flood)
    with caplog.at_level(logging.WARNING, logger="trainmetrics.trainer"):
        assert not register_at(listener)
    deadline = time.monotonic() + 30
    while not seen["ran_out"] and time.monotonic() < deadline and seen["sent"] < (64 << 20):
        previous = seen["sent"]
        time.sleep(0.5)
        if seen["sent"] == previous:
            break
    assert not seen["ran_out"], seen
    assert any("over 65536 bytes" in record.getMessage() for record in caplog.records)


def test_a_redirect_is_not_followed_and_the_runs_secret_goes_nowhere_else(monkeypatch, caplog):
    """urllib followed a 302 with every header but the body's: the run's secret went, as a GET, to the host the
    redirect named, and that host's 200 counted as the job's registration."""
    monkeypatch.setenv("TRAINMETRICS_REGISTER_TOKEN", "run-secret")
    elsewhere, asked = serve_once(lambda connection, seen: connection.sendall(REGISTERED))
    moved = (b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\nLocation: http://127.0.0.1:%d/steal\r\n\r\n"
             % elsewhere.getsockname()[1])
    listener = serve({"POST": moved})
    try:
        with caplog.at_level(logging.WARNING, logger="trainmetrics.trainer"):
            assert not register_at(listener)
    finally:
        elsewhere.close()
    assert not asked["ran_out"], "the redirect was followed"
    assert any("302" in record.getMessage() for record in caplog.records)


def test_an_answer_read_whole_before_the_deadline_passes_is_a_registration(monkeypatch):
    """The deadline passing between the answer's last byte and the check after it (a job server answering near
    the end of the 15 s) turned a registration the job server had taken into a failure: the job never withdrew
    its entry, and wrote its file_sd target too (the job scraped twice). Here the cut comes right after the read."""
    monkeypatch.setattr(registration, "TOTAL_SECONDS", 0.2)
    cut = threading.Event()
    real_cut, real_answer = registration._Deadline._cut, registration._answer
    monkeypatch.setattr(registration._Deadline, "_cut", lambda deadline: (real_cut(deadline), cut.set()))
    monkeypatch.setattr(registration, "_answer", lambda response: (real_answer(response), cut.wait(30))[0])
    listener = serve({"POST": REGISTERED})
    assert register_at(listener)
    assert cut.is_set()


EXIT_WITHOUT_THREADS = """
import atexit, sys, threading
from trainmetrics.trainer.metrics import JobMetrics
from trainmetrics.trainer.telemetry import Publish

def no_threads(thread):     # as Python 3.12.0-3.12.1 answer in an exit hook
    raise RuntimeError("can't create new thread at interpreter shutdown")

metrics = JobMetrics("reg-exit", publish=Publish(register_url=sys.argv[1], targets_dir=None, job_dir=None,
                                                 linger_timeout=0))
metrics.start()
metrics.step(loss=0.5, samples=8)
# Exit hooks run last registered first: threads are refused before JobMetrics closes the job left open.
atexit.register(lambda: setattr(threading.Thread, "start", no_threads))
"""


def test_a_job_left_open_is_withdrawn_at_exit_where_no_thread_can_start(tmp_path):
    """The exchange's deadline starts a thread: Python 3.12.0-3.12.1 refuse one in an exit hook, and the
    RuntimeError came out of the withdrawal of a job left open: its entry stayed in the job server's service
    discovery, and the rest of its release (its /metrics, its claims, its last OTLP push) never ran."""
    requests: list[bytes] = []
    answers = {"POST": REGISTERED, "DELETE": b"HTTP/1.1 204 No Content\r\n\r\n"}
    listener = serve(answers, requests)
    url = endpoints_url(listener, "reg-exit")
    try:
        ended = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_THREADS, url], capture_output=True, text=True,
                               timeout=120)
    finally:
        listener.close()
    assert ended.returncode == 0 and "Traceback" not in ended.stderr, ended.stderr
    assert [request.split(b" ", 1)[0] for request in requests] == [b"POST", b"DELETE"], requests
