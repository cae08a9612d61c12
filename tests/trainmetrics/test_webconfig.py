"""TLS, client certificates and basic auth from a web-config file, with real TLS clients against the real
exporter and job server processes."""

import base64
import contextlib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings

import bcrypt
import pytest

from trainmetrics.prometheus_process import free_port
from trainmetrics.webconfig import load_web_config


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(name: str, ca: str | None, cwd, san: str | None = None) -> None:
    """An EC key and a certificate for `name`, signed by `ca` (or self-signed)."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    extension = cwd / f"{name}.ext"
    extension.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    if ca is None:
        openssl("x509", "-req", "-in", f"{name}.csr", "-signkey", f"{name}.key", "-out", f"{name}.crt",
                "-days", "2", "-extfile", extension.name, cwd=cwd)
    else:
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", extension.name, cwd=cwd)


def live_pair_and_its_renewal(pki, directory) -> None:
    """In `directory`: the CA (its key too, to issue more), the server's pair as live.crt/live.key (what a web
    config names), and renewed.crt/renewed.key from the same CA (what a renewal writes over them)."""
    for name in ("ca.crt", "ca.key"):
        shutil.copy(pki / name, directory / name)
    shutil.copy(pki / "server.crt", directory / "live.crt")
    shutil.copy(pki / "server.key", directory / "live.key")
    issue("renewed", "ca", directory, san="IP:127.0.0.1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca", cwd=cwd)
    issue("server", "ca", cwd, san="IP:127.0.0.1")
    issue("client", "ca", cwd)
    issue("stranger", None, cwd)                    # a client certificate no trusted CA signed
    return cwd


PASSWORD = "s3cret-scraper"


def context(pki, client: str | None = None, max_version=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client:
        ctx.load_cert_chain(str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
    if max_version:     # an old client on purpose: Python warns that these versions are deprecated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = max_version
    return ctx


def get(url: str, ctx: ssl.SSLContext | None, user: str | None = None, password: str = PASSWORD):
    request = urllib.request.Request(url)
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    return urllib.request.urlopen(request, context=ctx, timeout=10)


def wait_until_listening(port: int, process: subprocess.Popen) -> None:
    import socket

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else "exited"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError("server did not start")


def test_exporter_serves_tls_with_basic_auth(pki, tmp_path):
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n"
                      f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "trainmetrics", "exporter", "--listen", f"127.0.0.1:{port}",
                                "--web.config.file", str(config), "--no-collector.gpu"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_listening(port, process)
        url = f"https://127.0.0.1:{port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as no_credentials:
            get(url, context(pki))
        assert no_credentials.value.code == 401
        no_credentials.value.close()
        for _ in range(2):                          # the second request takes the cached check
            with get(url, context(pki), "prometheus") as response:
                assert response.status == 200 and b"system_cpu_time_seconds_total" in response.read()
        # (after the right one: a failed check holds the address's next new password back for a second, a 503)
        with pytest.raises(urllib.error.HTTPError) as wrong:
            get(url, context(pki), "prometheus", "guess")
        assert wrong.value.code == 401
        wrong.value.close()
        with pytest.raises((ssl.SSLError, urllib.error.URLError)):
            get(url, context(pki, max_version=ssl.TLSVersion.TLSv1_1), "prometheus")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            get(f"http://127.0.0.1:{port}/metrics", None, "prometheus")     # plain HTTP is not spoken
    finally:
        process.terminate()
        process.communicate(timeout=20)


def test_job_server_requires_a_client_certificate_from_the_configured_ca(pki, tmp_path):
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n"
                      f"  client_ca_file: {pki / 'ca.crt'}\n  client_auth_type: RequireAndVerifyClientCert\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "trainmetrics", "server", "--listen", f"127.0.0.1:{port}",
                                "--data-dir", str(tmp_path / "data"), "--web.config.file", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_listening(port, process)
        url = f"https://127.0.0.1:{port}/api/training/jobs"
        with get(url, context(pki, client="client")) as response:
            assert response.status == 200
        for client in (None, "stranger"):
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                get(url, context(pki, client=client)).read()
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.mark.parametrize("text,message", [
    ("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n", "not found"),
    ("basic_auth_users:\n  a: plaintext\n", "bcrypt hash"),
    ("tls_config: {}\n", "unknown key"),
    ("basic_auth_users: {\n", "not YAML at line 2"),        # yaml's own text spans three lines
    # exporter-toolkit takes these without verifying the certificate; here every handshake failed, silently.
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  client_auth_type: RequireAnyClientCert\n",
     "RequireAnyClientCert is not supported"),
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  client_auth_type: RequestClientCert\n",
     "RequestClientCert is not supported"),
    # Accepted and ignored: every certificate of the CA let in, TLS 1.2 served, the header never sent.
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  client_allowed_sans: [ci-runner]\n",
     "client_allowed_sans"),
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  min_verison: TLS13\n",
     "min_verison"),
    ("http_server_config:\n  headers:\n    Strict-Transport-Security: max-age=63072000\n",
     "headers"),
    # bcrypt refused these hashes at each request's check: a 500 for every client, right password or not.
    ("basic_auth_users:\n  a: $2b$12$short\n", "bcrypt hash"),
    ("basic_auth_users:\n  a: $2b$04$" + "a" * 53 + "\n", "bcrypt hash"),
    ("basic_auth_users:\n  - a\n", "basic_auth_users must be a mapping"),       # was a traceback
    # Taken as no section at all: a file meant to require passwords (or TLS) served every client in the clear.
    ("basic_auth_users: []\n", "basic_auth_users must be a mapping"),
    ("tls_server_config: ''\n", "tls_server_config must be a mapping"),
    # Basic auth ends the user name at its first colon: no request could ever log this user in.
    ("basic_auth_users:\n  'ci:runner': $2b$04$" + "a" * 53 + "\n", "basic_auth_users.ci:runner: a user name"),
    # Taken: the first check of a new header held a check slot for days, every other new header a 503 behind it.
    ("basic_auth_users:\n  a: $2b$31$" + "a" * 21 + "u" + "a" * 31 + "\n", "basic_auth_users.a: bcrypt cost 31"),
])
def test_bad_web_configs_are_named(text, message, tmp_path):
    config = tmp_path / "web.yml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_web_config(config)
    result = subprocess.run([sys.executable, "-m", "trainmetrics", "exporter", "--web.config.file", str(config),
                             "--listen", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("settings,message", [
    ("cert_file: 5\n  key_file: {pki}/server.key", "tls_server_config.cert_file: must be a file name, got 5"),
    ("cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n  client_ca_file: [ca.crt]",
     "tls_server_config.client_ca_file: must be a file name"),
    ("cert_file: {pki}/server.crt\n  key_file: {pki}/client.key",
     "tls_server_config.key_file: {pki}/client.key does not match cert_file"),
    ("cert_file: {pki}/server.key\n  key_file: {pki}/server.key", "tls_server_config.cert_file: {pki}/server.key: no"),
    ("cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n  client_ca_file: {pki}/server.key",
     "tls_server_config.client_ca_file: {pki}/server.key: no PEM certificate"),
    ("cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n  min_version: TLS1.3",
     "tls_server_config.min_version: 'TLS1.3' is not one of"),
    ("cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n  min_version: TLS13\n  max_version: TLS12",
     "tls_server_config.max_version: TLS12 is below min_version TLS13"),
])
def test_a_bad_tls_setting_stops_the_program_with_one_line_naming_the_file_and_the_setting(pki, tmp_path, settings,
                                                                                          message):
    """A file name that was a number or a list was a TypeError's traceback (exit 1); a key that did not fit its
    certificate, or a CA file of no certificate, said only OpenSSL's words (`key values mismatch`), naming neither
    the file nor the setting; a misspelt version name said `unknown TLS setting 'TLS1.3'`, not which setting; a
    max_version below min_version was taken, and every handshake failed with the server up."""
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  " + settings.format(pki=pki) + "\n")
    result = subprocess.run([sys.executable, "-m", "trainmetrics", "exporter", "--web.config.file", str(config),
                             "--listen", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"web config {config}: " + message.format(pki=pki) in result.stderr


@pytest.mark.parametrize("policy", ["", "\n  client_auth_type: NoClientCert"], ids=["no policy", "NoClientCert"])
def test_a_client_ca_file_without_a_policy_asking_for_certificates_is_refused(pki, tmp_path, policy):
    """A client_ca_file with no client_auth_type (or NoClientCert) was taken and no client asked for a
    certificate: a file meant for mutual TLS served every client without one (exporter-toolkit refuses it)."""
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n"
                      f"  client_ca_file: {pki / 'ca.crt'}{policy}\n")
    with pytest.raises(ValueError, match=r"tls_server_config\.client_auth_type: NoClientCert with client_ca_file "
                                         r"asks no client for a certificate"):
        load_web_config(config)


def test_an_encrypted_key_file_is_named_instead_of_asking_for_its_passphrase(pki, tmp_path):
    """OpenSSL asked for the passphrase on the terminal (a service waited for it), or without one said only
    `[Errno 22] Invalid argument`."""
    openssl("ec", "-in", str(pki / "server.key"), "-out", "encrypted.key", "-aes256", "-passout", "pass:x",
            cwd=tmp_path)
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: encrypted.key\n")
    with pytest.raises(ValueError, match=r"tls_server_config\.key_file: .*encrypted\.key is encrypted"):
        load_web_config(config)


def test_a_job_serves_its_metrics_over_tls_with_basic_auth_and_announces_https(pki, tmp_path):
    from trainmetrics.trainer.metrics import JobMetrics
    from trainmetrics.trainer.telemetry import Publish

    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n"
                      f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    metrics = JobMetrics("tls-job-1", publish=Publish(targets_dir=tmp_path / "targets",
                                                      web_config=load_web_config(config), linger_timeout=0))
    try:
        url = f"https://127.0.0.1:{metrics.metrics_port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(url, context(pki))
        assert refused.value.code == 401
        refused.value.close()
        with get(url, context(pki), "prometheus") as response:
            assert re.search(rb'\ntrainer_job_state\{job_id="tls-job-1",run_id="[0-9a-f]{8}",state="queued"\} 1.0\n',
                             response.read())
        target = (tmp_path / "targets" / "tls-job-1.rank0.json").read_text()
        assert '"__scheme__": "https"' in target
    finally:
        metrics.close()


def test_wrong_passwords_never_push_a_right_one_out_of_memory(monkeypatch):
    """Every verdict shared one table, the oldest forgotten first: enough new wrong passwords pushed a scraper's
    out, and its next request paid a bcrypt check again, behind theirs. Acceptances are remembered apart, each
    table bounded (random headers cannot grow memory)."""
    from trainmetrics import webconfig

    monkeypatch.setattr(webconfig, "MAX_REMEMBERED_REFUSALS", 8)
    monkeypatch.setattr(webconfig, "MAX_REMEMBERED_ACCEPTANCES", 2)
    users = {name: bcrypt.hashpw(name.encode(), bcrypt.gensalt(rounds=4)) for name in ("a", "b", "c")}
    config = webconfig.WebConfig(users=users)

    def header(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    assert config.authorized(header("a", "a")) and config.authorized(header("b", "b"))
    for guess in range(20):
        assert not config.authorized(header("a", f"guess-{guess}"))
    assert config.cached_verdict(header("a", "a")) is True and config.cached_verdict(header("b", "b")) is True
    assert config.cached_verdict(header("a", "guess-19")) is False
    assert config.cached_verdict(header("a", "guess-0")) is None         # forgotten: 8 remembered
    assert config.cached_verdict(header("a", "a")) is True              # used last: b's is the one forgotten next
    assert config.authorized(header("c", "c")) and config.cached_verdict(header("b", "b")) is None
    assert len(config._refused) == 8 and len(config._accepted) == 2


def test_a_forged_forwarded_for_header_does_not_give_a_client_another_address(tmp_path):
    """uvicorn took X-Forwarded-For from any client at 127.0.0.1 (its default trusts that address as a proxy):
    every local client could name a new address with each guess, and the second a failed check holds its
    address back was no bound on the guesses. The address is the connection's own."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "trainmetrics", "analytics", "--listen", f"127.0.0.1:{port}",
                                "--web.config.file", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def status(password: str, forwarded_for: str | None = None) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
        request.add_header("Authorization", "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode())
        if forwarded_for:
            request.add_header("X-Forwarded-For", forwarded_for)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            error.close()
            return error.code

    try:
        wait_until_listening(port, process)
        assert status("guess-1") == 401
        assert status("guess-2", forwarded_for="203.0.113.9") == 503      # the same address: held back
    finally:
        process.terminate()
        process.communicate(timeout=20)


@pytest.mark.parametrize("client, counted", [("gave up", False), ("gave up as the answer came", False),
                                             ("kept its connection", True)])
def test_over_tls_an_answer_written_late_in_its_timeout_counts_only_when_its_scraper_stayed_for_it(
        pki, tmp_path, client, counted):
    """As over plain HTTP (test_metrics_http), with a scraper that gives up as Go's does: its TLS close_notify
    comes before its FIN, so bytes waiting on the connection are no sign that it stayed."""
    import socket

    from tests.trainmetrics.test_metrics_http import OK, slow_render
    from trainmetrics.metrics_http import SCRAPE_TIMEOUT_HEADER, MetricsHTTPServer

    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n")
    delivered = []
    server = MetricsHTTPServer(("127.0.0.1", 0), slow_render(0.7), web_config=load_web_config(config),
                               delivered=delivered.append).serve_in_background()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as connection:
            connection.sendall(OK + f"{SCRAPE_TIMEOUT_HEADER}: 1\r\n\r\n".encode())
            if client.startswith("gave up"):
                time.sleep(0.4 if client == "gave up" else 0.85)
                connection.settimeout(0.05)
                with pytest.raises((TimeoutError, ssl.SSLError, OSError)):
                    connection.unwrap()     # its close_notify, then (leaving the block) its FIN
                time.sleep(0.1)             # (apart: the one seen alone must not count as the scraper staying)
            else:
                assert connection.recv(4096).startswith(b"HTTP/1.1 200")
                time.sleep(1.0)
        time.sleep(0.3)
    finally:
        server.close()
    assert sum(scrape.counting for scrape in delivered) == (1 if counted else 0)


@pytest.mark.parametrize("scraper, counted", [("gave up", 1), ("waited for it", 2)])
def test_over_tls_an_answer_whose_scraper_hung_up_before_it_was_written_counts_none(
        pki, tmp_path, monkeypatch, scraper, counted):
    """As over plain HTTP (test_metrics_http): the connection's thread held back before its second request (the
    first made the handshake) until the scraper gave that one up as Go's does, its close_notify and its FIN."""
    import socket
    import threading

    from tests.trainmetrics.test_metrics_http import OK, gives_up_or_waits
    from trainmetrics import metrics_http
    from trainmetrics.metrics_http import SCRAPE_TIMEOUT_HEADER, MetricsHTTPServer

    release, requests = threading.Event(), []
    handle_one_request = metrics_http._Handler.handle_one_request

    def second_held_back(handler) -> None:
        requests.append(handler)
        if len(requests) == 2:
            release.wait(5)
        handle_one_request(handler)

    monkeypatch.setattr(metrics_http._Handler, "handle_one_request", second_held_back)
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n")
    delivered, closed = [], threading.Event()
    server = MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n", web_config=load_web_config(config),
                               delivered=delivered.append, closed=lambda name: closed.set()).serve_in_background()
    scrape = OK + f"{SCRAPE_TIMEOUT_HEADER}: 0.2\r\n\r\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as connection:
            connection.sendall(scrape)
            assert connection.recv(4096).startswith(b"HTTP/1.1 200")
            connection.sendall(scrape)
            gives_up_or_waits(connection, scraper, says_close_notify_and_closes, release)
        assert closed.wait(5)       # (the connection's thread is over: it counted the scrape or not)
    finally:
        release.set()
        server.close()
    assert sum(scrape.counting for scrape in delivered) == counted


