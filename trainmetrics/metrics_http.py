"""The HTTP server behind every trainmetrics /metrics endpoint (the node exporter's and each job's).

- HTTP/1.1 with keep-alive: a Prometheus-compatible scraper (Prometheus, vmagent, the OpenTelemetry
  Collector) keeps one connection per target open, so the connection tells one scraper from another; its
  end is reported (`closed`): a scraper that comes back does so on a new connection.
- A scrape counts only when it comes from such a scraper: it sends `X-Prometheus-Scrape-Timeout-Seconds`.
  A `curl` or a health check reads the same text but never counts (the job's linger waits for scrapers).
- Bounded: at most `max_connections` connections (one thread each). A connection idle for `idle_timeout`
  (half-open, a slow client, a stalled TLS handshake) is closed, and so is one whose next request is not whole
  within `idle_timeout` of the previous answer (a byte every few seconds kept a slot for ever: 32 such clients
  refused every scrape). A request's headers are at most MAX_HEADER_BYTES together (431).
- With every slot taken, a new connection takes the slot of the one that has kept the server waiting longest
  (for its next request, the rest of one, or to take its answer): a client sending a request on each of 32
  connections every 29 s refused every scrape, the job's final one included. A connection whose request the
  server is working on is never cut; a newcomer is closed at once only when every connection is such. One whose
  next request sits unread in the kernel (its thread has yet to run on a busy host) is cut last.
- Paced: requests are answered (/metrics rendered) at most MAX_RENDERS_PER_SECOND times a second (in bursts of
  RENDER_BURST), whatever their path; a request beyond waits its turn asleep, a scraper's before the others'. A
  flood of requests on kept-alive connections took the GIL from the training loop. One whose client hangs up
  (closes its side) while it waits is not answered and takes no turn: it was rendered for nobody.
- A 401 closes its connection: without the password a client has nothing more to ask on it.
- TLS and basic auth from a web-config file (trainmetrics.webconfig). A header checked once is known from then on
  (a scraper's costs one bcrypt check); at most one header not yet known is checked at a time (and one more from an
  address that failed no check in a minute: a flood from many addresses kept a new password out), after a failed
  check an address gets no other for a second, and a header not checked for either is answered 503 at once
  (40 clients sending a new wrong password each kept every slot checking and both cores busy: scrapes refused).
"""

import fcntl
import http.client
import io
import logging
import selectors
import socket
import ssl
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from trainmetrics.webconfig import FAILED_CHECK_BACKOFF, PasswordChecks, WebConfig

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_IDLE_TIMEOUT = 30.0
# http.client's bounds on a request's header lines: their length and how many.
MAX_HEADER_LINE = 65536
MAX_HEADERS = 100
# And on all of them together (a scrape's are a few hundred bytes): the two bounds alone let a request's headers be
# 6.4 MB, held by its connection until the idle timeout, and one client on every connection grew the process 205 MiB.
MAX_HEADER_BYTES = 65536
# The longest scrape timeout taken from a scraper's header (Prometheus: at most its scrape interval).
MAX_SCRAPE_TIMEOUT = 600.0
# Requests are answered (/metrics rendered) at most this often, in bursts of up to RENDER_BURST: a request beyond
# waits its turn asleep (no CPU, no GIL), then is answered afresh. A scraper asks 4 times a second (two of them in an
# HA pair, 8) and never waits but behind a flood (its request goes first: one turn); 8 clients asking on kept-alive
# connections as fast as they were answered had ~4,300 renders a second made, and the GIL those took ran a job's
# training loop at 0.11 of its speed (bench/metrics_flood.py: 0.975 paced).
MAX_RENDERS_PER_SECOND = 20.0
RENDER_BURST = 4
# An answer written within this fraction of its scraper's timeout (by our clock) counts as taken at once; a later one
# only once its scraper kept the connection open past the timeout and CLOSE_TRAVEL_SECONDS more (the time a close
# takes to reach us). See _Handler._reached_its_scraper.
CERTAIN_FRACTION = 0.5
CLOSE_TRAVEL_SECONDS = 0.1


