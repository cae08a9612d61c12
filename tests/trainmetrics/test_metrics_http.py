"""The /metrics server reads requests as http.server does (the same answer, the connection kept or closed the same)
without its email parser for the headers; a scrape is counted from its header whatever its case."""

import http.server
import socket
import time

import pytest

from trainmetrics import metrics_http
from trainmetrics.metrics_http import SCRAPE_TIMEOUT_HEADER, MetricsHTTPServer

OK = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
REQUESTS = {
    "a scrape, kept alive": OK + b"\r\n",
    "HTTP/1.0 closes": b"GET /metrics HTTP/1.0\r\n\r\n",
    "HTTP/1.0 asking keep-alive": b"GET /metrics HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
    "Connection: close": OK + b"Connection: close\r\n\r\n",
    "the first of two Connection headers": OK + b"Connection: keep-alive\r\nConnection: close\r\n\r\n",
    "HTTP/0.9": b"GET /metrics\r\n\r\n",         # (http.server reads headers even then)
    "HTTP/0.9 POST": b"POST /metrics\r\n",
    "HTTP/2.0": b"GET /metrics HTTP/2.0\r\n\r\n",
    "a version that is not one": b"GET /metrics HTTP/1.x\r\n\r\n",
    "three version numbers": b"GET /metrics HTTP/1.1.1\r\n\r\n",
    "a non-ASCII digit": "GET /metrics HTTP/1.\u00b2\r\n\r\n".encode("iso-8859-1"),
    "a long version number": b"GET /metrics HTTP/1.12345678901\r\n\r\n",
    "four words": b"GET /metrics x HTTP/1.1\r\n\r\n",
    "one word": b"GET\r\n\r\n",
    "an empty line": b"\r\n",
    "a doubled slash": b"GET //metrics HTTP/1.1\r\n\r\n",
    "an unknown method": b"BREW /metrics HTTP/1.1\r\n\r\n",
    "HEAD": b"HEAD /metrics HTTP/1.1\r\n\r\n",
    "a header line too long": OK + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n",
    "99 headers": b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(99)) + b"\r\n",
    "100 headers": b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n",
    "Expect: 100-continue": OK + b"Expect: 100-continue\r\n\r\n",
    "a folded header": OK + b"X-Folded: a\r\n b\r\n\r\n",
    "bare newlines": b"GET /metrics HTTP/1.1\nHost: x\n\n",
    "the stream ends in the headers": OK,
}


class StandardHandler(metrics_http._Handler):
    """The same handler reading requests with http.server's own parse_request."""

    parse_request = http.server.BaseHTTPRequestHandler.parse_request