def test_over_tls_a_scrapers_next_request_is_answered_while_its_last_answer_is_still_in_doubt(pki, tmp_path):
    """An answer written past half its scraper's timeout is in doubt until the scraper keeps its connection open
    past the timeout or asks again. Over TLS the wait read the kernel's TCP state only, so a next request that came
    meanwhile waited out the timeout too (Prometheus's 250 ms interval, 200 ms timeout: held up to 150 ms of it, and
    timed from after the wait): a scraper that gave it up then closed the connection, and neither its next answer
    nor the one it had read counted."""
    import socket

    from tests.trainmetrics.test_metrics_http import OK, read_answer
    from trainmetrics.metrics_http import SCRAPE_TIMEOUT_HEADER, MetricsHTTPServer

    renders = []

    def render(scrape) -> bytes:     # the first answer 0.7 s into its 1 s timeout, the next at once
        renders.append(scrape)
        time.sleep(0.7 if len(renders) == 1 else 0.0)
        return b"up 1\n"

    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n")
    delivered = []
    server = MetricsHTTPServer(("127.0.0.1", 0), render, web_config=load_web_config(config),
                               delivered=delivered.append).serve_in_background()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as connection:
            reader = connection.makefile("rb")
            answers = []
            for timeout in ("1", "0.25"):       # the second scraper's deadline well before the first's
                connection.sendall(OK + f"{SCRAPE_TIMEOUT_HEADER}: {timeout}\r\n\r\n".encode())
                connection.settimeout(float(timeout))   # it gives up as a scraper does: closing the connection
                try:
                    answers.append(read_answer(reader))
                except (TimeoutError, OSError):
                    break
            assert [answer[:12] for answer in answers] == [b"HTTP/1.1 200"] * 2
            time.sleep(0.5)
        time.sleep(0.3)
    finally:
        server.close()
    assert sum(scrape.counting for scrape in delivered) == 2


