"""The Prometheus HTTP API client: one shared httpx.AsyncClient, a deadline per request below the service's
own, bounded concurrency, requests no caller's cancellation reaches, and one error type for everything that
can go wrong on the way."""

import asyncio
import contextlib
import contextvars
import email.utils
import json
import logging
import math
import re
import ssl
import time
from typing import Iterator
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram

from trainmetrics.command import DEFAULT_MAX_ANSWER_BYTES
from trainmetrics.edge import ApiError

log = logging.getLogger("trainmetrics.analytics")

DEFAULT_RETRY_AFTER_SECONDS = 5
# A Retry-After passed on to our clients is at most this long: an answer asking for a day would keep them away
# for one after Prometheus is back.
MAX_RETRY_AFTER_SECONDS = 300
CONNECT_TIMEOUT_SECONDS = 2.0
# An answer is read up to max_answer_bytes (--max-answer-bytes): a backend answering without end (a proxy's loop, a
# query over a fleet far larger than ours) filled the service's memory. JSON of more than DECODE_IN_THREAD_BYTES is
# decoded off the event loop: a 17 MB range answer took 0.7 s here, every other request waiting.
DECODE_IN_THREAD_BYTES = 1 << 20
# VictoriaMetrics answers as of now minus its -search.latencyOffset (30 s unless set; 1.79 keeps at least 1 s
# of it): an instant query near now, and a range query's newest points, hold nothing newer. Its /flags page
# lists the flags set on its command line, one `-name="value"` a line; Prometheus has no such page.
VICTORIA_FLAG_LINE = re.compile(r'^-[A-Za-z0-9_.]+=".*"$')
VICTORIA_LATENCY_OFFSET_DEFAULT_SECONDS = 30.0
VICTORIA_LATENCY_OFFSET_LEAST_SECONDS = 1.0
VICTORIA_CLUSTER_PATH = re.compile(r"/select/[^/]+/prometheus/?")
GO_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
GO_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# A JSON escape of a UTF-16 surrogate; one without its pair decodes to a str that UTF-8 cannot encode (_loads).
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# A success answer's `warnings` that begin so are PromQL's annotations of the query (Prometheus 2.50-2.53 put its
# infos there too: "metric might not be a counter"): about the query, no data missing. Any other warning says the
# answer holds part of the backend's data (Thanos Query: a store that did not answer; Prometheus: a remote read
# that failed).
PROMQL_ANNOTATIONS = ("PromQL info:", "PromQL warning:")
# A partial answer is logged at most this often (a store down answers every query so).
PARTIAL_LOG_SECONDS = 60.0


