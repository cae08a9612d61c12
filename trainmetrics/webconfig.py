"""TLS and basic auth for every trainmetrics HTTP server, from a web-config file in the format of
Prometheus' exporter-toolkit (the same file node_exporter and Prometheus take with --web.config.file)::

    tls_server_config:
      cert_file: server.crt                 # paths relative to this file
      key_file: server.key
      client_ca_file: clients-ca.crt        # optional: verify client certificates
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12                    # default TLS12; TLS13 allowed
    basic_auth_users:
      prometheus: $2b$12$...                # bcrypt hashes (htpasswd -nBC 12 '' | tr -d ':\\n')

Imports nothing heavy; bcrypt only when basic auth is configured.
"""

import base64
import binascii
import hashlib
import logging
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainmetrics.command import FlagError
from trainmetrics.jobfiles import open_regular, read_named_file

log = logging.getLogger("trainmetrics.webconfig")

# How often a TLS server looks at its certificate, key and client CA files (a stat each, in a thread of its own:
# never per connection): a renewed certificate (cert-manager, certbot) is served this soon, with no restart.
CERTIFICATE_CHECK_SECONDS = 1.0
# A web config is a few settings and users' hashes (~70 bytes each): anything larger is no web config (a path
# mistyped to a log file, /dev/zero: read without end before).
MAX_WEB_CONFIG_BYTES = 4 << 20

# Refusals remembered (a client repeating a wrong password costs one bcrypt check), the oldest forgotten first.
MAX_REMEMBERED_REFUSALS = 4096
# Acceptances remembered, apart: only a right password enters, so no flood of wrong ones can push a scraper's
# out (in one table, 4096 new wrong passwords did, and the scraper's next request paid a bcrypt check again
# behind them). A handful a process: a user's header is one entry.
MAX_REMEMBERED_ACCEPTANCES = 64
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
# exporter-toolkit's settings that take a client certificate without verifying it: Python's TLS verifies every
# certificate it asks for against client_ca_file, so each made every client's handshake fail (a file that works
# for node_exporter served nothing here). Refused at the start instead, with what to use.
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
# The settings applied here. Any other is refused by name, exporter-toolkit's too (client_allowed_sans,
# cipher_suites, curve_preferences, inline cert/key/client_ca, headers): taken and ignored, a file limiting
# client certificates to some SANs let every certificate of its CA in, and a misspelt min_version stayed TLS12.
# (http2: HTTP/1.1 is spoken either way, which every client falls back to.)
SECTION_KEYS = {"tls_server_config": {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version",
                                      "max_version"},
                "http_server_config": {"http2"}}
# What bcrypt takes as a hash (its salt's 22nd character carries 2 bits: one of 4); any other raised on each
# request's check, a 500 for the right password and the wrong alike.
BCRYPT_HASH = re.compile(r"\$2[abxy]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{31}")
# The highest bcrypt cost taken (htpasswd's own highest): each step doubles a check's time, 8-16 s here at 17.
# A hash of cost 31 was taken, and its first check held a check slot for days (every new header a 503 behind it,
# the right password never let in).
MAX_BCRYPT_COST = 17
# bcrypt reads at most this many bytes of a password; bcrypt 5 raises past them (as Go's bcrypt refuses them).
BCRYPT_MAX_PASSWORD_BYTES = 72
# bcrypt checks (0.25-0.5 s of a core each at cost 12 on a 2-core VM) of headers not yet known, at most this many
# at once besides the one slot kept for addresses that failed no check (PasswordChecks): a flood of new wrong
# passwords costs at most two cores' checks, in a job's process or a service's.
SHARED_PASSWORD_CHECKS = 1
# After a failed check, an address gets no other for this long (a 503): one guessing from one address costs at
# most a check a second, and leaves the check free for other addresses (a new password's first request).
FAILED_CHECK_BACKOFF = 1.0
# The addresses whose last failed check is remembered (SUSPECT_SECONDS), at most: past it, the oldest is forgotten.
MAX_FAILED_ADDRESSES = 1024
# An address that failed a check within this long checks in the shared slot only; one that did not (a new
# trainer's first scrape, a Prometheus given a new password) has a slot of its own besides: a flood from 40
# addresses each failing once a second kept the shared one busy, and a new password was a 503 for as long as
# it lasted (the job never scraped). A flooding address takes that slot once in this long, at most.
SUSPECT_SECONDS = 60.0