@pytest.mark.parametrize("sent", ["with the first", "with a first that fills the reader's buffer",
                                  "while the first is rendered"])
def test_over_tls_a_pipelined_next_request_is_answered_while_the_answer_before_it_is_still_in_doubt(
        pki, tmp_path, monkeypatch, sent):
    """As over plain HTTP (test_metrics_http). Over TLS a next request that came while the first was rendered is
    read too, by the look at the connection before the first's answer is written (did its scraper hang up?), and
    kept for the request's reader; one in the TLS record of a first as long as the reader's reads is left in
    OpenSSL's buffer. The wait over the first answer saw neither on the connection and held the next request
    unanswered to the end of the first's doubt."""
    import threading

    from tests.trainmetrics.test_metrics_http import FirstRenderHeld, both_answered_the_first_counted
    from trainmetrics import metrics_http
    from trainmetrics.metrics_http import MetricsHTTPServer

    monkeypatch.setattr(metrics_http, "CERTAIN_FRACTION", 0.0)
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n")
    render, delivered, closed = FirstRenderHeld(), [], threading.Event()
    server = MetricsHTTPServer(("127.0.0.1", 0), render, web_config=load_web_config(config),
                               delivered=delivered.append, closed=lambda name: closed.set()).serve_in_background()
    both_answered_the_first_counted(server, render, delivered, closed, lambda port: tls_connection(pki, port), sent)