def retry_after_seconds(value: str, now: float | None = None) -> int:
    """A Retry-After (seconds, or an HTTP date as RFC 9110 allows) as whole seconds from `now`, 1 to
    MAX_RETRY_AFTER_SECONDS; DEFAULT_RETRY_AFTER_SECONDS when it says nothing usable."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = int(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return DEFAULT_RETRY_AFTER_SECONDS
        if when.tzinfo is None:         # "-0000": a time zone unknown, so no moment
            return DEFAULT_RETRY_AFTER_SECONDS
        seconds = math.ceil(when.timestamp() - (time.time() if now is None else now))
    return min(max(seconds, 1), MAX_RETRY_AFTER_SECONDS)


class PrometheusError(ApiError):
    """Prometheus could not answer: kind is unavailable (503), timeout (504) or bad_answer (502)."""

    STATUS = {"unavailable": 503, "timeout": 504, "bad_answer": 502}

    def __init__(self, kind: str, message: str, retry_after: int | None = None):
        super().__init__(self.STATUS[kind], f"prometheus_{kind}", message,
                         {"Retry-After": str(retry_after)} if retry_after else None)
        self.kind = kind
        self.retry_after = retry_after

    @property
    def status_code(self) -> int:
        """The HTTP status the service answers with."""
        return self.status


def partial_warnings(body) -> list[str]:
    """Why a success answer holds only part of the backend's data: its warnings that are not PromQL's annotations
    (PROMQL_ANNOTATIONS), and a VictoriaMetrics cluster's `isPartial` (a vmstorage node did not answer); empty for
    a whole answer."""
    if not isinstance(body, dict):
        return []
    warnings = body.get("warnings")
    if isinstance(warnings, str):
        warnings = [warnings]
    elif not isinstance(warnings, list):
        warnings = [repr(warnings)[:200]] if warnings else []
    found = [str(w)[:500] for w in warnings if not (isinstance(w, str) and w.startswith(PROMQL_ANNOTATIONS))]
    if body.get("isPartial") is True:
        found.append("isPartial: a storage node did not answer")
    return found


# The warnings of the partial answers to the queries made within partial_answers() (by its task and the tasks
# started from it, which share the list): None outside one.
_PARTIAL: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("partial_answers", default=None)


@contextlib.contextmanager
def partial_answers() -> Iterator[list[str]]:
    """Collect the warnings of every partial answer (partial_warnings) to the queries made within: a figure computed
    from one may fall short, and is not to be kept as settled. An enclosing collection gets them too."""
    outer = _PARTIAL.get()
    found: list[str] = []
    token = _PARTIAL.set(found)
    try:
        yield found
    finally:
        _PARTIAL.reset(token)
        if outer is not None:
            outer.extend(found)


def note_partial(warnings: list[str]) -> None:
    """Note partial answers' warnings for the partial_answers() this runs within (none: nothing to do): those of a
    computation shared with another request (cache.computed_together), which noted them in its own."""
    collecting = _PARTIAL.get()
    if collecting is not None:
        collecting.extend(warnings)


def _tls_failure(error: BaseException) -> str:
    """Why the TLS handshake under a transport error failed, for its message ('' where none did): "unreachable:
    ConnectError" alone sent one whose backend's certificate a private CA signed looking for a network fault."""
    while error is not None and not isinstance(error, ssl.SSLError):
        error = error.__cause__ or error.__context__
    if isinstance(error, ssl.SSLCertVerificationError):
        return f" (its TLS certificate is not trusted: {error.verify_message}; --prometheus-ca-file names the CA " \
               "that signed it)"
    return f" (TLS: {error.reason or error})" if isinstance(error, ssl.SSLError) else ""


class _StaleConnection(Exception):
    """A request that failed on a pooled connection before any answer came: the backend or a proxy closed the
    connection while it was idle in the pool, or as the request came (its idle timer's race with it)."""

    def __init__(self, error: httpx.TransportError):
        super().__init__(str(error))
        self.error = error


class ClientMetrics:
    """Requests to Prometheus, counted by outcome and timed; created once per registry."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("analytics_prometheus_requests_total",
                                "Requests to Prometheus by outcome (success, partial: a success holding part "
                                "of the backend's data, unavailable, timeout, bad_answer, error).",
                                ["outcome"], registry=registry)
        self.duration = Histogram("analytics_prometheus_request_duration_seconds",
                                  "Time per request to Prometheus, queueing included.", registry=registry,
                                  buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))


def shown_url(url: str) -> str:
    """A Prometheus URL as answers and logs show it: without the password its user part may carry (httpx sends
    it as basic auth), which the open /healthz and every unreachable-Prometheus answer showed to any caller."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"))


