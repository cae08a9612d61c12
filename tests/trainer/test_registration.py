"""Registering a job's /metrics with the job server (trainer/registration.py) against a real socket whose answers
are not what a job server sends: a failure is said, never raised, and the job trains and ends as usual."""

import logging
import socket
import threading

import pytest

from trainmetrics.trainer.metrics import JobMetrics
from trainmetrics.trainer.telemetry import Publish

REGISTERED = (b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 18\r\n\r\n"
              b'{"watched": false}')
NOT_HTTP = b"-ERR unknown command 'POST'\r\n"            # a port that is no job server's (Redis here)
CUT_SHORT = b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n{\"wat"     # a proxy that dropped the answer


def serve(answers: dict[str, bytes]) -> socket.socket:
    """A listening socket answering each request with the bytes given for its method, then closing."""
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
                connection.sendall(answers[request.split(b" ", 1)[0].decode()])

    threading.Thread(target=answer_all, daemon=True).start()
    return listener


@pytest.mark.parametrize("answers", [{"POST": NOT_HTTP}, {"POST": CUT_SHORT},
                                     {"POST": REGISTERED, "DELETE": NOT_HTTP}],
                         ids=["registration-not-http", "registration-cut-short", "withdrawal-not-http"])
def test_an_answer_that_is_no_http_or_is_cut_short_is_said_and_the_job_trains_and_ends(answers, caplog):
    """http.client's own errors (BadStatusLine, IncompleteRead) are no OSError: raised out of the registration,
    JobMetrics() raised and the job never started; raised out of the withdrawal, the job's end stopped there, its
    /metrics still served, its claim on its files held and its last OTLP push never sent."""
    listener = serve(answers)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/api/internal/jobs/reg-1/endpoints"
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