@dataclass
class WebConfig:
    """What a server needs: an SSL context (None: plain HTTP) and basic-auth users (empty: no auth)."""

    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    cert_files: tuple[str, str] | None = None     # (cert, key), for servers that want paths
    _accepted: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _refused: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _watching: bool = field(default=False, repr=False)
    _served: tuple | None = field(default=None, repr=False)           # the files' identity when last loaded
    _refused_files: tuple | None = field(default=None, repr=False)    # an identity that did not load, said once
    _tls: tuple | None = field(default=None, repr=False)              # (tls_server_config, file): to load again
    _watched: tuple = field(default=(), repr=False)                   # the certificate, key and client CA files
    _served_validity: tuple | None = field(default=None, repr=False)  # the served certificate's (not before, after)
    _newest: ssl.SSLContext | None = field(default=None, repr=False)  # what the next handshakes are moved onto

    def secure(self, server) -> None:
        """Put a threaded socketserver's listening socket under TLS when configured. The handshake runs
        on the first read, in the request's own thread, not in the accept loop."""
        if self.ssl_context is not None:
            server.socket = self.ssl_context.wrap_socket(server.socket, server_side=True,
                                                         do_handshake_on_connect=False)
            self.watch_certificate()

    def watch_certificate(self) -> None:
        """Serve the certificate and key files as they are now, from the next handshake on, whenever they change
        (looked at every CERTIFICATE_CHECK_SECONDS by a thread of this config's own, started once): read once
        at the start, a renewed certificate was served only after a restart, the expired one until then.

        The served context is never changed (OpenSSL does not serialise changes to a context in use by other
        threads' handshakes): a changed pair is loaded into a new context of the same settings, and each
        handshake is moved onto the newest one as its ClientHello arrives (the server-name callback, which
        OpenSSL calls with a server name or without one: SSL_set_SSL_CTX, made for this)."""
        with self._lock:
            if self.ssl_context is None or self._tls is None or self._watching:
                return
            self._watching = True
            self._newest = self.ssl_context
            self.ssl_context.sni_callback = self._to_newest
        threading.Thread(target=self._watch_certificate, name="certificate-watch", daemon=True).start()

    def _to_newest(self, ssl_object, server_name, context) -> None:
        newest = self._newest
        if newest is not context:
            ssl_object.context = newest

    def _watch_certificate(self) -> None:
        while True:
            time.sleep(CERTIFICATE_CHECK_SECONDS)
            self.reload_certificate()

    def reload_certificate(self) -> bool:
        """A new context for the next handshakes when the certificate, key or client CA file changed since the
        newest was made; True when one was. A pair that does not load (a key that no longer fits: a renewal writes
        the two files one after the other; a file half written or empty) is said once and the newest context
        stays. It stays too while the served certificate is within its dates and the new one is not: one expired
        (a backup put back) never takes its place, one not valid yet (an issuer's clock ahead of ours, one put in
        place early) takes it from its notBefore on. Tried again at each look until it is served."""
        identity = _files_identity(self._watched)
        if identity == self._served or identity is None:
            return False
        cert = self.cert_files[0]
        try:
            context = _ssl_context(*self._tls)
        except (OSError, ValueError, ssl.SSLError) as error:
            self._refuse(identity, logging.ERROR, "the changed certificate or key is not served (the one loaded "
                                                  "before is): %s", error)
            return False
        validity, now = _certificate_validity(cert), time.time()
        if validity is not None and _valid_at(self._served_validity, now) and not _valid_at(validity, now):
            if validity[1] <= now:
                self._refuse(identity, logging.ERROR, "the changed certificate %s is not served: it expired at %s "
                             "(the one loaded before is, until %s)", cert, _utc(validity[1]),
                             _utc(self._served_validity[1]))
            else:
                self._refuse(identity, logging.WARNING, "the changed certificate %s is not valid until %s: the one "
                             "loaded before is served until then", cert, _utc(validity[0]))
            return False
        self._newest, self._served, self._served_validity = context, identity, validity
        log.info("serving the renewed certificate %s", cert)
        return True

    def _refuse(self, identity: tuple, level: int, message: str, *args) -> None:
        """Say why the files as they are now are not served, once for each state of them (not at each look)."""
        if identity != self._refused_files:
            self._refused_files = identity
            log.log(level, message, *args)

    def _credentials(self, header: str | None) -> tuple[str, bytes, bytes] | None:
        """(user, bcrypt hash, password) for a Basic Authorization header; None when it is not one. A user not
        configured gets a configured user's hash, which authorized() checks all the same and then refuses: an
        unknown name answered at once (and a known one after a bcrypt) told which user names exist."""
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        return user, self.users.get(user) or next(iter(self.users.values())), password.encode()

    def cached_verdict(self, header: str | None) -> bool | None:
        """True or False when known without bcrypt (no users, malformed, checked before); None
        when authorized() would have to run bcrypt."""
        if not self.users:
            return True
        credentials = self._credentials(header)
        if credentials is None:
            return False
        digest = self._digest(*credentials)
        with self._lock:
            if digest in self._accepted:
                self._accepted.move_to_end(digest)      # least recently used forgotten first
                return True
            return self._refused.get(digest)

    @staticmethod
    def _digest(user: str, hashed: bytes, password: bytes) -> bytes:
        return hashlib.sha256(repr((user, hashed, password)).encode()).digest()

    def authorized(self, header: str | None) -> bool:
        """True when no users are configured, or the Authorization header carries a known user's password.

        bcrypt is slow by design (~0.1-0.4 s); every verdict, good or bad, is remembered by a digest of the
        credentials (a bounded number of each, apart), so a scraper every 250 ms pays it once and a client
        repeating a wrong password does not cost a bcrypt each time. It runs bcrypt in the calling thread
        whenever the verdict is not known: a server bounds how many run at once (metrics_http, edge)."""
        verdict = self.cached_verdict(header)
        if verdict is not None:
            return verdict
        import bcrypt

        user, hashed, password = self._credentials(header)
        # A longer password is refused, not a 500: no one's (bcrypt never read past its 72nd byte when hashing).
        verdict = (len(password) <= BCRYPT_MAX_PASSWORD_BYTES and bcrypt.checkpw(password, hashed)
                   and user in self.users)
        remembered, bound = ((self._accepted, MAX_REMEMBERED_ACCEPTANCES) if verdict
                             else (self._refused, MAX_REMEMBERED_REFUSALS))
        with self._lock:
            remembered[self._digest(user, hashed, password)] = verdict
            while len(remembered) > bound:
                remembered.popitem(last=False)
        return verdict


