"""The HTTP edge of the Starlette services (the job server, the analytics, or both on one URL), in one place:
the error shape, the exception handlers, request-body limits, authentication and the composed /healthz and
/metrics.

Every error leaves as JSON, `{"error": {"code": "...", "message": "..."}}`, whatever raised it. A service
contributes a Component (routes, lifespan, metrics registry, health check); build_app puts one or more of
them behind one edge.
"""

import asyncio
import contextlib
import copy
import errno
import ipaddress
import json
import logging
import sqlite3
from dataclasses import dataclass, field
from typing import AsyncContextManager, Awaitable, Callable, Protocol

import anyio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from trainmetrics.contract import CONTROL_CHARACTERS
from trainmetrics.signals import SERVICE_STOP_SIGNALS, signals_to_take
from trainmetrics.webconfig import FAILED_CHECK_BACKOFF, PasswordChecks, WebConfig

log = logging.getLogger("trainmetrics.edge")

# A job spec is a few hundred bytes; a JSON body past this is refused unread.
MAX_JSON_BYTES = 64 * 1024
# Health checks answer within this, whatever hangs behind them.
HEALTH_TIMEOUT_SECONDS = 3.0
# The longest a request waits for the check of its header that another request started (a bcrypt is 0.1-0.5 s).
SAME_CHECK_WAIT_SECONDS = 5.0
# Routes whose credential is not the caller's: a job run reporting its endpoints with its run's secret.
SELF_CHECKED_PREFIXES = ("/api/internal/",)


class ApiError(Exception):
    """An error answer: HTTP status, a stable code, a message naming the problem, optional headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error_response(error.status, error.code, error.message, error.headers)


HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own 404 and 405 (and any HTTPException) in the one error shape."""
    return error_response(error.status_code, HTTP_CODES.get(error.status_code, "http_error"), str(error.detail),
                          getattr(error, "headers", None))


async def _timeout(request: Request, error: TimeoutError) -> JSONResponse:
    return error_response(504, "timeout", "the service ran out of time answering this request")


async def _client_gone(request: Request, error: ClientDisconnect) -> Response:
    """A client that hung up mid-request (half a body) has no answer to read: not our error (it was logged as
    one, with two tracebacks: any caller could fill the log and trip alerts on ERROR lines)."""
    log.debug("%s %s: the client hung up before its request was whole", request.method, request.url.path)
    return Response(status_code=400)


def storage_full(error: BaseException) -> bool:
    """True for a write that found no room: the disk full (ENOSPC; EDQUOT, the owner's quota), or SQLite's
    "database or disk is full"."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


async def _no_room(request: Request, error: OSError | sqlite3.Error) -> JSONResponse:
    """A write that found no room: 507 and one line in the log (it was a 500 `internal error: OSError`, or
    `OperationalError`, with two tracebacks per request); any other OSError or SQLite error is unexpected."""
    if not storage_full(error):
        raise error
    log.warning("%s %s: no space left on the disk: %s", request.method, request.url.path, error)
    return error_response(507, "insufficient_storage", "no space left on the server's disk: try again once space "
                                                       "is freed")


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return error_response(500, "internal", f"internal error: {type(error).__name__}")


# (TimeoutError is an OSError: its own handler comes first, as the nearest class's does.)
EXCEPTION_HANDLERS = {ApiError: _api_error, HTTPException: _http_error, TimeoutError: _timeout,
                      ClientDisconnect: _client_gone, OSError: _no_room, sqlite3.Error: _no_room,
                      Exception: _unexpected}


class DuplicateKey(ValueError):
    """A JSON object that names one key twice."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # A key given twice is refused as a query parameter given twice is: a proxy that checked the first value
    # and a server that used the last (json's way) would not agree on what was asked.
    value = dict(pairs)
    if len(value) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(f"body: key {key[:40]!r} given twice")
            seen.add(key)
    return value


