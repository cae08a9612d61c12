"""Owners and their bearer tokens: a tokens file of `TOKEN OWNER` lines.

With tokens, every request but /healthz needs `Authorization: Bearer TOKEN`; each owner sees and touches only
their own datasets and jobs, and job ids are theirs by name: an owner's job ids start with `OWNER-`, so no
owner can claim, or probe for, another's. The reserved owner `@metrics` is a scraper's identity: it may read
/metrics (which lists every owner's queued and paused jobs) and the HTTP service discovery, and nothing else.
"""

import errno
import hashlib
import logging
import os
import re
import time
from pathlib import Path

from trainmetrics.edge import ApiError
from trainmetrics.jobfiles import read_named_file

METRICS_READER = "@metrics"
SCRAPER_PATHS = ("/metrics", "/api/training/sd")
OWNER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,31}$")
MIN_TOKEN_LENGTH = 16
TOKEN = re.compile(r"[\x21-\x7e]+")           # visible ASCII: what a header can carry as is
COMMENT = re.compile(r"(^|\s)#.*")
# Lines as an editor shows them: str.splitlines() also ends a line at a form feed, NEL (U+0085) or U+2028, and the
# rest of a comment holding one was read as a line of its own (a token commented out was in force).
LINE_BREAK = re.compile(r"\r\n|\r|\n")
# How often a request may look at the tokens file (one stat): a token removed or added takes effect this soon,
# with no restart (a restart pauses every running job).
RELOAD_CHECK_SECONDS = 1.0
# A tokens file is a line per owner: anything larger is no tokens file (a path mistyped to a log, a disk image), and
# it is read again on a request's thread when it changes (a 200 MB file held every request, /healthz too, for 4 s).
MAX_TOKENS_FILE_BYTES = 4 << 20

log = logging.getLogger(__name__)


def load_tokens(path: Path, *, none_allowed: bool = False) -> dict[bytes, str]:
    """A tokens file: one `TOKEN OWNER` per line, `#` comments (a whole line, or after a space). Raises
    ValueError naming the bad line, and when it holds no token unless none_allowed."""
    tokens: dict[bytes, str] = {}
    lines: dict[bytes, int] = {}
    owners: dict[str, str] = {}         # each owner by its name in lower case
    raw = _read_bounded(Path(path))
    try:
        # utf-8-sig: an editor's byte-order mark is not part of the first token.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        # (In the bytes the codec read: after a byte-order mark, which its positions leave out.)
        line = error.object.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte {error.object[error.start]:#04x})") from None
    for number, line in enumerate(LINE_BREAK.split(text), start=1):
        line = COMMENT.sub("", line).strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) < MIN_TOKEN_LENGTH or not TOKEN.fullmatch(parts[0]):
            raise ValueError(f"{path}: line {number}: expected 'TOKEN OWNER' with a token of {MIN_TOKEN_LENGTH}+ "
                             "visible ASCII characters (no spaces or control characters)")
        if parts[1] != METRICS_READER and not OWNER_NAME.fullmatch(parts[1]):
            raise ValueError(f"{path}: line {number}: owner {parts[1][:40]!r} must match {OWNER_NAME.pattern} "
                             f"(or be {METRICS_READER})")
        token = parts[0].encode()
        if token in lines:      # one token, two owners: whoever held it would act as the last one, unsaid
            raise ValueError(f"{path}: line {number}: the token of line {lines[token]} again: each owner needs a "
                             "token of its own")
        if (twin := owners.setdefault(parts[1].lower(), parts[1])) != parts[1]:
            # Their job ids (`OWNER-...`) would differ in case alone, and name one directory on a case-insensitive
            # file system: one owner's downloads and resumes would be the other's checkpoints.
            raise ValueError(f"{path}: line {number}: owner {parts[1]!r} and owner {twin!r} differ in case alone: "
                             "name them apart")
        tokens[token], lines[token] = parts[1], number
    if not tokens and not none_allowed:
        raise ValueError(f"{path}: no tokens")
    return tokens