class PrometheusClient:
    """Instant and range queries over the Prometheus HTTP API (any compatible backend)."""

    def __init__(self, base_url: str, *, deadline: float = 8.0, max_concurrency: int = 4,
                 transport: httpx.AsyncBaseTransport | None = None, metrics: ClientMetrics | None = None,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES, auth: httpx.Auth | None = None,
                 ca: ssl.SSLContext | None = None, headers: dict[str, str] | None = None):
        self.base_url = base_url.rstrip("/")
        self.shown_url = shown_url(self.base_url)
        self.deadline = deadline
        self.max_answer_bytes = max_answer_bytes
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._pooled = max_concurrency       # connections kept open between requests, at most
        self._partial_logged = -math.inf     # when a partial answer was last logged (time.monotonic)
        self._sending: set[asyncio.Task] = set()     # requests in flight (the event loop keeps weak references)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, transport=transport, auth=auth, verify=ca if ca is not None else True,
            timeout=httpx.Timeout(deadline, connect=min(deadline, CONNECT_TIMEOUT_SECONDS)),
            # Uncompressed: on the loopback or a LAN, gzip costs both sides more CPU than it saves in time.
            headers={**(headers or {}), "accept-encoding": "identity"},
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency))
        self._metrics = metrics if metrics is not None else ClientMetrics(CollectorRegistry())
        self._answer_delay: float | None = None     # read once (answer_delay)
        self._reading: asyncio.Future | None = None     # the answer delay's read under way

    async def aclose(self) -> None:
        """Close the shared connection pool."""
        await self._http.aclose()

    async def query(self, expr: str, time_: float | None = None) -> list[dict]:
        """Instant query; returns the result vector (or the matrix of a range selector; scalars come back as
        one unlabelled sample)."""
        params = {"query": expr}
        if time_ is not None:
            params["time"] = f"{time_:.3f}"
        return _result(await self._get("/api/v1/query", params), ("vector", "scalar", "matrix"), expr)

    async def query_range(self, expr: str, start: float, end: float, step: float | str) -> list[dict]:
        """Range query; returns the result matrix. step: seconds, or a duration literal such as "3600ms"
        (exact where a float number of seconds might round to a neighbouring millisecond), sent in the form both
        backends read to the millisecond (_step_text)."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": _step_text(step)}
        return _on_grid(_result(await self._get("/api/v1/query_range", params), ("matrix",), expr),
                        params, expr)

    async def answer_delay(self) -> float:
        """How far behind now the backend's answers may be: a VictoriaMetrics' -search.latencyOffset (read once
        from its /flags page), 0 for Prometheus and any backend without that page. A job is not settled (its
        analytics not cached, its report not stored) until its newest sample is this far behind: read sooner, the
        range reads missed its last seconds, and the cache kept that answer. Infinite while the page cannot be read
        (5xx, 429, unreachable, no answer in time), and asked again: read as 0 then, a VictoriaMetrics' job read
        within its offset of its end was cached, and its report stored for good, without its last seconds."""
        if self._answer_delay is None:
            # One read at a time, shared by every caller waiting for it: each caller's own read, with the page not
            # answering, queued for a slot after its caller had gone and held it for a whole deadline, the queries
            # behind them timing out long after the burst.
            if self._reading is None or self._reading.done():
                self._reading = asyncio.ensure_future(self._read_answer_delay())    # no caller's cancellation
                self._sending.add(self._reading)
                self._reading.add_done_callback(self._sent)
            delay = await asyncio.shield(self._reading)
            if delay is None:
                return math.inf
            self._answer_delay = delay
        return self._answer_delay

    async def _read_answer_delay(self) -> float | None:
        parts = urlsplit(self.base_url)
        # A VictoriaMetrics cluster's vmselect serves the API under /select/<tenant>/prometheus and its /flags at its
        # root: under the API's path it was a 404, read as no VictoriaMetrics (0 s: its 30 s offset never waited).
        cluster = VICTORIA_CLUSTER_PATH.fullmatch(parts.path)
        flags = urlunsplit((parts.scheme, parts.netloc, "/flags", "", "")) if cluster else "/flags"
        try:
            async with self._semaphore:
                response, content = await self._fetch("GET", flags, self.deadline)
        except (httpx.HTTPError, PrometheusError):
            return None
        if response.status_code == 429 or response.status_code >= 500:
            return None     # (a restarting VictoriaMetrics, or its proxy's 502: read as 0 for the service's life)
        return answer_delay_of(response.status_code, _text(content))

    async def ready(self) -> None:
        """Return when Prometheus answers /-/ready with 200; raise PrometheusError otherwise."""
        await self._request("/-/ready", {}, expect_json=False)

    async def _get(self, path: str, params: dict) -> dict:
        # Prometheus stops evaluating at our deadline too, instead of working on for nobody.
        params = {**params, "timeout": f"{max(1, round(self.deadline * 1000))}ms"}
        return await self._request(path, params, expect_json=True)

    async def _request(self, path: str, params: dict, expect_json: bool):
        began = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout(self.deadline):
                await self._semaphore.acquire()
                # The request runs in a task of its own that no caller cancels, and holds its slot until it
                # ends; the caller stops waiting at the deadline. A request cancelled inside httpcore's pool
                # can leave its connection slot taken for good (httpcore#1093: a burst of cancelled requests
                # took every slot, and every later request timed out); its own deadline ends it instead (_fetch).
                remaining = self.deadline - (time.perf_counter() - began)
                sending = asyncio.ensure_future(self._send(path, params, remaining))
                self._sending.add(sending)
                sending.add_done_callback(self._sent)
                response, content = await asyncio.shield(sending)
                body = await _decoded(response, content)
            result = self._parse(response, content, body, params.get("query"), expect_json)
            warnings = partial_warnings(body) if expect_json else []
            if warnings:
                self._partial(warnings, params.get("query") or path)
            outcome = "partial" if warnings else "success"
            return result
        except PrometheusError as error:
            outcome = error.kind
            raise
        except (TimeoutError, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as error:
            outcome = "timeout"
            raise PrometheusError("timeout", f"Prometheus did not answer within {self.deadline:g}s") from error
        except httpx.TransportError as error:   # refused, reset, DNS, connect timeout
            outcome = "unavailable"
            raise PrometheusError("unavailable", f"Prometheus at {self.shown_url} is unreachable: "
                                  f"{type(error).__name__}{_tls_failure(error)}",
                                  DEFAULT_RETRY_AFTER_SECONDS) from error
        finally:
            self._metrics.requests.labels(outcome).inc()
            self._metrics.duration.observe(time.perf_counter() - began)

    def _partial(self, warnings: list[str], expr: str) -> None:
        """Note a partial answer for the partial_answers() it was asked within, and log it (at most once a
        PARTIAL_LOG_SECONDS)."""
        note_partial(warnings)
        if time.monotonic() - self._partial_logged >= PARTIAL_LOG_SECONDS:
            self._partial_logged = time.monotonic()
            log.warning("Prometheus at %s answered with part of its data (%s); not cached, asked again next time "
                        "(logged once a minute at most); query: %s", self.shown_url, "; ".join(warnings)[:500],
                        expr[:200])

    async def _send(self, path: str, params: dict, seconds: float) -> tuple[httpx.Response, bytes]:
        """One request within `seconds` (_fetch's deadline), then its slot freed for the next."""
        try:
            if params:
                # POSTed as a form (the query API takes either): no URL length limit, and urlencode quotes a
                # long expression several times faster than httpx's URL builder.
                return await self._fetch("POST", path, seconds, content=urlencode(params).encode(),
                                         headers={"content-type": "application/x-www-form-urlencoded"})
            return await self._fetch("GET", path, seconds)
        finally:
            self._semaphore.release()

    async def _fetch(self, method: str, path: str, seconds: float, **request) -> tuple[httpx.Response, bytes]:
        """_fetch_once within `seconds`, sent again where it failed on a pooled connection before any answer came
        (_StaleConnection): the backend or a proxy closed that connection while it was idle (a server's or a load
        balancer's idle timeout; httpx's pool sees a close only once it has arrived), and the query failed as an
        unreachable Prometheus (503) with the backend up. Every request of this client is a read (the query API's
        POSTed form too), so sending one again does nothing twice. It goes to the next pooled connection or a
        fresh one, within what is left of `seconds`; a request that fails on a fresh connection, or once an answer
        began, is not sent again."""
        loop = asyncio.get_running_loop()
        end = loop.time() + max(seconds, 0.001)
        tries = 0
        while True:
            try:
                return await self._fetch_once(method, path, end - loop.time(), **request)
            except _StaleConnection as stale:
                tries += 1
                # (each stale try takes its connection out of the pool: after as many as it holds, a fresh one)
                if tries > self._pooled or end - loop.time() <= 0:
                    raise stale.error from None
                log.debug("a pooled connection to %s was closed (%s: %s); sent again",
                          self.shown_url, type(stale.error).__name__, stale.error)

    async def _fetch_once(self, method: str, path: str, seconds: float,
                          **request) -> tuple[httpx.Response, bytes]:
        """The response and its body, read within `seconds` (httpx.ReadTimeout after) and up to max_answer_bytes
        (PrometheusError).

        httpx's timeouts bound each read only: an answer trickled in under them, its head or its body, had no end,
        and held its slot for as long as it came. The deadline cancels the request inside httpx; never while it
        waits in httpcore's pool (httpcore#1093), as the semaphore lets in no more requests than the pool has
        connections, and only while httpcore's connection has the request (from its head's sending to its
        release, told by httpcore's trace): a cancellation there ends in the connection, which closes. Cancelled
        as a new connection opened (before it took the request: NEW) or as one was released (ACTIVE still), the
        connection was no request's and held its pool slot for good: every later request timed out. (Connecting
        is bounded by httpx's connect timeout, a release by nothing.)

        _StaleConnection where httpcore sent the request on a connection it had pooled (it opened none for it) and
        the connection failed before the answer's head came."""
        seconds = max(seconds, 0.001)
        limit = self.max_answer_bytes
        deadline = asyncio.get_running_loop().time() + seconds
        timeout = httpx.Timeout(seconds, connect=min(seconds, CONNECT_TIMEOUT_SECONDS))

        seen: set[str] = set()

        async def trace(event: str, info: dict) -> None:
            seen.add(event)
            if until.expired():             # (cancelled: httpcore releases the connection)
                return
            if event == "http11.send_request_headers.started":
                until.reschedule(deadline)
            elif event == "http11.response_closed.started":
                until.reschedule(None)

        sent = self._http.build_request(method, path, timeout=timeout, extensions={"trace": trace}, **request)
        try:
            async with asyncio.timeout(None) as until:
                response = await self._http.send(sent, stream=True)
                until.reschedule(deadline)      # (a transport that does not trace as httpcore does: its head is in)
                try:
                    declared = response.headers.get("content-length", "")
                    if declared.isascii() and declared.isdigit() and int(declared) > limit:
                        raise _too_large(limit)
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise _too_large(limit)
                        chunks.append(chunk)
                except httpx.DecodingError as error:
                    # (no transport error: it escaped every mapping, a 500, and the summary's took the app down)
                    encoding = response.headers.get("content-encoding", "")[:40]
                    raise PrometheusError("bad_answer", f"Prometheus answered a body that its Content-Encoding "
                                                        f"({encoding}) does not decode: {error}") from error
                finally:
                    await response.aclose()
        except TimeoutError:
            raise httpx.ReadTimeout("the answer took longer than the request's deadline", request=sent) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as error:
            if "http11.send_request_headers.started" in seen and "connection.connect_tcp.started" not in seen \
                    and "http11.receive_response_headers.complete" not in seen:
                raise _StaleConnection(error) from error
            raise
        return response, b"".join(chunks)

    def _sent(self, sending: asyncio.Task) -> None:
        """Forget a finished request; its error, if its caller stopped waiting, is nobody's to hear."""
        self._sending.discard(sending)
        if not sending.cancelled():
            sending.exception()

    def _parse(self, response: httpx.Response, content: bytes, body, expr: str | None, expect_json: bool):
        status = response.status_code
        error_type = body.get("errorType") if isinstance(body, dict) else None
        detail = body.get("error") if isinstance(body, dict) else _text(content[:200]).strip()
        # Not the query's fault, and not for long: a 429 is the backend's back-pressure (Mimir's query-frontend: too
        # many outstanding requests), a 502 or 504 a proxy's before it that could not reach it, or not in time. (A
        # 429 was a 502 logged as our bug; a proxy's 502 and 504 were 502s without Retry-After.)
        if status in (429, 502, 503, 504) or error_type in ("timeout", "canceled", "unavailable"):
            if error_type == "timeout" or status == 504:
                raise PrometheusError("timeout", f"Prometheus timed out evaluating a query: {detail or status}")
            reason = {429: "is too busy to answer (429)", 502: "is not reachable through its proxy (502)"}
            raise PrometheusError("unavailable", f"Prometheus {reason.get(status, 'is not ready')}: {detail or status}",
                                  retry_after_seconds(response.headers.get("retry-after", "")))
        if status in (401, 403, 407):
            # The credentials, not the query: logged as our bug, a revoked token sent its owner reading code.
            raise PrometheusError("bad_answer", f"Prometheus refused the analytics' credentials ({status}): see "
                                                "--prometheus-bearer-token-file, the URL's user:password, "
                                                "--prometheus-header")
        if 400 <= status < 500:
            # Every expression is built by queries.py from validated input: a 4xx is our bug.
            log.error("BUG: Prometheus rejected a query (%s %s): %s; query: %s", status, error_type, detail, expr)
            raise PrometheusError("bad_answer", f"Prometheus rejected a query ({status} {error_type}): {detail}")
        if status != 200:
            raise PrometheusError("bad_answer", f"Prometheus answered {status}: {detail}")
        if not expect_json:
            return None
        if not isinstance(body, dict) or body.get("status") != "success" or "data" not in body:
            raise PrometheusError("bad_answer", f"Prometheus answered 200 without a success body: "
                                  f"{_text(content[:200])!r}")
        return body["data"]


def _too_large(limit: int) -> "PrometheusError":
    return PrometheusError("bad_answer", f"Prometheus answered more than {limit} bytes (--max-answer-bytes): "
                                         "the query covers more than this service reads")


def _text(content: bytes) -> str:
    return content.decode("utf-8", "replace")


async def _decoded(response: httpx.Response, content: bytes):
    """A JSON answer's body (None when it is not JSON): a large one decoded in a worker thread."""
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        if len(content) > DECODE_IN_THREAD_BYTES:
            return await asyncio.to_thread(_loads, content)
        return _loads(content)
    # (UnicodeDecodeError is a ValueError; an answer nested deeper than Python's recursion limit, "[[[...]]]", a
    # RecursionError: it escaped as a 500, and took the ASGI application down with it)
    except (ValueError, RecursionError):
        return None


def _loads(content: bytes):
    """JSON as Python reads it, but for a surrogate escaped without its pair ("\\ud800"), which JSON allows and
    Python reads as a str that UTF-8 cannot encode: read as U+FFFD, as Go's encoder writes what is no text. Such a
    label's value reached the answer, whose encoding failed (a 500)."""
    body = json.loads(content)
    return _without_lone_surrogates(body) if SURROGATE_ESCAPE.search(content) else body


def _without_lone_surrogates(value):
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(key): _without_lone_surrogates(item) for key, item in value.items()}
    return value