def _unread_bytes(connection: socket.socket) -> int:
    """How many bytes the kernel holds for the connection, not yet read by its thread (FIONREAD: never blocks;
    a TLS connection's are its records); 0 for one already closed."""
    try:
        return struct.unpack("i", fcntl.ioctl(connection.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    except (OSError, ValueError):
        return 0


def _kept_open_until(connection: socket.socket, moment: float) -> tuple[bool, bytes]:
    """Whether the client kept the connection open until `moment` or sent its next request on it before, and the
    bytes of that request read to tell (over TLS: they are the request's reader's). A close is read as a read's end
    (a plain connection's bytes peeked at, left in the kernel; over TLS its records read, a close_notify the end):
    bytes on the connection alone cannot tell a TLS close_notify from a request. Read from the kernel's TCP state
    instead, a TLS connection's next request waited past `moment` (Prometheus's next scrape held up to 0.15 s of
    its 0.2 s, timed from after the wait, and cut when it gave up: the answer it took counted none), and a system
    without Linux's TCP_INFO (macOS, FreeBSD's states) had every answer past half its timeout count none.
    A `moment` already past is looked at once, without waiting: whether the client is still there now."""
    tls = isinstance(connection, ssl.SSLSocket)
    with selectors.DefaultSelector() as selector:
        selector.register(connection, selectors.EVENT_READ)
        while True:
            left = max(moment - time.monotonic(), 0.0)
            if not selector.select(left):
                if not left:
                    return True, b""
                continue
            if tls:
                timeout = connection.gettimeout()
                connection.settimeout(left)         # (a record that never comes whole: kept open until `moment`)
                try:
                    data = connection.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):    # (the latter: not whole now, with no time left)
                    return True, b""
                except OSError:                     # (ssl.SSLError is one): reset, or no TLS now
                    return False, b""
                finally:
                    connection.settimeout(timeout)
                return bool(data), data
            try:
                return bool(connection.recv(1, socket.MSG_PEEK)), b""
            except OSError:
                return False, b""


def _tell(hook: Callable[[Any], None] | None, argument, what: str) -> None:
    """Call one of the server's hooks (none: nothing); a hook that raises is logged, never the connection's end."""
    if hook is not None:
        try:
            hook(argument)
        except Exception:
            log.exception("%s hook failed", what)


def scraper_name(client_address: tuple) -> str:
    """The name a scraper goes by: its connection's address and port."""
    return f"{client_address[0]}:{client_address[1]}"


def scrape_timeout(header: str | None) -> float | None:
    """The seconds a scrape-timeout header gives (bounded to MAX_SCRAPE_TIMEOUT), or None for none or nonsense."""
    try:
        seconds = float(header)
    except (TypeError, ValueError):
        return None
    return min(seconds, MAX_SCRAPE_TIMEOUT) if seconds > 0 else None     # (NaN is not > 0)


@dataclass
class Scrape:
    """One GET of /metrics: who asked (the scraper's connection, or None for a reader that does not count)
    and when it began (its request's first bytes came); `shown` is for the renderer to note what it served,
    handed back once delivered."""

    scraper: str | None
    began: float
    shown: dict = field(default_factory=dict)
    # The scraper's scrape timeout (its header), in seconds: a scraper's interval is at least that long.
    timeout: float | None = None

    @property
    def counting(self) -> bool:
        """True for a scrape by a Prometheus-compatible scraper."""
        return self.scraper is not None


class HeadersTooLarge(http.client.HTTPException):
    """A request's header lines together are longer than MAX_HEADER_BYTES."""


class Headers(dict):
    """A request's headers by lower-case name, the first of a repeated one (as http.server's email.message.Message
    gives it), read without the email parser: in the process that trains, the scrape's CPU is the job's, and that
    parser took ~150 µs of it a scrape, 250 ms apart, a quarter of all a scrape cost (bench/README.md)."""

    def get(self, name: str, default=None):
        return super().get(name.lower(), default)

    @classmethod
    def read(cls, stream) -> "Headers":
        """The header lines up to the empty one (http.client.LineTooLong, HeadersTooLarge, HTTPException past
        their bounds)."""
        headers = cls()
        last = None
        size = 0
        for _ in range(MAX_HEADERS):           # the empty line counts, as in http.client
            line = stream.readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                raise http.client.LineTooLong("header line")
            size += len(line)
            if size > MAX_HEADER_BYTES:
                raise HeadersTooLarge(f"got more than {MAX_HEADER_BYTES} bytes of headers")
            if line in (b"\r\n", b"\n", b""):
                return headers
            text = line.decode("iso-8859-1").rstrip("\r\n")
            if text[:1] in (" ", "\t"):          # an obsolete folded line: the previous header goes on
                if last is not None:
                    headers[last] = f"{headers[last]} {text.strip()}"
                continue
            name, colon, value = text.partition(":")
            if not colon or not name or " " in name or "\t" in name:
                continue                          # not a header line: nothing is read from it
            name = name.lower()
            if name not in headers:
                headers[name] = value.strip()
                last = name
            else:
                last = None                       # a repeat is not read: nor are its folded lines
        raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")


class _RequestDeadline(io.RawIOBase):
    """The connection's reads, each given only what is left of the time its request has to arrive whole."""

    def __init__(self, connection: socket.socket, seconds: float):
        self.connection, self.seconds, self.deadline = connection, seconds, time.monotonic() + seconds
        self.first_bytes: float | None = None
        self.early = b""                    # the next request's bytes read already (unread()), and when they came
        self.early_came: float | None = None
        self._reads_held = False            # (holds_next_request: the reader's look reads nothing new)

    def unread(self, data: bytes) -> None:
        """Bytes of the next request, read already (TLS records read to tell a request from a close): its first."""
        self.early, self.early_came = self.early + data, time.monotonic()

    def holds_next_request(self, reader: io.BufferedReader) -> bool:
        """Whether bytes read from the connection wait unparsed, here, in `reader` (its buffer) or over TLS in
        OpenSSL's (the rest of a record longer than the reader's read): a next request read with the one before it,
        or by a look at the connection. Told without reading from the connection."""
        if self.early or (isinstance(self.connection, ssl.SSLSocket) and self.connection.pending()):
            return True
        self._reads_held = True
        try:
            return bool(reader.peek(1))     # (a read held gives None: the reader's buffer alone is looked at)
        finally:
            self._reads_held = False

    def readable(self) -> bool:
        return True

    def restart(self) -> None:
        """The next request's time starts now (an answer was just written)."""
        self.deadline = time.monotonic() + self.seconds
        self.first_bytes = self.early_came if self.early else None

    def arrived(self) -> float:
        """When the request's first bytes were read (now, for one read ahead with the request before it: asked
        before its password check): its scraper's timeout runs from then at the latest. Counted from after the
        password check, an answer its scraper had dropped (a first check of 0.3 s, a timeout of 0.2 s) counted
        as read."""
        return self.first_bytes if self.first_bytes is not None else time.monotonic()

    def readinto(self, buffer) -> int | None:
        if self._reads_held:
            return None
        if self.early:
            count = min(len(buffer), len(self.early))
            buffer[:count], self.early = self.early[:count], self.early[count:]
            return count
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive whole in time")
        self.connection.settimeout(left)
        try:
            count = self.connection.recv_into(buffer)
        finally:
            self.connection.settimeout(self.seconds)    # the answer's writes get the whole idle timeout
        if count and self.first_bytes is None:
            self.first_bytes = time.monotonic()
        return count


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "MetricsHTTPServer"

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout     # StreamRequestHandler applies it to the socket
        super().setup()
        self.rfile.close()      # the socket's own reader: a file of it left open would keep the socket open
        self._deadline = _RequestDeadline(self.connection, self.server.idle_timeout)
        self.rfile = io.BufferedReader(self._deadline)

    def handle_one_request(self) -> None:
        self._deadline.restart()
        self.server.waiting(self.connection)        # for the next request: it may be cut for a newcomer
        super().handle_one_request()

    def parse_request(self) -> bool:
        """http.server's parse_request, its checks and answers, the headers read by Headers."""
        self.command = None
        self.request_version = version = self.default_request_version
        self.close_connection = True
        self.requestline = requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = words[-1]
            numbers = version[5:].split(".") if version.startswith("HTTP/") else []
            if len(numbers) != 2 or not all(n.isascii() and n.isdigit() and len(n) <= 10 for n in numbers):
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request version ({version!r})")
                return False
            number = int(numbers[0]), int(numbers[1])
            if number >= (2, 0):
                self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"Invalid HTTP version ({version[5:]})")
                return False
            self.close_connection = number < (1, 1)
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({requestline!r})")
            return False
        command, path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if command != "GET":
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad HTTP/0.9 request type ({command!r})")
                return False
        self.command = command
        self.path = "/" + path.lstrip("/") if path.startswith("//") else path
        try:
            self.headers = Headers.read(self.rfile)
        except http.client.LineTooLong as error:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long", str(error))
            return False
        except HeadersTooLarge as error:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Headers too large", str(error))
            return False
        except http.client.HTTPException as error:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers", str(error))
            return False
        self.server.working(self.connection)    # the request is in: from here to its answer it is never cut
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if self.headers.get("Expect", "").lower() == "100-continue" and self.request_version >= "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        server = self.server
        # Before the password check: a request read ahead with the one before it (pipelined) has no first bytes
        # of its own, and "now" after its check left the check's time out of its timeout.
        arrived = self._deadline.arrived()
        verdict = server.password_checks.verdict(self.headers.get("Authorization"), self.client_address[0])
        if verdict is None:
            # Not checked: its header is not known and a check is running (or its address just failed one). 503,
            # not 401: the password may be right (a 401 would tell an operator it was wrong), and a scraper
            # tries again at its next interval, a client after Retry-After. Closed as a 401 is: nothing checked
            # holds a slot, and the flooding client pays a new connection for each try.
            self.close_connection = True
            self._send("503 Service Unavailable", b"password check busy, retry later\n", "text/plain; charset=utf-8",
                       send_body, extra=f"Retry-After: {int(FAILED_CHECK_BACKOFF)}\r\nConnection: close\r\n".encode())
            return
        if not verdict:
            # Closed after it: a client without the password gets nothing more on this connection, whose slot
            # a scraper may need (a client asking once every 29 s kept it for ever).
            self.close_connection = True
            self._send("401 Unauthorized", b"basic authentication required\n", "text/plain; charset=utf-8",
                       send_body, extra=b'WWW-Authenticate: Basic realm="trainmetrics"\r\nConnection: close\r\n')
            return
        path = self.path.partition("?")[0]
        timeout = self.headers.get(SCRAPE_TIMEOUT_HEADER)
        scraper = scraper_name(self.client_address) if path == "/metrics" and timeout is not None else None
        scrape = Scrape(scraper, arrived, timeout=scrape_timeout(timeout))
        if scrape.counting:
            server.asked(scrape)        # (before its turn: one given up while it waits was asked all the same)
        # Every answer waits its turn, not a render alone: a flood of requests for / or a 404 took the GIL the
        # same way (the loop at 0.3 of its speed). A scraper's goes before the others' (a flood's queue held each
        # scrape 0.45 s, past its timeout: the job went dark).
        if not server.wait_turn(self.connection, scraper=scrape.counting,
                                still_there=lambda: self._kept_open(time.monotonic())):
            self.close_connection = True
            return
        if path == "/metrics":
            try:
                body = server.render(scrape)
            except Exception:   # a renderer bug must not take the endpoint down
                log.exception("rendering /metrics failed")
                self._send("500 Internal Server Error", b"internal error\n", "text/plain; charset=utf-8", send_body)
                return
            # A scraper that hung up before its answer was written gave the scrape up, however soon by our clock:
            # that starts when this thread reads the request, which sat unread in the kernel past the scraper's
            # timeout while the process was frozen or starved. (Asked before the write: after it, a scraper
            # without keep-alive may have read its answer and closed.)
            gave_up = scrape.counting and not self._kept_open(time.monotonic())
            self._send("200 OK", body, CONTENT_TYPE, send_body)
            if gave_up:
                self.close_connection = True
            elif send_body and self._reached_its_scraper(scrape):
                server.delivered(scrape)
        elif path == "/":
            self._send("200 OK", server.index_page, "text/html; charset=utf-8", send_body)
        else:
            self._send("404 Not Found", b"not found\n", "text/plain; charset=utf-8", send_body)

    def _reached_its_scraper(self, scrape: Scrape) -> bool:
        """Whether the answer just written was taken by a scraper still waiting for it. The scraper's clock started
        before ours (its connection's set-up, our thread's turn on a busy host), so an answer written late in its
        timeout by our clock may have come after it gave up: Prometheus then closes the connection and drops what
        came. Counted at once when written within CERTAIN_FRACTION of the timeout; later, only when the scraper
        kept its connection open past the timeout (by our clock, which ends no earlier than its own) and a
        moment more. Counted at once before, an answer written 0.19 s into a 0.2 s timeout by our clock (0.24 s
        by Prometheus's) was the job's final state read: the linger ended, and that Prometheus never had it."""
        if scrape.timeout is None:
            return True
        taken = time.monotonic() - scrape.began
        if taken <= scrape.timeout * CERTAIN_FRACTION:
            return True
        if taken > scrape.timeout or self.close_connection:     # (one we close tells us nothing)
            return False
        self.server.waiting(self.connection)     # (for its next request: it may be cut, as any waiting one)
        kept = self._kept_open(scrape.began + scrape.timeout + CLOSE_TRAVEL_SECONDS)
        if not kept:
            self.close_connection = True
        return kept

    def _kept_open(self, moment: float) -> bool:
        """Whether the client keeps the connection open until `moment` (_kept_open_until) or has asked again; the
        bytes of its next request read to tell are left for the request's reader. A next request read already
        (with the request before it, or over TLS by the look before that one's answer) is not on the connection:
        waited for there, it was held unanswered to the end of the wait."""
        if self._deadline.holds_next_request(self.rfile):
            return True
        kept, request = _kept_open_until(self.connection, moment)
        if request:
            self._deadline.unread(request)
        return kept

    def _send(self, status: str, body: bytes, content_type: str, send_body: bool, extra: bytes = b"") -> None:
        # One write for head and body: every extra socket call is one more wait for the GIL while a sampler
        # thread holds it, and the tail of the scrape latency is made of those waits.
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n").encode() + extra + b"\r\n"
        self.server.waiting(self.connection, writing=True)     # on the client to take it (one that never reads
        try:                                                    # may be cut)
            self.wfile.write(head + body if send_body else head)
        finally:
            self.server.written(self.connection)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature fixed by the base class
        """No access log: a scrape every 250 ms would flood it."""