def _read_bounded(path: Path) -> bytes:
    """The file's bytes, MAX_TOKENS_FILE_BYTES at most; ValueError for anything but a regular file (symlinks
    followed: a Kubernetes secret's file is one): jobfiles.read_named_file."""
    try:
        return read_named_file(path, MAX_TOKENS_FILE_BYTES)
    except OSError as error:
        if error.errno == errno.EINVAL:
            raise ValueError(f"{path}: not a regular file") from None
        if error.errno == errno.EFBIG:
            raise ValueError(f"{path}: larger than {MAX_TOKENS_FILE_BYTES >> 20} MiB: no tokens file") from None
        raise


def exposure(path: Path) -> str | None:
    """Why the tokens file is open to other users of the machine (group or others may read or write it, as a
    file made with the default umask is), or None."""
    mode = Path(path).stat().st_mode & 0o777
    if not mode & 0o077:
        return None
    return (f"--tokens {path}: other users of this machine may read or change it (mode {mode:04o}): whoever reads "
            "it can act as any owner; chmod 600 it")


class TokenAuth:
    """Bearer tokens to owners, found by their SHA-256 digests: the time a lookup takes tells nothing of a
    token (compared one by one, the first that matched answered soonest, and a length unlike every token's at
    once: which place a token held, and how long tokens are). Given its file, it reads the file again when it
    changes (looked at once a second at most, by the requests): a revoked token stops working within a second,
    the last one too (a file left with comments only, or empty, lets no one in). A changed file that cannot be
    read or has a bad line is said at error level and leaves the tokens in force as they were (an editor's
    half-written line would lock its owner out)."""

    def __init__(self, tokens: dict[bytes, str], path: Path | None = None):
        self._owners = _by_digest(tokens)
        self.path = path
        self._identity = _file_identity(path)
        self._checked_at = time.monotonic()
        self._exposed = _exposure_if_readable(path)      # (said at the start by the command)

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked_at < RELOAD_CHECK_SECONDS:
            return
        self._checked_at = now
        identity = _file_identity(self.path)
        if identity == self._identity:
            return
        self._identity = identity
        try:
            # None allowed: refused as "cannot be used", the file's last token commented out (or the file emptied)
            # to revoke it left it, and every other, in force.
            tokens = load_tokens(self.path, none_allowed=True)
            exposed = exposure(self.path)
        except (OSError, ValueError) as error:
            reason = f"{self.path}: {error.strerror}" if isinstance(error, OSError) else str(error)
            log.error("tokens file changed but cannot be used (%s): the tokens read before stay in force", reason)
            return
        self._owners = _by_digest(tokens)
        if tokens:
            log.info("tokens file %s read again: %d tokens", self.path, len(tokens))
        else:
            log.warning("tokens file %s read again: it holds no token, every request but /healthz is refused "
                        "until one is added", self.path)
        if exposed and exposed != self._exposed:    # a file put in its place with the default umask was not said
            log.warning("%s", exposed)
        self._exposed = exposed

    def owner(self, authorization: str | None) -> str:
        """The caller's owner, or ApiError 401 for a missing, unknown or malformed token."""
        self._reload_if_changed()
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer":
            owner = self._owners.get(_digest(token.strip().encode("utf-8", "replace")))
            if owner is not None:
                return owner
        raise ApiError(401, "unauthorized", "missing or unknown bearer token",
                       {"WWW-Authenticate": 'Bearer realm="trainmetrics"'})

    def allows(self, owner: str, path: str) -> bool:
        """The metrics reader reads /metrics and the service discovery (both name every owner's jobs) and
        nothing else; owners everything else."""
        return (path in SCRAPER_PATHS) == (owner == METRICS_READER)


def _exposure_if_readable(path: Path | None) -> str | None:
    try:
        return exposure(path) if path is not None else None
    except OSError:
        return None


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _by_digest(tokens: dict[bytes, str]) -> dict[bytes, str]:
    """Owners by their tokens' digests."""
    return {_digest(token): owner for token, owner in tokens.items()}


def _file_identity(path: Path | None) -> tuple[int, int, int, int] | None:
    """What changes when a file is written or replaced: inode, size, modification and change times."""
    try:
        info = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if info is None else (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def job_id_prefix(owner: str | None) -> str:
    """What an owner's job ids start with ("" without owners)."""
    return f"{owner}-" if owner else ""
