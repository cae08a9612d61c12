"""Schemathesis against the analytics OpenAPI, on the standalone analytics and on the job server (which
serves the same routes on its base URL), both over a real Prometheus holding real jobs.

Properties: no 5xx ever; every 4xx is JSON {"error": {"code": str, "message": str}}; every 2xx JSON answer
of the standalone service conforms to the documented response schema.

Bounded in `make test` (HARDENING_FUZZ_EXAMPLES, default 15 per operation and generation mode). The long
run (the `make fuzz` target):

    HARDENING_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest -q -p no:cacheprovider tests/hardening/test_fuzz.py
"""

import json
import os

import httpx
import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

EXAMPLES = int(os.environ.get("HARDENING_FUZZ_EXAMPLES", "15"))
OPERATIONS = ["GET /api/training/{job_id}/analytics", "GET /api/training/analytics/summary",
              "GET /api/training/analytics/compare", "GET /api/training/analytics/jobs", "GET /healthz", "GET /metrics",
              "GET /openapi.json"]


@pytest.fixture(scope="module")
def schema(stack):
    document = httpx.get(f"{stack.analytics_url}/openapi.json", timeout=10).json()
    loaded = schemathesis.openapi.from_dict(document)
    labels = {result.ok().label for result in loaded.get_all_operations()}
    assert labels == set(OPERATIONS), labels          # a new route must be added to the fuzzed list
    return loaded


def response_validator(document: dict, path: str):
    """A JSON Schema 2020-12 validator of the documented 200 JSON answer of `path`. (Our own: schemathesis
    4.32 rejects the document's valid 3.1 `prefixItems` when it validates responses.)"""
    ref = document["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    return jsonschema_rs.Draft202012Validator({"$ref": ref, "components": document["components"]})


def check(case, response, base_url: str, validator) -> None:
    where = f"{case.method} {base_url}{case.formatted_path} query={case.query!r}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.content[:300]!r}"
    if 400 <= response.status_code < 500:
        content_type = response.headers.get("content-type", [""])      # schemathesis: header -> list of values
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        assert content_type.startswith("application/json"), (where, response.headers)
        error = json.loads(response.content)["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str), (where, error)
    elif validator is not None and response.status_code == 200 and \
            str(response.headers.get("content-type", [""])).find("application/json") >= 0:
        errors = [error.message for error in validator.iter_errors(json.loads(response.content))]
        assert not errors, (where, errors[:5])


# Negative mode needs something to violate: an enum or a required parameter. The job id's path parameter is
# a plain string in the document (every string is "valid"), so positive mode already sends hostile ids.
NEGATABLE = ["GET /api/training/analytics/summary", "GET /api/training/analytics/compare",
             "GET /api/training/analytics/jobs"]
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + \
        [(label, GenerationMode.NEGATIVE) for label in NEGATABLE]


@pytest.mark.parametrize("label,mode", CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_fuzz_analytics_routes(schema, stack, base_url, label, mode, queries_safe):
    operation = schema.find_operation_by_label(label)
    if operation is None:
        pytest.fail(f"no operation {label}")
    validator = None
    if label not in ("GET /metrics", "GET /openapi.json") and \
            not (base_url == stack.server_url and label in ("GET /api/training/analytics/jobs", "GET /healthz")):
        # (the server's own job list and health shadow the analytics' on its base URL: docs/api.md)
        validator = response_validator(schema.raw_schema, label.split(" ", 1)[1])

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(base_url=base_url, timeout=30)
        check(case, response, base_url, validator)

    stack.proxy.clear()
    run()
    queries_safe(stack.proxy.queries())      # whatever was generated, Prometheus saw only quoted, valid ids