@contextlib.contextmanager
def tls_connection(pki, port: int):
    """A client's TLS connection to the server on `port` (its certificate checked against the test CA)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as connection:
        yield connection


def says_close_notify_and_closes(connection) -> None:
    connection.settimeout(0.05)
    try:
        connection.unwrap()         # its close_notify (the server's own, which it waits for, never comes)
    except OSError:
        pass
    connection.close()


@pytest.mark.parametrize("hang_up", [ssl.SSLSocket.close, says_close_notify_and_closes])
def test_over_tls_a_request_whose_client_hung_up_while_it_waited_its_turn_is_not_rendered(pki, tmp_path, hang_up):
    """As over plain HTTP (test_metrics_http): a TLS connection's close cannot be peeked at in the kernel (its
    close_notify is bytes there, as a request is), so its records are read to tell, a next request's kept for it.
    Before, each request whose client had hung up was rendered when its turn came."""
    import socket

    from tests.trainmetrics.test_metrics_http import renders_past_clients_that_hung_up
    from trainmetrics.metrics_http import MetricsHTTPServer

    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n")
    server = MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n",
                               web_config=load_web_config(config)).serve_in_background()

    def connect() -> ssl.SSLSocket:
        return context(pki).wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=5),
                                        server_hostname="127.0.0.1")

    try:
        renders = renders_past_clients_that_hung_up(server, connect, hang_up)
    finally:
        server.close()
    assert renders == 2     # before: 6


@pytest.mark.parametrize("command", [["exporter", "--no-collector.gpu"],
                                     ["analytics", "--prometheus-url", "http://127.0.0.1:9"]])
def test_a_renewed_certificate_is_served_without_a_restart_and_a_half_renewed_pair_is_not(pki, tmp_path, command):
    """The certificate and key were read once, at the start: a renewed certificate (cert-manager, certbot) was
    served only after a restart, the expiring one until then. exporter-toolkit reads them on each request."""
    import socket

    live_pair_and_its_renewal(pki, tmp_path)
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  cert_file: live.crt\n  key_file: live.key\n  client_ca_file: ca.crt\n"
                      "  client_auth_type: RequireAndVerifyClientCert\n")
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "trainmetrics", command[0], "--listen",
                                    f"127.0.0.1:{port}", "--web.config.file", str(config), *command[1:]],
                                   stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def pem(path) -> str:      # as served() writes it
        return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(path.read_text()))

    def served() -> str:
        """The certificate a client with its own certificate is served (verified against the CA)."""
        with context(pki, client="client").wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                                       server_hostname="127.0.0.1") as connection:
            return ssl.DER_cert_to_PEM_cert(connection.getpeercert(binary_form=True))

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, f"{what} not seen: {log.read_text()}"
            time.sleep(0.1)

    try:
        wait_until_listening(port, process)
        assert served() == pem(pki / "server.crt")
        shutil.copy(tmp_path / "renewed.crt", tmp_path / "live.crt")        # the key not yet: they do not fit
        wait_for(lambda: "the changed certificate or key is not served" in log.read_text(), "the refusal")
        assert served() == pem(pki / "server.crt")
        shutil.copy(tmp_path / "renewed.key", tmp_path / "live.key")
        wait_for(lambda: served() == pem(tmp_path / "renewed.crt"), "the renewed certificate")
        with get(f"https://127.0.0.1:{port}/metrics", context(pki, client="client")) as response:
            assert response.status == 200
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):    # still asked for one
            get(f"https://127.0.0.1:{port}/metrics", context(pki, client="stranger")).close()
        assert log.read_text().count("is not served") == 1
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_a_certificate_renewed_between_loading_the_config_and_starting_the_server_is_served(pki, tmp_path):
    """The files' state the first check compared with was taken when the server started, after the pair had
    been read: a renewal in between (an exporter building its collectors, a service importing its app) was
    never loaded, and the certificate before it was served until the next renewal, expired by then."""
    import socket

    from trainmetrics.metrics_http import MetricsHTTPServer

    live_pair_and_its_renewal(pki, tmp_path)
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  cert_file: live.crt\n  key_file: live.key\n")
    web_config = load_web_config(config)
    shutil.copy(tmp_path / "renewed.crt", tmp_path / "live.crt")      # renewed before the server starts
    shutil.copy(tmp_path / "renewed.key", tmp_path / "live.key")
    server = MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n", web_config=web_config)
    server.serve_in_background()

    def served() -> str:
        with context(pki).wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10),
                                      server_hostname="127.0.0.1") as connection:
            return ssl.DER_cert_to_PEM_cert(connection.getpeercert(binary_form=True))

    renewed = ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert((tmp_path / "renewed.crt").read_text()))
    try:
        deadline = time.monotonic() + 15
        while served() != renewed:
            assert time.monotonic() < deadline, "the certificate renewed before the start is never served"
            time.sleep(0.1)
    finally:
        server.close()


def issue_dated(name: str, cwd, not_before: float, not_after: float) -> None:
    """A certificate for 127.0.0.1 signed by cwd's `ca`, valid between two Unix times (`openssl ca` sets both)."""
    (cwd / "ca.cnf").write_text("[ca]\ndefault_ca = dated\n[dated]\ndatabase = index.txt\nnew_certs_dir = .\n"
                                "serial = serial\ndefault_md = sha256\npolicy = anything\ncopy_extensions = copy\n"
                                "unique_subject = no\n[anything]\ncommonName = supplied\n")
    (cwd / "index.txt").touch()
    if not (cwd / "serial").exists():
        (cwd / "serial").write_text("1000\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1", cwd=cwd)
    openssl("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key", "-in", f"{name}.csr",
            "-out", f"{name}.crt", "-notext", "-startdate", time.strftime("%Y%m%d%H%M%SZ", time.gmtime(not_before)),
            "-enddate", time.strftime("%Y%m%d%H%M%SZ", time.gmtime(not_after)), cwd=cwd)