class PasswordChecks:
    """Which Authorization headers not yet known get a bcrypt check now, for every server with basic auth (each
    job's /metrics and the services' edge). A known header (every request after a client's first) is answered
    from memory, never behind a check. An unknown one is checked only when no other check runs (or none in the
    slot of addresses that failed no check within SUSPECT_SECONDS), and only when its address failed none within
    FAILED_CHECK_BACKOFF; else `admit` says no, and the server answers 503 with Retry-After at once. Waiting for a
    check held a connection (and a thread) per waiting client: 40 clients sending a new wrong password each kept
    a job's every slot checking, and queued a new right password behind them for seconds at the edge."""

    MOST_AT_ONCE = SHARED_PASSWORD_CHECKS + 1      # the shared slots and the one of addresses without failures

    def __init__(self, web_config: WebConfig):
        self.web_config = web_config
        self._shared = threading.BoundedSemaphore(SHARED_PASSWORD_CHECKS)
        self._clean = threading.BoundedSemaphore(1)     # for addresses without a failed check (suspect)
        # Address -> when it last failed a check (kept SUSPECT_SECONDS), the oldest first.
        self._failed_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def known(self, header: str | None) -> bool | None:
        """The header's verdict when it needs no check (WebConfig.cached_verdict)."""
        return self.web_config.cached_verdict(header)

    def admit(self, address: str) -> threading.BoundedSemaphore | None:
        """A check slot for an unknown header from `address`, to give back through `checked`; None when it is
        not to be checked now."""
        now = time.monotonic()
        with self._lock:
            failed = self._failed_at.get(address)
        if failed is not None and failed + FAILED_CHECK_BACKOFF > now:
            return None
        if self._shared.acquire(blocking=False):
            return self._shared
        if (failed is None or failed + SUSPECT_SECONDS <= now) and self._clean.acquire(blocking=False):
            return self._clean
        return None

    def checked(self, slot: threading.BoundedSemaphore, address: str, verdict: bool | None) -> None:
        """The check in `slot` is over (verdict None: it did not finish); a refusal is held against its address."""
        slot.release()
        if verdict is not False:
            return
        now = time.monotonic()
        with self._lock:
            self._failed_at.pop(address, None)     # (re-inserted last: the dict is in order of failures)
            self._failed_at[address] = now
            for held in list(self._failed_at):     # those no longer suspect, and any past the bound
                if self._failed_at[held] + SUSPECT_SECONDS > now and len(self._failed_at) <= MAX_FAILED_ADDRESSES:
                    break
                del self._failed_at[held]

    def verdict(self, header: str | None, address: str) -> bool | None:
        """Whether the header is let in, checked in the calling thread when it must be; None when it was not
        checked (a 503)."""
        verdict = self.known(header)
        if verdict is not None:
            return verdict
        slot = self.admit(address)
        if slot is None:
            return None
        try:
            verdict = self.web_config.authorized(header)
        finally:
            self.checked(slot, address, verdict)
        return verdict