async def read_json(request: Request, limit: int = MAX_JSON_BYTES) -> object:
    """The request body as JSON: 415 unless it says it is JSON (Content-Type application/json), 413 past `limit`
    bytes (refused before reading when the length is declared), 400 for anything that is not JSON of a sane
    depth.

    The content type is required because a web page can make a browser POST a text/plain or form body to any
    address, a loopback server without tokens included, with no preflight; a JSON content type it cannot send
    without one, which this server never grants."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not (media_type.startswith("application/") and
                                                 media_type.endswith("+json")):
        raise ApiError(415, "unsupported_media_type", f"content-type {media_type[:60] or 'missing'}: send the body "
                                                      "as JSON with Content-Type: application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"body: at most {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "too_large", f"body: at most {limit} bytes")
    try:
        value = json.loads(body, object_pairs_hook=_unique_keys)
        # A JSON escape may spell a lone surrogate ("\\udfff"), which no UTF-8 text holds: it would pass every
        # check, be stored, and fail each answer that shows it.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except UnicodeEncodeError:
        raise ApiError(400, "bad_request", "body: text must be Unicode (a lone surrogate such as \\udfff is not)") \
            from None
    except RecursionError:
        raise ApiError(400, "bad_request", "body: not JSON of a sane depth") from None
    except DuplicateKey as error:
        raise ApiError(400, "bad_request", str(error)) from None
    except ValueError as error:     # the parser's reason: where the syntax broke, a number past its digit limit
        raise ApiError(400, "bad_request", f"body: not JSON ({' '.join(str(error).split())[:120]})") from None


# ----- authentication ---------------------------------------------------------------------------------------

class Authenticator(Protocol):
    """Who a request comes from (bearer tokens, for example)."""

    def owner(self, authorization: str | None) -> str:
        """The caller's owner name, or ApiError 401."""

    def allows(self, owner: str, path: str) -> bool:
        """True when this caller may use this path (/metrics names every owner's jobs)."""


@dataclass
class Component:
    """What one service brings to an app: routes, a lifespan yielding its request state, its own metrics
    registry, and a health check (returns a small dict; raises ApiError when unhealthy)."""

    name: str
    routes: list[BaseRoute]
    lifespan: Callable[[], AsyncContextManager[dict]] | None = None
    registry: CollectorRegistry | None = None
    health: Callable[[Request], Awaitable[dict]] | None = None
    extra: dict = field(default_factory=dict)


class EdgeMiddleware:
    """Before any route: refuse control characters in the path, authenticate (basic auth from the web
    config, bearer tokens from the authenticator) and put the caller's owner on request.state.owner (None
    when the service has no owners). /healthz is open: it is the one explicit health check. Paths under a
    self-checked prefix carry their own credential, which their route checks (a job run's secret)."""

    def __init__(self, app, web_config: WebConfig, authenticator: Authenticator | None, open_paths: tuple[str, ...],
                 self_checked: tuple[str, ...] = ()):
        self.app, self.web_config, self.authenticator, self.open_paths = app, web_config, authenticator, open_paths
        self.self_checked = self_checked
        self._password_checks = PasswordChecks(web_config)
        # Threads of their own for the checks PasswordChecks admits: in the shared pool a check could wait behind
        # slow routes' work while it held its slot, and new passwords were 503s meanwhile.
        self._check_threads = anyio.CapacityLimiter(PasswordChecks.MOST_AT_ONCE)
        self._checking: dict[str, anyio.Event] = {}       # a header -> its check under way (two at most)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            owner = await self._check(scope)
        except ApiError as error:
            response = error_response(error.status, error.code, error.message, error.headers)
            return await response(scope, receive, send)
        scope.setdefault("state", {})
        scope["state"]["owner"] = owner
        return await self.app(scope, receive, send)

    async def _check(self, scope) -> str | None:
        path = scope.get("path", "")
        if CONTROL_CHARACTERS.search(path):
            raise ApiError(400, "bad_request", "path: control characters are not allowed")
        if _cross_site(scope):
            raise ApiError(403, "forbidden", "a request from another site's page: refused (a browser sent it "
                                             "for a web page; call the API from a client, not a page)")
        if not self.web_config.users and self.authenticator is None and _rebound(scope):
            raise ApiError(403, "forbidden", "Host is not a loopback name on a loopback connection: refused (a web "
                                             "page whose name was made to point here; ask for 127.0.0.1 or "
                                             "localhost, or require credentials: `trainmetrics server --tokens`, or "
                                             "basic_auth_users in --web.config.file)")
        # One Authorization header (RFC 9110 allows no list of them): with two, the edge read the last and a
        # route that checks its own credentials (the job processes' internal one) the first.
        authorizations = [value for key, value in scope.get("headers") or [] if key == b"authorization"]
        if len(authorizations) > 1:
            raise ApiError(400, "bad_request", "more than one Authorization header")
        if path in self.open_paths or path.startswith(self.self_checked):
            return None
        authorization = authorizations[0].decode("latin-1") if authorizations else None
        if self.web_config.users:
            verdict = await self._password_verdict(authorization, (scope.get("client") or ("",))[0])
            if not verdict:
                raise ApiError(401, "unauthorized", "basic authentication required",
                               {"WWW-Authenticate": 'Basic realm="trainmetrics"'})
        if self.authenticator is None:
            return None
        owner = self.authenticator.owner(authorization)
        if not self.authenticator.allows(owner, path):
            raise ApiError(403, "forbidden", f"this token may not use {path[:100]}")
        return owner

    async def _password_verdict(self, authorization: str | None, address: str) -> bool:
        """Whether the header is let in; a header not known is checked in a worker thread (the event loop never
        runs bcrypt) when PasswordChecks admits it, else ApiError 503 at once: queued behind a flood of new wrong
        passwords, a new right one waited seconds, and each waiting request held its connection. A request whose
        header is being checked waits for that check's verdict: a client's parallel first requests were 503s but
        one or two."""
        checks = self._password_checks
        verdict = checks.known(authorization)
        if verdict is not None:
            return verdict
        under_way = self._checking.get(authorization)
        if under_way is not None:
            with anyio.move_on_after(SAME_CHECK_WAIT_SECONDS):
                await under_way.wait()
            verdict = checks.known(authorization)
            if verdict is None:
                raise _password_check_busy()
            return verdict
        slot = checks.admit(address)
        if slot is None:
            raise _password_check_busy()
        done = self._checking[authorization] = anyio.Event()
        try:    # (not abandoned on a cancel: the slot is given back when the check is over)
            verdict = await anyio.to_thread.run_sync(self.web_config.authorized, authorization,
                                                     limiter=self._check_threads)
        finally:
            checks.checked(slot, address, verdict)
            del self._checking[authorization]
            done.set()
        return verdict


