"""Reporting a job process's /metrics endpoint to the job server, for Prometheus' HTTP service discovery
across hosts (the job server lists every running job's endpoints at /api/training/sd).

The job server gives each run a URL and a secret (TRAINMETRICS_REGISTER_TOKEN, in the environment, never on
the command line). A failure is logged, never raised: the job trains on, only undiscovered.
"""

import http.client
import json
import logging
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request

from trainmetrics.contract import REGISTER_TOKEN_VARIABLE

log = logging.getLogger("trainmetrics.trainer")

TIMEOUT_SECONDS = 5.0           # each connect and each read
TOTAL_SECONDS = 15.0            # the whole exchange, the answer read to its end
MAX_ANSWER_BYTES = 64 << 10     # the job server answers ~100 bytes


class _Deadline:
    """Cuts an exchange's connections when its time is up. A socket's timeout is per read: a server answering a
    byte every few seconds (or headers without end) held the job at its start, or at its end, for as long as it
    kept sending. Each socket is watched through a duplicate: shutting that down cuts the connection it shares,
    and TLS, which takes the original socket over (detaching it), leaves the duplicate alone."""

    def __init__(self, seconds: float):
        self.passed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        try:
            self._timer.start()
        # No thread to be had: Python 3.12.0-3.12.1 start none in an exit hook, where JobMetrics withdraws a job
        # left open, and the RuntimeError stopped the job's release there. The exchange goes on, its reads timed.
        except RuntimeError:
            pass

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock.dup())
            if self.passed:
                _shut(self._sockets[-1])
        return sock

    def _cut(self) -> None:
        with self._lock:
            self.passed = True
            for sock in self._sockets:
                _shut(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:         # already closed by the other end
        pass


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib (proxies from the environment as before) with every connection watched by `deadline`, following
    no redirect."""

    def watched(connection_class: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        class Watched(connection_class):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                # http.client's connect() opens its socket through this attribute; TLS wraps it after.
                create = self._create_connection
                self._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))
        return Watched

    class Http(urllib.request.HTTPHandler):
        def do_open(self, http_class, request, **kwargs):
            return super().do_open(watched(http_class), request, **kwargs)

    class Https(urllib.request.HTTPSHandler):
        def do_open(self, http_class, request, **kwargs):
            return super().do_open(watched(http_class), request, **kwargs)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        # urllib follows a redirect with every header but the body's: the run's secret went to whatever URL a 302
        # named, as a GET whose 200 counted as a registration. The job server never redirects.
        def redirect_request(self, *args, **kwargs):
            return None

    return urllib.request.build_opener(Http, Https, NoRedirect)


class Registration:
    """This process's entry in the job server's service discovery."""

    def __init__(self, url: str, rank: int):
        self.url, self.rank = url, rank
        self.token = os.environ.get(REGISTER_TOKEN_VARIABLE, "")
        self.registered = False
        self.watched = False        # the job server says a scraper reads its service discovery

    def _send(self, method: str, body: dict | None = None) -> dict | None:
        query = "" if body is not None else "?" + urllib.parse.urlencode({"rank": self.rank})
        request = urllib.request.Request(self.url + query, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        deadline = _Deadline(TOTAL_SECONDS)
        try:
            with _opener(deadline).open(request, timeout=TIMEOUT_SECONDS) as response:
                answer = _answer(response)
            # A cut ends a body without a length (headers cut short have none) as its real end would: such an
            # answer, cut, is none. One with a length, or chunked, raised IncompleteRead where the cut came: read,
            # it is whole, even when the deadline passed since (the job server took it: a failure said here left
            # its entry never withdrawn, and a file_sd target too, scraped twice).
            if deadline.passed and response.length is None and not response.chunked:
                raise TimeoutError
            return answer
        # http.client's own errors too: a port that answers no HTTP (BadStatusLine) or an answer cut short
        # (IncompleteRead) raised out of JobMetrics(), and the job never started.
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
            if isinstance(error, urllib.error.HTTPError):
                error.close()       # its connection, still open for the body it holds
            said = f"no whole answer within {TOTAL_SECONDS:g} s" if deadline.passed else error
            log.warning("job endpoint %s at %s failed: %s", "registration" if body else "removal", self.url, said)
            return None
        finally:
            deadline.close()

    def register(self, address: str, scheme: str) -> bool:
        """Report host:port and scheme; True when the job server took them."""
        answer = self._send("POST", {"rank": self.rank, "address": address, "scheme": scheme})
        self.registered = answer is not None
        self.watched = bool(answer and answer.get("watched"))
        return self.registered

    def withdraw(self) -> None:
        """Remove the endpoint (after the final linger)."""
        if self.registered:
            self._send("DELETE")
            self.registered = False


def _answer(response: http.client.HTTPResponse) -> dict | None:
    """The job server's answer, read up to MAX_ANSWER_BYTES (ValueError past them: a body without end, or
    gigabytes, was read whole into the job's memory); None when it is no success."""
    data = response.read(MAX_ANSWER_BYTES + 1)
    if len(data) > MAX_ANSWER_BYTES:
        raise ValueError(f"an answer over {MAX_ANSWER_BYTES} bytes")
    answer = json.loads(data or b"{}") if 200 <= response.status < 300 else None
    return answer if isinstance(answer, dict) else {}
