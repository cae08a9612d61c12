"""What every `trainmetrics` subcommand shares: one style of error (one line on stderr, exit 2, naming the flag
as typed), listen addresses, a listening socket bound once, the "listening on" line, and --help that says
each default once. Imports nothing heavy."""

import argparse
import errno
import fcntl
import os
import socket
import sys
import tempfile
from pathlib import Path

DEFAULT_ANALYTICS_PORT = 8000
DEFAULT_EXPORTER_PORT = 9105
DEFAULT_PROMETHEUS_PORT = 9090
# The largest answer the analytics read from Prometheus (analytics.prometheus says why there is one).
DEFAULT_MAX_ANSWER_BYTES = 64 << 20
# How far back the analytics find a job by id, and how long the exporter keeps an ended job's energy account:
# the deployed Prometheus' retention (deploy/docker-compose.yml: --storage.tsdb.retention.time=30d).
DEFAULT_LOOKBACK_DAYS = 30
EXIT_BAD_INPUT = 2


def path_argument(value: str) -> Path:
    """argparse's type for a path flag: an empty value is refused. Path("") is the current directory: an unset
    variable (`--data-dir "$DATA"`) put a server's database, datasets and jobs there, or had an exporter watch it."""
    if not value:
        raise argparse.ArgumentTypeError("empty: give a path (an unset shell variable?)")
    return Path(value)


class FlagError(Exception):
    """A flag's value cannot be used: reported as `trainmetrics CMD: error: FLAG: message`, exit 2."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}" if flag else message)
        self.flag = flag


# flock's errors on a file system that takes no locks (NFS without its lock daemon, some FUSE file systems).
NO_LOCKS_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


def lock_directory(flag: str, directory: Path, name: str, holder: str, locks_required: bool = True):
    """The directory's lock file `name`, opened and locked (flock, exclusive) for as long as it stays open; FlagError
    naming `flag` when another process holds it (`holder`, the kind of program that does) or when it cannot be
    opened or locked. On a file system that takes no locks, without `locks_required`, the file is returned
    unlocked: its caller runs unguarded there."""
    path = directory / name
    try:
        handle = open(path, "a")
    except OSError as error:
        raise FlagError(flag, f"{path}: {error.strerror or error}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if not locks_required and error.errno in NO_LOCKS_ERRNOS:
            return handle
        handle.close()
        why = f"another {holder} uses it" if isinstance(error, BlockingIOError) else error.strerror
        raise FlagError(flag, f"{directory}: {why}") from None
    return handle


def check_directory(flag: str, path: Path) -> None:
    """FlagError naming the flag unless `path` is a directory, or could be created as one: the path itself or
    the nearest of its parents that exists must be a directory, and none on the way a symbolic link to nothing.
    Checks only; creates nothing."""
    try:
        for part in (path, *path.parents):
            if part.is_symlink() and not part.exists():     # mkdir says "File exists" of it (or of what is in it)
                raise FlagError(flag, f"{str(part)!r} is a symbolic link to {os.readlink(part)!r}, which does not "
                                      "exist")
            if part.exists():
                if part.is_dir():
                    return
                where = "" if part == path else f" ({str(part)!r} is a file)"
                raise FlagError(flag, f"{str(path)!r} is not a directory{where}")
    except OSError as error:
        raise FlagError(flag, f"{str(path)!r}: {error.strerror or error}") from None


def check_writable(flag: str, shown: Path, directory: Path) -> None:
    """FlagError naming the flag unless `directory` takes a file (a temp file, gone at once, is written there):
    `shown`, what the flag named, goes in or under it."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise FlagError(flag, f"{str(shown)!r}: cannot write in {str(directory)!r}: {error.strerror or error}") \
            from None


def check_directory_writable(flag: str, path: Path) -> None:
    """check_writable for a directory that may not exist yet (after check_directory): it, or the nearest of its
    parents that exists, where it would be made, takes files."""
    existing = next(part for part in (path, *path.absolute().parents) if part.exists())
    check_writable(flag, path, existing)