def _password_check_busy() -> ApiError:
    return ApiError(503, "password_check_busy",
                    "password checks busy, or this address just failed one: retry after Retry-After",
                    {"Retry-After": str(int(FAILED_CHECK_BACKOFF))})


def _rebound(scope) -> bool:
    """True for a request that came in on a loopback address under a name that is not loopback (DNS rebinding):
    a page's name made to resolve to 127.0.0.1 makes the browser take the server for that page's own, Origin and
    Host alike, so _cross_site passes it, and without credentials it could read and change every job. Asked only
    of a server without them; a client on the machine asks for 127.0.0.1, ::1 or localhost (any port)."""
    server = scope.get("server")
    if not server or not _loopback(str(server[0])):
        return False
    for key, value in scope.get("headers") or []:
        if key == b"host":
            host = value.decode("latin-1")
            if host.startswith("["):            # [::1]:8000
                host = host[1:].partition("]")[0]
            elif host.count(":") == 1:          # name:port (more colons: an IPv6 address without a port)
                host = host.partition(":")[0]
            return not _loopback(host)
    return False        # no Host (HTTP/1.0): no browser


def _loopback(name: str) -> bool:
    """127.0.0.0/8, ::1, localhost and its subdomains (RFC 6761: never anything but this machine)."""
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _cross_site(scope) -> bool:
    """True for a request that changes something and that a browser sent for another site's page: its Origin
    is not this server (or is "null": a sandboxed or local page), or Sec-Fetch-Site says so. A page can make a
    browser send a bodiless POST (pause, cancel) or a plain-text one to any address, a loopback server
    without tokens included, with no preflight; browsers mark such requests, clients (curl, httpx,
    Prometheus) send neither header."""
    if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
        return False
    headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope.get("headers") or []}
    if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False
    return origin == "null" or origin.split("://", 1)[-1].rstrip("/").lower() != headers.get("host", "").lower()


class WithoutCreated:
    """A registry's families without the `_created` samples prometheus_client adds to its counters, histograms
    and summaries (each series' creation time, served as one more gauge per series). Only what this edge serves
    changes: prometheus_client.disable_created_metrics() would change every registry of the process."""

    TYPES = ("counter", "histogram", "summary", "gaugehistogram")

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        """The registry's families, each copied without its `_created` samples."""
        for family in self.registry.collect():
            if family.type in self.TYPES:
                created = family.name + "_created"
                family = copy.copy(family)
                family.samples = [sample for sample in family.samples if sample.name != created]
            yield family


# ----- the app ---------------------------------------------------------------------------------------------