def served_certificate(ctx: ssl.SSLContext, port: int) -> str:
    """The certificate a verifying client is served (PEM); a verification failure raises."""
    import socket

    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                         server_hostname="127.0.0.1") as connection:
        return ssl.DER_cert_to_PEM_cert(connection.getpeercert(binary_form=True))


def as_served(path) -> str:
    return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(path.read_text()))


def wait_for(condition, what: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} not seen"
        time.sleep(0.1)


def test_a_renewed_certificate_out_of_its_dates_never_takes_a_valid_ones_place(pki, tmp_path, caplog):
    """Any pair that loaded was served: an expired certificate put in place (a backup restored, a renewal job
    copying the wrong file) replaced the valid one, and every verifying client (Prometheus) failed until a person
    noticed; one not valid yet (an issuer's clock ahead) failed every client until its time. Now the valid one
    stays, each said once however many clients connect; the one not valid yet is served from its time on. An empty
    file said `no PEM certificate (None)`."""
    import logging

    from trainmetrics.metrics_http import MetricsHTTPServer

    for name in ("ca.crt", "ca.key"):
        shutil.copy(pki / name, tmp_path / name)
    now = time.time()
    issue_dated("expired", tmp_path, now - 3 * 86400, now - 86400)
    issue_dated("valid", tmp_path, now - 3600, now + 86400)
    shutil.copy(tmp_path / "valid.crt", tmp_path / "live.crt")
    shutil.copy(tmp_path / "valid.key", tmp_path / "live.key")
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  cert_file: live.crt\n  key_file: live.key\n")
    caplog.set_level(logging.INFO, logger="trainmetrics.webconfig")
    server = MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n", web_config=load_web_config(config))
    server.serve_in_background()
    client = context(pki)

    def said(words: str) -> int:
        return sum(words in record.getMessage() for record in caplog.records)

    def serves_the_valid_one_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert served_certificate(client, server.port) == as_served(tmp_path / "valid.crt")
            time.sleep(0.05)

    try:
        (tmp_path / "live.crt").write_bytes(b"")        # a renewal caught between creating the file and writing it
        wait_for(lambda: said("live.crt: the file is empty") == 1, "the empty file")
        serves_the_valid_one_for(1.5)
        shutil.copy(tmp_path / "expired.crt", tmp_path / "live.crt")
        shutil.copy(tmp_path / "expired.key", tmp_path / "live.key")
        wait_for(lambda: said("is not served: it expired at") == 1, "the expired certificate's refusal")
        serves_the_valid_one_for(2.5)       # past two more looks at the files, each connection verified
        assert said("is not served: it expired at") == 1 and said("the file is empty") == 1

        issue_dated("soon", tmp_path, time.time() + 4, time.time() + 86400)
        shutil.copy(tmp_path / "soon.crt", tmp_path / "live.crt")
        shutil.copy(tmp_path / "soon.key", tmp_path / "live.key")
        wait_for(lambda: said("is not valid until") == 1, "the certificate not valid yet")
        serves_the_valid_one_for(1)
        wait_for(lambda: served_certificate(client, server.port) == as_served(tmp_path / "soon.crt"),
                 "the certificate once valid")
        assert said("is not valid until") == 1 and said("serving the renewed certificate") == 1
    finally:
        server.close()