def load_web_config(path: Path | None) -> WebConfig:
    """Parse and check a web-config file; None gives plain HTTP without auth. Raises ValueError naming the
    problem (unknown key, missing file, bad TLS version)."""
    if path is None:
        return WebConfig()
    path = Path(path)
    try:
        raw = yaml.safe_load(read_named_file(path, MAX_WEB_CONFIG_BYTES)) or {}
    except OSError as error:
        raise ValueError(f"web config {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:     # its text spans lines (the line quoted, a caret): one line here
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"web config {path}: not YAML{where}: {getattr(error, 'problem', None) or error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"web config {path}: expected a mapping of settings")
    unknown = set(raw) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise ValueError(f"web config {path}: unknown key(s) {sorted(unknown)}")
    for section, settings in raw.items():
        if settings is not None and not isinstance(settings, dict):     # `[]` or `''` too: else no TLS, no auth
            raise ValueError(f"web config {path}: {section} must be a mapping")
        unknown = set(settings or {}) - SECTION_KEYS.get(section, set(settings or {}))
        if unknown:
            raise ValueError(f"web config {path}: {section}: unknown or unsupported key(s) {sorted(map(str, unknown))}")
    config = WebConfig()
    tls = raw.get("tls_server_config")
    if tls:
        # The files as they were before being read (what the first check compares with): taken when the watch
        # began, a pair renewed between this load and the server's start was never loaded (the one before
        # served until the next renewal, expired by then).
        pair = _pair_paths(tls, path)
        config._watched = (*pair, *_client_ca_path(tls, path))
        config._served = _files_identity(config._watched)
        config.ssl_context = _ssl_context(tls, path)        # (refuses a pair _pair_paths found no names for)
        config._tls = (tls, path)
        config.cert_files = tuple(map(str, pair))
        config._served_validity = _certificate_validity(config.cert_files[0])
    for user, hashed in (raw.get("basic_auth_users") or {}).items():
        if ":" in str(user):    # Basic auth's user name ends at its first colon: no request could name this one
            raise ValueError(f"web config {path}: basic_auth_users.{user}: a user name cannot hold ':'")
        if not isinstance(hashed, str) or not BCRYPT_HASH.fullmatch(hashed):
            raise ValueError(f"web config {path}: basic_auth_users.{user} must be a bcrypt hash ($2b$, $2y$...: "
                             "60 characters)")
        if int(hashed[4:6]) > MAX_BCRYPT_COST:
            raise ValueError(f"web config {path}: basic_auth_users.{user}: bcrypt cost {int(hashed[4:6])} is over "
                             f"{MAX_BCRYPT_COST} (each check would take 16 s to days): hash it again with "
                             "htpasswd -nBC 12")
        config.users[str(user)] = hashed.encode()
    return config


def web_config_flag(path: Path | str | None, flag: str = "--web.config.file") -> WebConfig:
    """load_web_config for a flag: FlagError naming it, for every problem (an ssl.SSLError, an OSError, from a
    key that does not fit its certificate too)."""
    try:
        return load_web_config(path)
    except (ValueError, OSError) as error:
        raise FlagError(flag, str(error)) from None


def _ssl_context(tls: dict, path: Path) -> ssl.SSLContext:
    """The server's TLS context from tls_server_config. Every problem is a ValueError naming the file and the
    setting: a certificate that does not load said only OpenSSL's words ("key values mismatch"), and a file
    name that was a number or a list was a TypeError's traceback."""
    def wrong(key: str, message: str) -> ValueError:
        return ValueError(f"web config {path}: tls_server_config.{key}: {message}")

    def file(key: str) -> str:
        name = tls[key]
        if not isinstance(name, str) or not name:
            raise wrong(key, f"must be a file name, got {name!r}")
        resolved = path.parent / name
        if not resolved.exists():
            raise wrong(key, f"{resolved} not found")
        try:    # (a directory, a file this user cannot read, a FIFO OpenSSL would wait on: said here, by name)
            os.close(open_regular(resolved, os.O_RDONLY, follow_symlinks=True))
        except OSError as error:
            raise wrong(key, f"{resolved}: {error.strerror or error}") from None
        return str(resolved)

    def choice(key: str, names: dict, default: str):
        value = tls.get(key, default)
        if not isinstance(value, str) or value not in names:     # (a list is no dict key: checked first)
            raise wrong(key, f"{value!r} is not one of {', '.join(names)}")
        return names[value]

    if "cert_file" not in tls or "key_file" not in tls:
        raise ValueError(f"web config {path}: tls_server_config needs cert_file and key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = choice("min_version", TLS_VERSIONS, "TLS12")
    if "max_version" in tls:
        context.maximum_version = choice("max_version", TLS_VERSIONS, "TLS13")
        if context.maximum_version < context.minimum_version:     # every handshake failed, the server up
            raise wrong("max_version", f"{tls['max_version']} is below min_version {tls.get('min_version', 'TLS12')}")
    client_auth = tls.get("client_auth_type", "NoClientCert")
    if client_auth in UNVERIFIED_CLIENT_AUTH:
        raise wrong("client_auth_type", f"{client_auth} is not supported (a client certificate is always verified "
                                        "here): use VerifyClientCertIfGiven or RequireAndVerifyClientCert with "
                                        "client_ca_file")
    context.verify_mode = choice("client_auth_type", CLIENT_AUTH, "NoClientCert")
    _load_key_pair(context, file("cert_file"), file("key_file"), wrong)
    if tls.get("client_ca_file"):
        ca_file = file("client_ca_file")
        try:
            context.load_verify_locations(ca_file)
        except ssl.SSLError as error:
            raise wrong("client_ca_file", f"{ca_file}: {_not_pem(ca_file, 'certificate', error)}") from None
        if context.verify_mode == ssl.CERT_NONE:
            # Taken, no client was asked for a certificate: a file meant for mutual TLS let every client in
            # (exporter-toolkit refuses it too: "Client CA's have been configured without a Client Auth Policy").
            raise wrong("client_auth_type", f"{client_auth} with client_ca_file asks no client for a certificate: "
                                            "use RequireAndVerifyClientCert or VerifyClientCertIfGiven")
    elif context.verify_mode == ssl.CERT_REQUIRED:
        raise wrong("client_auth_type", "RequireAndVerifyClientCert needs client_ca_file")
    return context


def _pair_paths(tls: dict, path: Path) -> list[Path]:
    """The certificate and key files named in tls_server_config; none when a name is missing or no file name
    (_ssl_context says which)."""
    names = [tls.get("cert_file"), tls.get("key_file")]
    return [path.parent / name for name in names] if all(isinstance(name, str) and name for name in names) else []


def _client_ca_path(tls: dict, path: Path) -> list[Path]:
    """The client CA file named in tls_server_config, watched with the pair (a CA added to it for a rotation of
    client certificates was taken only with the next renewed pair, or a restart); none when it names none."""
    name = tls.get("client_ca_file")
    return [path.parent / name] if isinstance(name, str) and name else []


def _files_identity(paths) -> tuple | None:
    """What tells a file's content changed without reading it (inode, size, modification and change times: a
    copy that keeps the source's modification time, a chmod that makes it readable, change the latter), for each
    path; None when one cannot be read (a renewal replacing it at this moment)."""
    try:
        return tuple((stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) for stat in map(os.stat, paths))
    except OSError:
        return None


def _certificate_validity(cert: str) -> tuple[float, float] | None:
    """(not before, not after) of the file's first certificate (the server's own), as Unix times; None when they
    cannot be told. (The ssl module decodes a certificate file only through this private function, which its
    own tests use; were it gone, a renewed certificate would be served whatever its dates, as before.)"""
    try:
        decoded = ssl._ssl._test_decode_cert(cert)
        return ssl.cert_time_to_seconds(decoded["notBefore"]), ssl.cert_time_to_seconds(decoded["notAfter"])
    except (AttributeError, KeyError, TypeError, ValueError, OSError):     # (ssl.SSLError is an OSError)
        return None


def _valid_at(validity: tuple[float, float] | None, now: float) -> bool:
    return validity is not None and validity[0] <= now < validity[1]


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _load_key_pair(context: ssl.SSLContext, cert: str, key: str, wrong) -> None:
    """Load the server's certificate and key, a problem blamed on the setting at fault (`wrong(key, message)`)."""
    def passphrase():       # else OpenSSL asked for it on the terminal, or failed with "[Errno 22] Invalid argument"
        raise wrong("key_file", f"{key} is encrypted: give a key without a passphrase")

    try:
        context.load_cert_chain(cert, key, password=passphrase)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise wrong("key_file", f"{key} does not match cert_file {cert}") from None
        try:        # the certificate alone: is it the one at fault?
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cert)
        except ssl.SSLError:
            raise wrong("cert_file", f"{cert}: {_not_pem(cert, 'certificate', error)}") from None
        raise wrong("key_file", f"{key}: {_not_pem(key, 'private key', error)}") from None


def _not_pem(path: str, what: str, error: ssl.SSLError) -> str:
    """Why a file gave no PEM `what`: empty (a renewal caught between creating and writing it), or OpenSSL's reason
    when it gives one (for most files it gives none: said as "(None)" before)."""
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty"
    except OSError:
        pass
    return f"no PEM {what}" + (f" ({error.reason})" if error.reason else "")