def answer_delay_of(status: int, flags_page: str) -> float:
    """The answer delay a /flags page tells: a VictoriaMetrics' latency offset (its default when the page does
    not set it, or sets it in a way not understood), 0 for a page that is not VictoriaMetrics'."""
    lines = [line.strip() for line in flags_page.splitlines() if line.strip()]
    if status != 200 or not lines or not all(VICTORIA_FLAG_LINE.match(line) for line in lines):
        return 0.0
    offset = VICTORIA_LATENCY_OFFSET_DEFAULT_SECONDS
    for line in lines:
        if line.startswith("-search.latencyOffset="):
            text = line.split("=", 1)[1].strip('"')
            parts = GO_DURATION_PART.findall(text)
            if parts and "".join(number + unit for number, unit in parts) == text:
                offset = sum(float(number) * GO_DURATION_UNITS[unit] for number, unit in parts)
    return max(offset, VICTORIA_LATENCY_OFFSET_LEAST_SECONDS)


def _result(data, kinds: tuple[str, ...], expr: str) -> list[dict]:
    """The samples of a success answer's data, checked for the shape the readers take for granted: a backend or
    proxy answering success with `data: null`, a string result or a value that is no number was a 500 (a
    TypeError in a reader), not the bad answer it is. A scalar comes back as one unlabelled sample."""
    kind = data.get("resultType") if isinstance(data, dict) else None
    result = data.get("result") if isinstance(data, dict) else None
    if kind in kinds:
        if kind == "scalar" and _point(result):
            return [{"metric": {}, "value": result}]
        key = "values" if kind == "matrix" else "value"
        if isinstance(result, list) and all(_sample(sample, key) for sample in result):
            return result
    log.warning("Prometheus answered a %s result of an unexpected shape to: %s", str(kind)[:40], expr[:200])
    raise PrometheusError("bad_answer", f"Prometheus answered success with a {str(kind)[:40]} result of an "
                                        f"unexpected shape (expected {' or '.join(kinds)} samples)")