def test_a_changed_client_ca_file_is_read_without_a_renewed_pair(pki, tmp_path):
    """The client CA file was read again only with a renewed server certificate: a CA added to it (client
    certificates moving to a new CA) let no client of the new CA in until the next renewal or a restart."""
    from trainmetrics.metrics_http import MetricsHTTPServer

    other = tmp_path / "other"
    other.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=new-client-ca", cwd=other)
    issue("client", "ca", other)
    shutil.copy(pki / "ca.crt", tmp_path / "clients.crt")
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n"
                      "  client_ca_file: clients.crt\n  client_auth_type: RequireAndVerifyClientCert\n")
    server = MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n", web_config=load_web_config(config))
    server.serve_in_background()
    new_client = context(pki)
    new_client.load_cert_chain(str(other / "client.crt"), str(other / "client.key"))

    def lets_in(ctx) -> bool:
        try:
            with get(f"https://127.0.0.1:{server.port}/metrics", ctx) as response:
                return response.status == 200
        except (ssl.SSLError, urllib.error.URLError, ConnectionError):
            return False

    try:
        assert lets_in(context(pki, client="client")) and not lets_in(new_client)
        (tmp_path / "clients.crt").write_text((pki / "ca.crt").read_text() + (other / "ca.crt").read_text())
        wait_for(lambda: lets_in(new_client), "the new CA's client let in")
        assert lets_in(context(pki, client="client")) and not lets_in(context(pki, client="stranger"))
    finally:
        server.close()