def answer(server: MetricsHTTPServer, request: bytes) -> tuple[str, bool]:
    """The status of the answer (for an error answered before the request's version was read, which http.server
    answers as to HTTP/0.9, the page alone: its error code) and whether the connection was kept open after it
    (a second request on it is answered)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection, \
            connection.makefile("rb") as reader:
        connection.sendall(request)
        if request == OK:
            connection.shutdown(socket.SHUT_WR)
        first = reader.readline()
        if not first:
            return "no answer", False
        if first.startswith(b"<!DOCTYPE"):
            return "page " + reader.read().split(b"Error code: ")[1][:3].decode(), False
        length = 0
        for line in iter(reader.readline, b"\r\n"):
            if not line:
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if not request.startswith(b"HEAD"):
            reader.read(length)
        try:
            connection.sendall(b"GET / HTTP/1.1\r\n\r\n")
            kept = reader.readline().startswith(b"HTTP/1.1")
        except OSError:
            kept = False
        return first.decode().rstrip("\r\n"), kept


@pytest.fixture
def servers():
    ours = MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n").serve_in_background()
    standard = MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n")
    standard.RequestHandlerClass = StandardHandler
    standard.serve_in_background()
    yield ours, standard
    ours.close()
    standard.close()


@pytest.mark.parametrize("name", REQUESTS)
def test_a_request_gets_http_servers_answer_and_the_connection_the_same_fate(servers, name):
    ours, standard = servers
    assert answer(ours, REQUESTS[name]) == answer(standard, REQUESTS[name])


def test_the_answers_are_the_ones_expected():
    """The differential test above would pass with two servers equally wrong: a few answers spelled out."""
    server = MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n").serve_in_background()
    try:
        assert answer(server, REQUESTS["a scrape, kept alive"]) == ("HTTP/1.1 200 OK", True)
        assert answer(server, REQUESTS["HTTP/1.0 closes"]) == ("HTTP/1.1 200 OK", False)
        assert answer(server, REQUESTS["Connection: close"]) == ("HTTP/1.1 200 OK", False)
        assert answer(server, REQUESTS["HTTP/2.0"]) == ("page 505", False)
        assert answer(server, REQUESTS["100 headers"])[0] == "HTTP/1.1 431 Too many headers"
        assert answer(server, REQUESTS["99 headers"])[0] == "HTTP/1.1 200 OK"
        assert answer(server, REQUESTS["a doubled slash"])[0] == "HTTP/1.1 200 OK"
    finally:
        server.close()


def test_a_scrape_counts_whatever_the_case_of_its_header_and_a_curl_does_not():
    delivered = []
    server = MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n", delivered=delivered.append)
    server.serve_in_background()
    try:
        for header in (SCRAPE_TIMEOUT_HEADER, SCRAPE_TIMEOUT_HEADER.lower(), None):
            extra = f"{header}: 0.2\r\n".encode() if header else b""
            assert answer(server, OK + extra + b"\r\n") == ("HTTP/1.1 200 OK", True)
        deadline = time.monotonic() + 5
        while len(delivered) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        server.close()
    assert [scrape.counting for scrape in delivered] == [True, True, False]


def test_headers_are_read_by_lower_case_name_the_first_of_a_repeat():
    import io
    headers = metrics_http.Headers.read(io.BytesIO(
        b"Authorization: Basic abc\r\nauthorization: Basic other\r\nX-Folded: a\r\n  b\r\nNot a header\r\n"
        b"Bad Name: x\r\n\r\nbody"))
    assert headers.get("AUTHORIZATION") == "Basic abc" and headers.get("x-folded") == "a b"
    assert headers.get("Bad Name") is None and headers.get("missing", "default") == "default"


def test_a_request_trickled_a_byte_at_a_time_is_cut_at_the_idle_timeout():
    """Each read waited the whole idle timeout afresh: a client sending a byte every few seconds held its
    connection, and its thread, for ever, and 32 of them refused every scrape. A request must now be whole within
    the idle timeout of the previous answer; a scraper's keep-alive connection is served as before."""
    server = MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n", idle_timeout=1.0).serve_in_background()
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as trickler:
            began, cut = time.monotonic(), None
            for byte in request * 3:
                try:
                    trickler.sendall(bytes([byte]))
                    time.sleep(0.3)
                    trickler.settimeout(0.001)
                    if trickler.recv(1) == b"":         # closed by the server
                        cut = time.monotonic() - began
                        break
                except TimeoutError:
                    continue
                except OSError:
                    cut = time.monotonic() - began
                    break
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as scraper:
            for _ in range(3):                          # whole requests, 0.5 s apart: 1.5 s on one connection
                scraper.sendall(request)
                assert scraper.recv(4096).startswith(b"HTTP/1.1 200 OK")
                time.sleep(0.5)
    finally:
        server.close()
    assert cut is not None and cut < 2.5, cut


def test_a_password_longer_than_bcrypt_takes_is_a_401():
    """bcrypt 5 raises past 72 bytes: the connection was dropped without an answer."""
    import base64

    import bcrypt

    from trainmetrics.webconfig import WebConfig

    config = WebConfig(users={"prometheus": bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=4))})
    server = MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n", web_config=config).serve_in_background()
    try:
        for password, status in ((b"x" * 73, b"401"), (b"right", b"200")):
            header = b"Authorization: Basic " + base64.b64encode(b"prometheus:" + password) + b"\r\n\r\n"
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
                connection.sendall(OK + header)
                assert connection.recv(4096).startswith(b"HTTP/1.1 " + status)
    finally:
        server.close()