def build_app(components: list[Component], *, web_config: WebConfig | None = None,
              authenticator: Authenticator | None = None) -> Starlette:
    """One Starlette app for the components: their routes, one /healthz over all their checks, one /metrics
    over all their registries, one lifespan running theirs, and the edge in front."""

    async def healthz(request: Request) -> JSONResponse:
        """GET /healthz: every component's check; 200 when all pass, else 503 naming what failed."""
        checked = [c for c in components if c.health is not None]

        async def run(component: Component) -> dict:
            try:
                async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS):
                    return {"status": "ok", **await component.health(request)}
            except ApiError as error:
                return {"status": "failing", "error": {"code": error.code, "message": error.message}}
            except TimeoutError:
                return {"status": "failing", "error": {"code": "timeout", "message":
                                                       f"no answer within {HEALTH_TIMEOUT_SECONDS:g}s"}}

        results = dict(zip((c.name for c in checked), await asyncio.gather(*(run(c) for c in checked))))
        healthy = all(result["status"] == "ok" for result in results.values())
        return JSONResponse({"status": "ok" if healthy else "failing", "checks": results},
                            status_code=200 if healthy else 503)

    async def metrics(request: Request) -> Response:
        """GET /metrics: the services' own metrics."""
        body = b"".join(generate_latest(WithoutCreated(c.registry)) for c in components if c.registry is not None)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with contextlib.AsyncExitStack() as stack:
            state: dict = {}
            for component in components:
                if component.lifespan is not None:
                    state.update(await stack.enter_async_context(component.lifespan()) or {})
            yield state

    routes = [route for component in components for route in component.routes]
    routes += [Route("/healthz", healthz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]
    middleware = [Middleware(EdgeMiddleware, web_config=web_config or WebConfig(), authenticator=authenticator,
                             open_paths=("/healthz",), self_checked=SELF_CHECKED_PREFIXES)]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS)
    app.state.components = {component.name: component for component in components}
    return app


# A stop waits this long for the requests under way, then cancels them and shuts down (the job server's
# shutdown pause of its jobs comes after): uvicorn's own wait has no end, and a client trickling a body
# (a byte every 20 s) held a SIGTERM off for as long as it liked, the jobs never asked to pause.
SHUTDOWN_DRAIN_SECONDS = 5


def answering_cut_requests(app: Starlette):
    """The app, with a request the stop cut (its task cancelled once the drain is over) answered in the one
    error shape, 503 and the connection closed, where it had no answer yet: uvicorn's own answer was a plain-text
    500, logged as an exception in the application. Only the stop cancels a request's task (a client that hangs
    up does not), so a cancellation that reaches here is one."""
    async def app_answering_cut_requests(scope, receive, send) -> None:
        started = False

        async def sending(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, sending)
        except asyncio.CancelledError:
            if scope["type"] != "http" or started:
                raise
            response = error_response(503, "shutting_down", "the service stopped before it could answer")
            response.headers["connection"] = "close"
            await response(scope, receive, send)

    return app_answering_cut_requests


def serve(app: Starlette, sock, web_config: WebConfig, on_ready: Callable[[], None] = lambda: None, *,
          client_idle_seconds: float | None = None) -> None:
    """Run an app under uvicorn on an already bound, listening socket, with the web config's TLS; on_ready()
    once it accepts requests. Until SIGINT/SIGTERM/SIGHUP; then it shuts down cleanly and returns (the process
    exits 0, as every trainmetrics server does). A client silent while its request is due is cut after
    client_idle_seconds (trainmetrics.client_timeout; its default when None)."""
    import signal

    import uvicorn

    from trainmetrics.client_timeout import CLIENT_IDLE_SECONDS, client_timeout_protocol

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                on_ready()

    config = uvicorn.Config(answering_cut_requests(app), log_level="warning", lifespan="on",
                            http=client_timeout_protocol(client_idle_seconds or CLIENT_IDLE_SECONDS),
                            timeout_graceful_shutdown=SHUTDOWN_DRAIN_SECONDS,
                            # The client is the connection's own address: uvicorn by default takes X-Forwarded-For
                            # from any client at 127.0.0.1, and a local client named a new address with each
                            # password guess (the backoff a failed check puts on its address held nothing back).
                            proxy_headers=False)
    config.load()
    if web_config.ssl_context is not None:
        # Ours, with the minimum version and client verification, and the pair the web config loaded: given the
        # paths before load(), uvicorn read the files again itself, and a renewal caught half-way then (its new
        # certificate written, the key not yet) was a KEY_VALUES_MISMATCH traceback instead of a service serving
        # the pair it had and the new one once whole. (The paths, set after: uvicorn says https from them.)
        config.ssl = web_config.ssl_context
        config.ssl_certfile, config.ssl_keyfile = web_config.cert_files
        web_config.watch_certificate()
    server = Server(config)
    # A stop signal before uvicorn has its own handlers must still stop it; and uvicorn re-raises the signal
    # it caught, once shut down, to the handler it found: this one, so the command returns its own exit code
    # instead of dying of the signal. (uvicorn takes SIGINT and SIGTERM only: SIGHUP stays with this one.)
    for signum in signals_to_take(SERVICE_STOP_SIGNALS):
        signal.signal(signum, lambda signum, frame: setattr(server, "should_exit", True))
    server.run(sockets=[sock])
