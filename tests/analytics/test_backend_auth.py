"""A backend that wants proof: a gateway before a real Prometheus (as Mimir's, Thanos' behind an OAuth proxy, a
Kubernetes API proxy) serves TLS from a private CA and takes a request only with the bearer token of the moment and
the tenant header. The analytics reached no such backend: only basic auth (the URL's user part) and the usual CAs."""

import os
import ssl
import subprocess

import httpx
import pytest

from trainmetrics.prometheus_process import PrometheusServer

from tests.processes import analytics_service
from tests.prometheus_proxy import Relay

pytestmark = pytest.mark.slow


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A private CA and a certificate it signed for 127.0.0.1."""
    cwd = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=backend-ca", cwd=cwd)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            "gateway.key", "-out", "gateway.csr", "-subj", "/CN=gateway", cwd=cwd)
    (cwd / "gateway.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "gateway.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "gateway.crt", "-days", "2", "-extfile", "gateway.ext", cwd=cwd)
    return cwd


class Gateway(Relay):
    """TLS before a real Prometheus, forwarding only requests with `Authorization: Bearer <token>` and
    `X-Scope-OrgID: <tenant>` (401 otherwise); it records each request's headers."""

    def __init__(self, upstream: str, pki, token: str, tenant: str):
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(pki / "gateway.crt", pki / "gateway.key")
        super().__init__(upstream, tls)
        self.token, self.tenant, self.seen = token, tenant, []

    def relay(self, method: str, path: str, headers, body: bytes) -> tuple[int, str, bytes]:
        self.seen.append(dict(headers))
        if (headers.get("authorization"), headers.get("x-scope-orgid")) != (f"Bearer {self.token}", self.tenant):
            return 401, "text/plain", b"unauthorized\n"
        return self.forward(method, path, headers, body)


def analytics(*flags: str, log):
    """A real `trainmetrics analytics` process with these flags (and short timeouts); yields its base URL."""
    return analytics_service("--prometheus-timeout", "4", "--request-timeout", "5", *flags, stderr=log)


SUMMARY = "/api/training/analytics/summary?range=1h"


def test_a_backend_behind_tls_a_rotated_token_and_a_tenant_header_is_read(pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    with PrometheusServer(tmp_path / "prometheus") as prometheus, \
            Gateway(prometheus.url, pki, token="first-token", tenant="team-a").running() as gateway, \
            open(tmp_path / "analytics.log", "wb") as log:
        with analytics("--prometheus-url", gateway.url, log=log) as url:
            refused = httpx.get(url + SUMMARY, timeout=10)       # the usual CAs: the private one's certificate fails
            assert refused.status_code == 503 and "--prometheus-ca-file" in refused.text, refused.text
        flags = ("--prometheus-url", gateway.url, "--prometheus-ca-file", str(pki / "ca.crt"),
                 "--prometheus-bearer-token-file", str(token_file), "--prometheus-header", "X-Scope-OrgID: team-a")
        with analytics(*flags, log=log) as url:
            answer = httpx.get(url + SUMMARY, timeout=10)
            assert answer.status_code == 200, answer.text
            assert answer.json()["total_jobs"] == 0
            # The token is rotated (a Kubernetes secret's file is replaced): the next request sends the new one.
            rotated = tmp_path / "token.new"
            rotated.write_text("second-token")
            os.replace(rotated, token_file)
            gateway.token = "second-token"
            assert httpx.get(url + SUMMARY, timeout=10).status_code == 200
            # A token file gone keeps the token read before (the backend says whether it still holds).
            token_file.unlink()
            assert httpx.get(url + SUMMARY, timeout=10).status_code == 200
            # A token the backend no longer takes: the credentials named, not a query logged as our bug.
            gateway.token = "revoked"
            refused = httpx.get(url + SUMMARY, timeout=10)
            assert refused.status_code == 502 and "refused the analytics' credentials (401)" in refused.text
    assert {(headers.get("Authorization"), headers.get("X-Scope-OrgID")) for headers in gateway.seen} == {
        ("Bearer first-token", "team-a"), ("Bearer second-token", "team-a")}
    said = (tmp_path / "analytics.log").read_text()
    assert "first-token" not in said and "second-token" not in said
    assert said.count("--prometheus-bearer-token-file") == 1, said      # the file gone: said once
    assert "BUG" not in said, said
