"""Hostile job ids and parameters on every endpoint that takes them, through the real services (standalone
analytics and the job server) in front of a capturing proxy to the real Prometheus.

tests/analytics/test_errors.py already checks job ids on the in-process analytics app with a MockTransport;
this adds: the job server (its job API paths, dataset and checkpoint names, the analytics it mounts), the
summary's range/step/owner, the job list's owner/status, invalid UTF-8, and the real HTTP path decoding of
uvicorn in front of both. A rejected request must reach Prometheus with nothing at all; an accepted free-text
filter (owner) must never appear in anything sent to Prometheus.
"""

import os
import re
import time
import urllib.parse

import httpx
import pytest

from trainmetrics.analytics.queries import quote_label_value
from trainmetrics.contract import MAX_NAME_LENGTH

HOSTILE: dict[str, bytes] = {name: value.encode() if isinstance(value, str) else value for name, value in {
    "quote": 'a"b',
    "backslash": "a\\b",
    "backslash quote": 'a\\"',
    "close matcher": 'x"}',
    "or vector": 'x"} or vector(1) or {job_id="',
    "or vector bare": "x or vector(1)",
    "single quote": "a'b",
    "backtick": "a`b`",
    "regex dot-star": ".*",
    "regex alternation": "a|b",
    "regex group": "(a)",
    "regex plus": "a+",
    "regex class": "[a-z]",
    "regex anchors": "^a$",
    "regex matcher": 'job_id=~".+"',
    "negative matcher": 'job_id!=""',
    "range selector": "a[5m]",
    "offset": "a offset 1d",
    "at modifier": "a @ 0",
    "brace": "a{b}",
    "comma": "a,b",
    "semicolon": "a;b",
    "shell": "$(id)",
    "percent": "a%b",
    "empty": "",
    "10 KB": "a" * 10240,
    "65 chars": "a" * 65,
    "NUL": "a\x00b",
    "newline": "a\nb",
    "carriage return": "a\rb",
    "tab": "a\tb",
    "space": "a b",
    "emoji": "job-🚀",
    "fullwidth": "ｊｏｂ",
    "arabic digit": "١٢٣",
    "right-to-left override": "a\u202eb",
    "invalid UTF-8": b"a\xff\xfeb",
    "lone continuation byte": b"\x80",
    "dot-dot": "..",
    "path": "../etc",
    "leading dash": "-x",
    "slash": "a/b",
}.items()}
assert len(HOSTILE) >= 30


def path_segment(value: bytes) -> str:
    """Every byte percent-encoded: the value reaches the router exactly (no dot-segment folding)."""
    return "".join(f"%{byte:02X}" for byte in value)


def query(**params: bytes | str) -> str:
    return "&".join(f"{key}={urllib.parse.quote_from_bytes(v if isinstance(v, bytes) else v.encode(), safe='')}"
                    for key, v in params.items())


DATASET_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")       # docs/api.md
# Free-text owners accepted (200) and proven absent from what reaches Prometheus: each costs real queries, so
# a representative few (the whole list runs under HARDENING_ALL_OWNERS=1).
OWNER_CASES = set(HOSTILE) if os.environ.get("HARDENING_ALL_OWNERS") else {
    "or vector", "close matcher", "backslash quote", "regex matcher", "NUL", "invalid UTF-8", "10 KB", "newline"}


def routable(value: bytes) -> bool:
    """Whether a router can match the value as one path segment at all (else 404 is the right answer)."""
    return value != b"" and b"/" not in value


def quiesce(proxy, quiet: float = 0.5) -> None:
    """Wait until nothing reached Prometheus for `quiet` seconds, then forget what did."""
    seen = -1
    while seen != len(proxy.requests):
        seen = len(proxy.requests)
        time.sleep(quiet)
    proxy.clear()


@pytest.fixture
def proxy(stack):
    stack.proxy.clear()
    return stack.proxy


def rejected(response: httpx.Response, json_error, value: bytes) -> None:
    if routable(value):
        json_error(response, 400)
    elif response.status_code == 307:          # Starlette's slash redirect: /jobs/ -> /jobs, no id parsed
        assert response.headers["location"].endswith("/api/training/jobs"), response.headers
    else:
        json_error(response, 400, 404)


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("service", ["analytics", "server"])
def test_analytics_routes_reject_hostile_job_ids(stack, proxy, json_error, request, service, name):
    value = HOSTILE[name]
    base = stack.analytics_url if service == "analytics" else stack.server_url
    with httpx.Client(base_url=base, timeout=30) as client:
        compare = client.get(f"/api/training/analytics/compare?{query(job_ids=b'hard-srv-1,' + value)}")
        if name == "comma":      # "a,b" is two valid ids: unknown jobs, 404 naming the first
            json_error(compare, 404)
            quiesce(proxy)       # the other ids' lookups may still be in flight after the 404
        else:
            json_error(compare, 400)
            assert proxy.requests == [], proxy.requests
        rejected(client.get(f"/api/training/{path_segment(value)}/analytics"), json_error, value)
    assert proxy.requests == []


def test_server_answers_json_for_a_job_id_with_a_newline(stack, json_error, request):
    """A line feed in the job id: 400 JSON from the standalone analytics and from the server."""
    json_error(httpx.get(f"{stack.analytics_url}/api/training/a%0Ab/analytics"), 400)
    json_error(httpx.get(f"{stack.server_url}/api/training/a%0Ab/analytics"), 400)



