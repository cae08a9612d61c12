"""How the analytics prove themselves to a backend that asks it, and check it: a bearer token read from a file
(re-read when the file changes), a CA to verify its certificate, and fixed headers (a tenant: Mimir's and Cortex's
X-Scope-OrgID). Basic auth is the --prometheus-url's user part (httpx sends it). Each is checked where it is given:
a flag error (FlagError) names what is wrong with it, and no token is ever logged or shown."""

import errno
import logging
import os
import re
import ssl
import threading
import time
from pathlib import Path

import httpx

from trainmetrics.command import FlagError
from trainmetrics.jobfiles import open_regular, read_named_file

log = logging.getLogger(__name__)

# A token file is a token and a line break: anything larger is no token file (a path mistyped to a log file).
MAX_TOKEN_BYTES = 64 * 1024
# A header value may not hold a line break (a header injected after it) nor other control characters.
TOKEN = re.compile(r"[\x21-\x7e]+")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")      # RFC 9110's token
HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")
# A token file that cannot be read while in use is logged at most this often (the last token read goes on).
UNREADABLE_LOG_SECONDS = 60.0


def read_token(path: Path) -> str:
    """The token in `path`, without the white space around it; ValueError or OSError saying why it is none."""
    try:
        content = read_named_file(path, MAX_TOKEN_BYTES)
    except OSError as error:
        if error.errno == errno.EFBIG:
            raise ValueError(f"is larger than {MAX_TOKEN_BYTES} bytes: no token file") from None
        raise
    token = content.decode("ascii", errors="replace").strip()
    if not token:
        raise ValueError("is empty")
    if not TOKEN.fullmatch(token):
        raise ValueError("holds characters no token has (white space, control or non-ASCII characters)")
    return token


class BearerTokenFile(httpx.Auth):
    """`Authorization: Bearer <the file's token>` on every request, the file read again when it changed (a
    Kubernetes service account's token is rotated about hourly; Prometheus reads its credentials_file for every
    request too). A file that cannot be read any more keeps the last token read (logged once a minute): the
    backend says whether it still holds."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen = self._identity()
        self._token = read_token(self.path)
        self._unreadable_logged = -float("inf")

    def _identity(self) -> tuple[int, int, int]:
        status = os.stat(self.path)
        return status.st_ino, status.st_mtime_ns, status.st_size

    def current(self) -> str:
        """The token, read again where the file changed since it was last read."""
        with self._lock:
            try:
                seen = self._identity()
                if seen != self._seen:
                    self._token, self._seen = read_token(self.path), seen
            except (OSError, ValueError) as error:
                if time.monotonic() - self._unreadable_logged >= UNREADABLE_LOG_SECONDS:
                    self._unreadable_logged = time.monotonic()
                    log.warning("--prometheus-bearer-token-file %s: %s; sending the token read before (logged "
                                "once a minute at most)", self.path, error)
            return self._token

    def auth_flow(self, request: httpx.Request):
        request.headers["Authorization"] = f"Bearer {self.current()}"
        yield request


def bearer_token_flag(path: str | None) -> BearerTokenFile | None:
    """--prometheus-bearer-token-file as the auth it sets; FlagError naming what is wrong with the file."""
    if path is None:
        return None
    try:
        return BearerTokenFile(Path(path))
    except OSError as error:
        raise FlagError("--prometheus-bearer-token-file", f"{path!r}: {error.strerror or error}") from None
    except ValueError as error:
        raise FlagError("--prometheus-bearer-token-file", f"{path!r} {error}") from None


def ca_file_flag(path: str | None) -> ssl.SSLContext | None:
    """--prometheus-ca-file as the TLS context that trusts the CA certificates in it (only them, as Prometheus'
    tls_config.ca_file); FlagError where it holds none."""
    if path is None:
        return None
    try:        # (OpenSSL opens it as any file: a FIFO held the start until something wrote to it)
        os.close(open_regular(Path(path), os.O_RDONLY, follow_symlinks=True))
    except FileNotFoundError:
        raise FlagError("--prometheus-ca-file", f"{path!r}: no such file") from None
    except OSError as error:
        raise FlagError("--prometheus-ca-file", f"{path!r}: {error.strerror or error}") from None
    try:
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or str(error)
        raise FlagError("--prometheus-ca-file", f"{path!r} holds no CA certificate in PEM ({reason})") from None


def header_flags(values: list[str]) -> dict[str, str]:
    """--prometheus-header 'Name: value' (repeatable) as headers; FlagError naming one that is not a header."""
    headers = {}
    for value in values:
        name, colon, content = value.partition(":")
        name, content = name.strip(), content.strip()
        if not colon or not HEADER_NAME.fullmatch(name) or not HEADER_VALUE.fullmatch(content):
            raise FlagError("--prometheus-header", f"{value[:80]!r} is not 'Name: value' (a header name, a value "
                                                   "without line breaks)")
        if name.lower() in ("authorization", "host", "content-length", "content-type", "accept-encoding"):
            raise FlagError("--prometheus-header", f"{name!r} is set by the analytics (a token: "
                                                   "--prometheus-bearer-token-file)")
        headers[name] = content
    return headers
