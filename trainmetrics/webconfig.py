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
import hmac
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "RequestClientCert": ssl.CERT_OPTIONAL,
               "RequireAnyClientCert": ssl.CERT_REQUIRED, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}


@dataclass
class WebConfig:
    """What a server needs: an SSL context (None: plain HTTP) and basic-auth users (empty: no auth)."""

    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    cert_files: tuple[str, str] | None = None     # (cert, key), for servers that want paths
    _verified: set = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def secure(self, server) -> None:
        """Put a threaded socketserver's listening socket under TLS when configured. The handshake runs
        on the first read, in the request's own thread, not in the accept loop."""
        if self.ssl_context is not None:
            server.socket = self.ssl_context.wrap_socket(server.socket, server_side=True,
                                                         do_handshake_on_connect=False)

    def authorized(self, header: str | None) -> bool:
        """True when no users are configured, or the Authorization header carries a known user's password.

        bcrypt is slow by design (~0.1-0.3 s); a successful check is remembered by a keyed digest of the
        credentials, so a scraper every 250 ms pays it once."""
        if not self.users:
            return True
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        digest = hashlib.sha256(hashed + b"\0" + password.encode()).digest()
        with self._lock:
            if digest in self._verified:
                return True
        import bcrypt

        if not bcrypt.checkpw(password.encode(), hashed):
            return False
        with self._lock:
            self._verified.add(digest)
        return True


def load_web_config(path: Path | None) -> WebConfig:
    """Parse and check a web-config file; None gives plain HTTP without auth. Raises ValueError naming the
    problem (unknown key, missing file, bad TLS version)."""
    if path is None:
        return WebConfig()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"web config {path}: {error}") from None
    unknown = set(raw) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise ValueError(f"web config {path}: unknown key(s) {sorted(unknown)}")
    config = WebConfig()
    tls = raw.get("tls_server_config")
    if tls:
        config.ssl_context = _ssl_context(tls, path.parent)
        config.cert_files = (str(path.parent / tls["cert_file"]), str(path.parent / tls["key_file"]))
    for user, hashed in (raw.get("basic_auth_users") or {}).items():
        if not isinstance(hashed, str) or not hashed.startswith("$2"):
            raise ValueError(f"web config {path}: basic_auth_users.{user} must be a bcrypt hash")
        config.users[str(user)] = hashed.encode()
    return config


def _ssl_context(tls: dict, base: Path) -> ssl.SSLContext:
    def file(key: str) -> str:
        resolved = base / tls[key]
        if not resolved.is_file():
            raise ValueError(f"web config: tls_server_config.{key} {resolved} not found")
        return str(resolved)

    if "cert_file" not in tls or "key_file" not in tls:
        raise ValueError("web config: tls_server_config needs cert_file and key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version = TLS_VERSIONS[tls.get("min_version", "TLS12")]
        if "max_version" in tls:
            context.maximum_version = TLS_VERSIONS[tls["max_version"]]
        context.verify_mode = CLIENT_AUTH[tls.get("client_auth_type", "NoClientCert")]
    except KeyError as error:
        raise ValueError(f"web config: unknown TLS setting {error}") from None
    context.load_cert_chain(file("cert_file"), file("key_file"))
    if tls.get("client_ca_file"):
        context.load_verify_locations(file("client_ca_file"))
    elif context.verify_mode == ssl.CERT_REQUIRED and tls.get("client_auth_type") == "RequireAndVerifyClientCert":
        raise ValueError("web config: RequireAndVerifyClientCert needs client_ca_file")
    return context


def basic_auth_middleware(app, config: WebConfig):
    """An ASGI wrapper answering 401 (with a JSON error) to requests without valid basic-auth credentials."""
    if not config.users:
        return app

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            if not config.authorized(authorization):
                body = b'{"error": {"code": "unauthorized", "message": "basic authentication required"}}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b'Basic realm="trainmetrics"'),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def serve_uvicorn(app, host: str, port: int, web_config: WebConfig) -> None:
    """Run an ASGI app under uvicorn with the web config's TLS context and basic auth."""
    import uvicorn

    cert, key = web_config.cert_files or (None, None)
    config = uvicorn.Config(basic_auth_middleware(app, web_config), host=host, port=port, log_level="warning",
                            lifespan="on", ssl_certfile=cert, ssl_keyfile=key)
    config.load()
    if web_config.ssl_context is not None:
        config.ssl = web_config.ssl_context     # ours, with the minimum version and client verification
    uvicorn.Server(config).run()