class RenderPacer:
    """Spaces turns out to `rate` a second, in bursts of up to `burst` (the generic cell rate algorithm). Only the
    request next in line asks for a turn (the caller's lock keeps the order): a slot reserved ahead by every
    waiting request stayed taken when its connection was cut, and a client opening connections for 1 s (each one
    cutting a waiting one) pushed the next scrape 34 s out, a thread sleeping for each."""

    def __init__(self, rate: float = MAX_RENDERS_PER_SECOND, burst: int = RENDER_BURST):
        self._spacing = 1.0 / rate
        self._tolerance = (burst - 1) * self._spacing
        self._due = float("-inf")       # when the next turn is due, at the steady rate

    def free_in(self) -> float:
        """How many seconds until a turn is free (0.0: one is now); none is taken."""
        return max(self._due - self._tolerance - time.monotonic(), 0.0)

    def take(self) -> None:
        """Take the turn free now (free_in said so)."""
        self._due = max(self._due, time.monotonic()) + self._spacing


class MetricsHTTPServer(ThreadingHTTPServer):
    """Serves `render(scrape) -> bytes` on /metrics; binds in the constructor (OSError when it cannot).
    `asked(scrape)` hears of each counting scrape's request once read (its password checked), before its turn and
    whether or not its answer reaches its scraper; `delivered(scrape)` of each answer written, `closed(scraper)` of
    each connection's end (by the client, on an error or an idle timeout, or by close()), under the name a scraper
    on it had."""

    daemon_threads = True
    allow_reuse_address = True      # restart at once after a crash, whatever TIME_WAIT the scrapes left
    block_on_close = False
    request_queue_size = 128        # a burst of connects waits in the kernel's queue, not on SYN retries

    def __init__(self, address: tuple[str, int], render: Callable[[Scrape], bytes], *,
                 web_config: WebConfig | None = None, delivered: Callable[[Scrape], None] | None = None,
                 closed: Callable[[str], None] | None = None, asked: Callable[[Scrape], None] | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 title: str = "trainmetrics"):
        self.render = render
        self.pacer = RenderPacer()
        self._delivered = delivered
        self._closed = closed
        self._asked = asked
        self.web_config = web_config or WebConfig()
        self.idle_timeout = idle_timeout
        self.index_page = (f'<html><body><h1>{title}</h1><a href="/metrics">/metrics</a></body></html>\n').encode()
        self.max_connections = max_connections
        # Each open connection: since when it has kept the server waiting (for its next request, the rest of one,
        # or to take its answer), or None while the server works on its request. An evicted one is left out.
        self._open: dict[socket.socket, float | None] = {}
        self._writing: set[socket.socket] = set()      # those whose answer is being written
        self._open_lock = threading.Lock()
        # The requests waiting their turn (wait_turn), scrapers' and others', each in the order they came; woken
        # when a turn is taken, a connection cut or the server closed.
        self._scrapes_waiting: list[socket.socket] = []
        self._others_waiting: list[socket.socket] = []
        self._turns = threading.Condition(self._open_lock)
        # A check runs in the connection's thread, so waiting for one would keep a connection (and its thread) per
        # waiting client out of eviction's reach, as a check running for each did: those not admitted get a 503.
        self.password_checks = PasswordChecks(self.web_config)
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__(address, _Handler)
        self.web_config.secure(self)
        self._thread: threading.Thread | None = None
        # close() wakes the serving thread through this pair: it sleeps in select() with no timeout, where
        # socketserver's serve_forever would wake every poll_interval (10 wake-ups a second cost an idle job
        # ~1.6 ms of CPU a second on a VM).
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._closing = False

    @property
    def port(self) -> int:
        """The port actually bound (for port 0)."""
        return self.server_address[1]

    def asked(self, scrape: Scrape) -> None:
        """A counting scrape's request has been read."""
        _tell(self._asked, scrape, "scrape request")

    def delivered(self, scrape: Scrape) -> None:
        """A scrape's answer has been written to its connection."""
        _tell(self._delivered, scrape, "scrape delivery")

    def connection_closed(self, client_address) -> None:
        """A connection has ended: whichever scraper it carried scrapes no more."""
        _tell(self._closed, scraper_name(client_address), "connection close")

    def waiting(self, connection: socket.socket, writing: bool = False) -> None:
        """The connection waits on its client from now, unless it already did (since its accept, or its last
        answer's write: its thread reaching the next read is no new wait; a thread started late on a busy host
        took a newer connection's place in the order): it may be cut for a newcomer. `writing`: for the client to
        take an answer (until `written`), whatever it has sent besides."""
        with self._open_lock:
            if connection in self._open and self._open[connection] is None:     # (an evicted one stays out)
                self._open[connection] = time.monotonic()
            if writing and connection in self._open:
                self._writing.add(connection)

    def written(self, connection: socket.socket) -> None:
        """The answer's write is over (or failed)."""
        with self._open_lock:
            self._writing.discard(connection)

    def working(self, connection: socket.socket) -> None:
        """The server works on the connection's request: it is not cut."""
        with self._open_lock:
            if connection in self._open:
                self._open[connection] = None

    def wait_turn(self, connection: socket.socket, scraper: bool = False,
                  still_there: Callable[[], bool] = lambda: True) -> bool:
        """Wait for the request's turn (RenderPacer), a scraper's before the others', each in the order they came;
        False when the connection was cut for a newcomer or the server closed before or while it waited: nothing
        to answer. Held back, it is waiting, not worked on: it may be cut (flooding clients held in turn on every
        slot kept a scraper out), and a request cut so leaves at once, its thread with it. One held back whose
        client has hung up meanwhile (`still_there()`, asked without waiting when its turn is free) is False too,
        and leaves the turn to the next in line: answered, it cost a render for nobody and a turn of the others'."""
        line = self._scrapes_waiting if scraper else self._others_waiting
        held_back = False
        with self._turns:
            line.append(connection)
            try:
                while connection in self._open and not self._closing:
                    wait = None         # not next in line: until a turn is taken or a request leaves
                    if (self._scrapes_waiting or self._others_waiting)[0] is connection:
                        wait = self.pacer.free_in()
                        if not wait:
                            # Only one held back is asked: one never held came just now, and a client that
                            # shut its side after its request (nc -N) is read as gone too.
                            if held_back and not still_there():
                                return False
                            self.pacer.take()
                            self._open[connection] = None       # worked on again: not cut
                            return True
                    if self._open[connection] is None:          # waiting from now (as `waiting`)
                        self._open[connection] = time.monotonic()
                    held_back = True
                    self._turns.wait(wait)
                return False
            finally:
                line.remove(connection)
                self._turns.notify_all()

    def process_request(self, request, client_address) -> None:
        """One thread per connection, up to max_connections. With every slot taken, the connection that has kept
        the server waiting longest gives its slot up (as nginx and Apache close their idle keep-alive connections
        when out of them): refusing the newcomer instead let a client that used each of its connections just
        often enough keep every scraper out for ever. A waiting connection is blocked on its socket, so the
        shutdown ends its thread at once. Closed at once only when the server is working on every connection."""
        with self._open_lock:
            if len(self._open) >= self.max_connections:
                evicted = self._longest_waiting()
                if evicted is None:
                    self.shutdown_request(request)
                    return
                del self._open[evicted]
                self._writing.discard(evicted)
                self._turns.notify_all()        # one waiting its turn leaves at once
                try:
                    # The descriptor's own shutdown: SSLSocket.shutdown drops its TLS object before it shuts the
                    # descriptor, and the connection's thread, running between the two, would talk in plain text.
                    socket.socket.shutdown(evicted, socket.SHUT_RDWR)
                except OSError:
                    pass
            self._open[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._open_lock:
                self._open.pop(request, None)
            raise

    def _longest_waiting(self) -> socket.socket | None:
        """The connection to give its slot up (under _open_lock): of those waiting on their client, the one that has
        waited longest, passing over any not in a write whose next request already sits unread in the kernel: its
        client did its part, its thread has yet to run (on a busy host a scraper's new connection sat so, and the
        newcomers of a connection flood cut it). One of those only when every waiting connection is such."""
        waiting = sorted((since, index, connection) for index, (connection, since) in enumerate(self._open.items())
                         if since is not None)
        for _, _, connection in waiting:
            if connection in self._writing or not _unread_bytes(connection):
                return connection
        return waiting[0][2] if waiting else None

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.pop(request, None)
                self._writing.discard(request)
            self.connection_closed(client_address)

    def handle_error(self, request, client_address) -> None:
        """A client that went away or timed out is not an error worth a traceback."""
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def serve_in_background(self, name: str = "metrics-http") -> "MetricsHTTPServer":
        """Serve from a daemon thread until close()."""
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        """Accept connections until close() wakes the loop; asleep in between."""
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while not self._closing:
                for key, _ in selector.select():
                    if key.fileobj is self and not self._closing:
                        self._handle_request_noblock()

    def close(self) -> None:
        """Stop accepting, close the listening socket and every open connection (a scraper's keep-alive
        connection would otherwise go on being served)."""
        with self._turns:
            self._closing = True
            self._turns.notify_all()    # the requests waiting their turn are not answered
        if self._thread is not None:
            try:
                self._wake_writer.send(b"x")
            except OSError:
                pass
            if self._thread is not threading.current_thread():
                self._thread.join()
            self._thread = None
        self.server_close()
        self._wake_reader.close()
        self._wake_writer.close()
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            try:
                socket.socket.shutdown(connection, socket.SHUT_RDWR)   # the descriptor's own: as at an eviction
            except OSError:
                pass
