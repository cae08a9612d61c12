"""Reverse proxies in front of a real Prometheus, for tests: what the services ask of it, its failures, and
backends that answer otherwise (Relay)."""

import contextlib
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from trainmetrics.analytics.queries import HUNG_JOBS


class Relay:
    """A reverse proxy before a real Prometheus on a free loopback port (`url`; TLS with `tls`), serving while
    `running()`. Every request goes through relay(), which a subclass overrides to answer in Prometheus' place or
    to alter its answer (forward() gets it)."""

    def __init__(self, upstream: str, tls: ssl.SSLContext | None = None):
        self.upstream = upstream
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status, kind, content = relay.relay(self.command, self.path, self.headers, body)
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"

    def relay(self, method: str, path: str, headers, body: bytes) -> tuple[int, str, bytes]:
        """The answer to a request: status, content type, content (Prometheus' own here)."""
        return self.forward(method, path, headers, body)

    def forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, str, bytes]:
        answer = httpx.request(method, self.upstream + path, content=body, timeout=10,
                               headers={"content-type": headers.get("content-type", "")})
        return answer.status_code, answer.headers.get("content-type", "text/plain"), answer.content

    @contextlib.contextmanager
    def running(self):
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


class CapturingProxy:
    """A reverse proxy in front of the real Prometheus that records every request the services send it
    (path and every query/form parameter), so tests can prove what user text ever reached Prometheus. While
    `failing_ranges` is set it answers every range query 503 (a Prometheus that answers the cheap lookups but not
    a job's figures: overloaded, timing out on the large ones)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.lock = threading.Lock()
        self.failing_ranges = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self, body: bytes | None):
                parsed = urllib.parse.urlsplit(self.path)
                params = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
                if body:
                    for key, values in urllib.parse.parse_qs(body.decode("latin-1"), keep_blank_values=True).items():
                        params.setdefault(key, []).extend(values)
                if params.get("query") != [HUNG_JOBS]:    # the job server's constant poll: no input of anyone's
                    with proxy.lock:
                        proxy.requests.append((parsed.path, params))
                request = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command,
                                                 headers={k: v for k, v in self.headers.items()
                                                          if k.lower() in ("content-type", "accept")})
                if proxy.failing_ranges.is_set() and parsed.path == "/api/v1/query_range":
                    status, headers, payload = 503, {"Content-Type": "text/plain"}, b"Service Unavailable"
                else:
                    status, headers, payload = _forwarded(request)
                self.send_response(status)
                for key in ("Content-Type", "Retry-After"):
                    if headers.get(key):
                        self.send_header(key, headers[key])
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self.forward(None)

            def do_POST(self):
                self.forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def values(self) -> list[str]:
        """Every parameter value sent to Prometheus (PromQL, times, steps)."""
        with self.lock:
            return [value for _, params in self.requests for values in params.values() for value in values]

    def queries(self) -> list[str]:
        with self.lock:
            return [q for _, params in self.requests for q in params.get("query", [])]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _forwarded(request: urllib.request.Request) -> tuple[int, dict, bytes]:
    """Prometheus' answer to the request: status, headers, body (502 when it cannot be reached)."""
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()
    except OSError:
        return 502, {}, b"proxy: upstream unreachable"