def _step_text(step: float | str) -> str:
    """A range query's step, to the millisecond, as seconds a tenth of a millisecond past its whole milliseconds:
    VictoriaMetrics (1.79) read "1473ms" as 1472 ms and "1.001" as 1000 ms, Prometheus "1.001" as 1000 ms too
    (each truncates a float), and answered on that grid; both read 1.4731 as 1473 ms. Another duration literal
    ("1h": no fraction to lose) and a step under a millisecond (refused as it was) are sent as they were."""
    if isinstance(step, str):
        if not (step.endswith("ms") and step[:-2].isdigit()):
            return step
        ms = int(step[:-2])
    else:
        ms = round(step * 1000)
    if ms < 1:
        return step if isinstance(step, str) else f"{step:.3f}"
    return f"{ms // 1000}.{ms % 1000:03d}1"


def _on_grid(result: list[dict], params: dict, expr: str) -> list[dict]:
    """A range query's result, checked to hold only points of the grid it asked for: start + k * step up to end,
    each time once, in order, as Prometheus and VictoriaMetrics answer (every grid asked is aligned to its step).
    A backend answering more points (its raw samples, points before the start or after the end, one twice) had
    them averaged and peaked into the trends and job peaks: a wrong number served as right."""
    start_ms, end_ms = round(float(params["start"]) * 1000), round(float(params["end"]) * 1000)
    step = params["step"]
    try:
        step_ms = int(step[:-2]) if step.endswith("ms") and step[:-2].isdigit() else round(float(step) * 1000)
    except ValueError:      # another duration literal ("1h"): the bounds and the order are checked only
        step_ms = 1
    for series in result:
        previous = start_ms - 1
        for point in series["values"]:
            at = round(float(point[0]) * 1000)
            if not previous < at <= end_ms or (at - start_ms) % max(step_ms, 1):
                log.warning("Prometheus answered a range query with a point off its grid to: %s", expr[:200])
                raise PrometheusError("bad_answer", f"Prometheus answered a range query with a point at "
                                                    f"{at / 1000:.3f}, off the grid asked (from {start_ms / 1000:.3f} "
                                                    f"to {end_ms / 1000:.3f} every {step_ms / 1000:g}s, each once)")
            previous = at
    return result


def _sample(sample, key: str) -> bool:
    if not isinstance(sample, dict):
        return False
    labels, found = sample.get("metric"), sample.get(key)
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return False
    return _point(found) if key == "value" else isinstance(found, list) and all(_point(p) for p in found)


def _point(point) -> bool:
    """[time, "value"], both numbers (a value as Prometheus writes it: a string; "NaN" and "+Inf" are values, never
    times: a NaN or infinite time, which Python's JSON reads, reached the answer and failed its encoding, a 500)."""
    if not isinstance(point, (list, tuple)) or len(point) != 2:
        return False
    try:
        if not math.isfinite(float(point[0])):
            return False
        float(point[1])
    except (TypeError, ValueError, OverflowError):     # (an integer past a float's range, 1e400 written out: a 500)
        return False
    return not isinstance(point[0], bool) and not isinstance(point[1], bool)