def parse_listen(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse 'HOST:PORT', '[IPV6]:PORT', ':PORT' or 'PORT' into (host, port); raise ValueError on anything else.

    An IPv6 address goes in brackets: unbracketed, `::1` was read as host ':' and port 1 ("cannot listen on ::1: Name
    or service not known") and `::1:9400`, itself an IPv6 address, as [::1]:9400. Refused, with what to write."""
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]")
        if not sep or not port_text.startswith(":") or not host or "[" in host:
            raise ValueError(f"invalid listen address {value!r}: expected [IPV6]:PORT, e.g. [::1]:9400")
        port_text = port_text[1:]
    elif "[" in value or "]" in value:
        raise ValueError(f"invalid listen address {value!r}: expected HOST:PORT, or [IPV6]:PORT for an IPv6 "
                         "address")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = "", value
        if ":" in host:
            raise ValueError(f"invalid listen address {value!r}: an IPv6 address goes in brackets: write "
                             f"{_bracketed(value)}")
        host = host or default_host
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid listen address {value!r}: expected HOST:PORT with PORT in 0..65535")
    return host, int(port_text)


def _bracketed(value: str) -> str:
    """What to write for an IPv6 listen address given without brackets: `::1` is [::1]:PORT, `::1:9400` [::1]:9400
    (also an address of its own, [::1:9400]:PORT: said too)."""
    host, _, last = value.rpartition(":")
    whole = f"[{value}]:PORT"
    if last.isascii() and last.isdigit() and _ipv6(host):
        return f"[{host}]:{last}" + (f" (or {whole} if {value} is the address)" if _ipv6(value) else "")
    return whole


def _ipv6(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, text.partition("%")[0])     # fe80::1%eth0: its scope aside
    except (OSError, ValueError):
        return False
    return True


def reachable_address(listen_host: str, port: int) -> str:
    """HOST:PORT others use to reach a server listening on listen_host: the host itself, or this machine's
    name for a wildcard bind; an IPv6 host in brackets."""
    host = socket.getfqdn() if listen_host in ("", "0.0.0.0", "::") else listen_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_flag(flag: str, value: str) -> tuple[str, int]:
    """parse_listen for a flag: FlagError naming it."""
    try:
        return parse_listen(value)
    except ValueError as error:
        raise FlagError(flag, str(error)) from None


def listening_socket(flag: str, host: str, port: int) -> socket.socket:
    """A socket bound and listening on host:port, or FlagError naming the flag (address in use, no such
    address). SO_REUSEADDR: a server restarted after a crash binds at once, whatever TIME_WAIT is left; a
    live listener on the port still refuses the bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
    # it every small answer waits ~40 ms for the peer's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        reason = "address already in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
        raise FlagError(flag, f"cannot listen on {host}:{port}: {reason}") from None
    except OverflowError as error:
        sock.close()
        raise FlagError(flag, str(error)) from None
    return sock


def say_listening(command: str, scheme: str, host: str, port: int, path: str = "", extra: str = "") -> None:
    """The one line every server prints once it accepts connections: its URL (an IPv6 host in brackets)."""
    host = f"[{host}]" if ":" in host else host
    print(f"trainmetrics {command}: listening on {scheme}://{host}:{port}{path}{extra}", file=sys.stderr, flush=True)


def fail(command: str, message: str) -> int:
    """Report bad input in the one style; returns the exit code."""
    print(f"trainmetrics {command}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" where a default says something and the help text does not already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if isinstance(action, argparse.BooleanOptionalAction):
            # Python 3.11 appends its own "(default: %(default)s)"; say on/off once instead.
            text = text.replace(" (default: %(default)s)", "")
            return f"{text} (default: {'on' if default else 'off'})"
        # `is`, not `in`: 0 == False, and a default of 0 says something.
        if ("default" in text or default is None or default is False or default == "" or default == argparse.SUPPRESS
                or action.nargs == 0 or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: {default})"