@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("service", ["analytics", "server"])
def test_summary_and_job_list_parameters(stack, proxy, json_error, request, service, name):
    value = HOSTILE[name]
    base = stack.analytics_url if service == "analytics" else stack.server_url
    with httpx.Client(base_url=base, timeout=30) as client:
        for parameter in ("range", "step"):
            json_error(client.get(f"/api/training/analytics/summary?{query(**{parameter: value})}"), 400)
        assert proxy.requests == [], proxy.requests
        json_error(client.get(f"/api/training/analytics/jobs?{query(status=value)}"), 400)
        assert proxy.requests == []
        if name not in OWNER_CASES:
            return
        # owner is free text of at most 200 characters (as a job's owner is): compared in Python, and
        # sent to Prometheus only through the one quoting function, as an equality matcher (the summary's job
        # trends).
        for path in ("/api/training/analytics/summary", "/api/training/analytics/jobs"):
            response = client.get(f"{path}?{query(owner=value, range='10m')}")
            if len(value) > MAX_NAME_LENGTH:
                json_error(response, 400)
                continue
            assert response.status_code == 200, (path, response.text[:300])
            if path.endswith("summary"):
                assert response.json()["total_jobs"] == 0
    decoded = value.decode(errors="replace")
    sent = [item.replace(f"{{owner={quote_label_value(decoded)}}}", "{owner=OWNER}") for item in stack.proxy.values()]
    if len(value) >= 2 and name not in ("regex dot-star",):
        assert not any(decoded in item for item in sent), (name, [s for s in sent if decoded in s][:3])


def test_server_job_list_rejects_an_unknown_state(stack, json_error):
    json_error(httpx.get(f"{stack.server_url}/api/training/jobs", params={"state": 'x"} or vector(1)'}), 400)


JOB_PATHS = [("GET", "/api/training/jobs/{}"), ("POST", "/api/training/jobs/{}/pause"),
             ("POST", "/api/training/jobs/{}/resume"), ("POST", "/api/training/jobs/{}/cancel"),
             ("GET", "/api/training/jobs/{}/checkpoints"), ("GET", "/api/training/jobs/{}/download/model"),
             ("GET", "/api/training/jobs/{}/download/checkpoints/step-000000001.pt")]


@pytest.mark.parametrize("name", HOSTILE)
def test_job_api_rejects_hostile_job_ids(stack, proxy, json_error, name):
    value = HOSTILE[name]
    with httpx.Client(base_url=stack.server_url, timeout=30) as client:
        for method, template in JOB_PATHS:
            rejected(client.request(method, template.format(path_segment(value))), json_error, value)
        if not value.isascii() or b"\x00" in value or value == b"":
            return        # NUL / non-ASCII: the paths above; "": test_an_explicit_empty_job_id_is_400
        submitted = client.post("/api/training/jobs", json={"job_id": value.decode(), "dataset": "blobs"})
        json_error(submitted, 400)
        json_error(client.post("/api/training/jobs", json={"dataset": value.decode()}), 400)
    assert proxy.requests == []


@pytest.mark.parametrize("name", HOSTILE)
def test_dataset_and_checkpoint_names(stack, json_error, request, name):
    value = HOSTILE[name]
    datasets = stack.data_dir / "datasets"
    before = sorted(p.name for p in datasets.iterdir())
    with httpx.Client(base_url=stack.server_url, timeout=30) as client:
        for suffix in (b"", b".csv", b".npz"):
            response = client.post(f"/api/training/datasets?{query(name=value + suffix)}",
                                   content=b"a,label\n1,0\n2,1\n")
            if response.status_code == 201:    # only a name the documented pattern allows; stored under an id
                assert DATASET_NAME.fullmatch(value + suffix) and suffix == b".csv", (name, response.text)
                assert response.json()["dataset_id"] + ".csv" not in before
                before.append(response.json()["dataset_id"] + ".csv")
                continue
            json_error(response, 400)
        checkpoint = client.get(f"/api/training/jobs/hard-srv-1/download/checkpoints/{path_segment(value)}")
        json_error(checkpoint, 400, 404)
        assert b"root:" not in checkpoint.content
    assert sorted(p.name for p in datasets.iterdir()) == sorted(before)


def test_a_rejected_request_is_answered_before_prometheus_and_valid_ids_are_quoted(stack, proxy, queries_safe):
    """The control: a valid request does reach Prometheus, with the id only as a quoted equality matcher."""
    # The killed job still reads "running" (no final state), so it is never served from the cache.
    response = httpx.get(f"{stack.analytics_url}/api/training/hard-kill-1/analytics", timeout=30)
    assert response.status_code == 200, response.text
    queries = proxy.queries()
    assert any('job_id="hard-kill-1"' in q for q in queries), queries
    queries_safe(queries)


def test_an_explicit_empty_job_id_is_400(stack, json_error):
    with httpx.Client(base_url=stack.server_url, timeout=60) as client:
        response = client.post("/api/training/jobs", json={"job_id": "", "dataset": "blobs", "epochs": 1})
        if response.status_code == 201:          # do not leave a job training under the rest of the suite
            client.post(f"/api/training/jobs/{response.json()['job_id']}/cancel")
        json_error(response, 400)