def test_a_service_started_while_its_pair_is_half_renewed_serves_the_pair_it_loaded(pki, tmp_path):
    """uvicorn was given the files' paths too, and read them again itself: a renewal caught half-way between the
    web config's load and the service's start (the new certificate written, its key not yet) was a
    KEY_VALUES_MISMATCH traceback and exit 1, not the loaded pair served and the new one once whole."""
    live_pair_and_its_renewal(pki, tmp_path)
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  cert_file: live.crt\n  key_file: live.key\n")
    port = free_port()
    script = (
        "import shutil, socket, sys\n"
        "from pathlib import Path\n"
        "from starlette.applications import Starlette\n"
        "from trainmetrics.edge import serve\n"
        "from trainmetrics.webconfig import load_web_config\n"
        "here = Path(sys.argv[1])\n"
        "web_config = load_web_config(here / 'web.yml')\n"
        "shutil.copy(here / 'renewed.crt', here / 'live.crt')\n"      # the key not yet
        "sock = socket.socket()\n"
        "sock.bind(('127.0.0.1', int(sys.argv[2])))\n"
        "sock.listen()\n"
        "serve(Starlette(), sock, web_config)\n")
    log = tmp_path / "service.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(port)], stdout=output,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until_listening(port, process)
        assert served_certificate(context(pki), port) == as_served(pki / "server.crt")
        wait_for(lambda: "does not match cert_file" in log.read_text(), "the half-renewed pair, said")
        assert served_certificate(context(pki), port) == as_served(pki / "server.crt")
        shutil.copy(tmp_path / "renewed.key", tmp_path / "live.key")
        wait_for(lambda: served_certificate(context(pki), port) == as_served(tmp_path / "renewed.crt"),
                 "the renewed pair")
    finally:
        process.terminate()
        process.wait(timeout=20)
