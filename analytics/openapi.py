"""The OpenAPI 3.1 document of the analytics service: every route, parameter, response and schema."""

from trainmetrics.analytics import shapes
from trainmetrics.contract import JOB_ID_PATTERN

# The edge's own answers (trainmetrics.edge builds them); every other schema is generated from shapes.py.
EDGE_SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    "Health": {"type": "object", "required": ["status", "checks"], "properties": {
        "status": {"type": "string", "enum": ["ok", "failing"]},
        "checks": {"type": "object", "additionalProperties": {"type": "object"}}}},
}
SCHEMAS = {**shapes.schemas(shapes.JobAnalytics, shapes.JobList, shapes.Summary, shapes.Comparison), **EDGE_SCHEMAS}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


PROMETHEUS_ERRORS = {
    "502": _error("Prometheus answered with an error the service did not expect (logged as a bug)"),
    "503": _error("Prometheus unreachable or not ready; Retry-After says when to try again"),
    "504": _error("Prometheus or the service ran out of time"),
}


def _param(name: str, where: str, description: str, schema: dict | None = None, required: bool = False) -> dict:
    return {"name": name, "in": where, "required": required, "description": description,
            "schema": schema or {"type": "string"}}


FORMAT = _param("format", "query", "json (default) or csv", {"type": "string", "enum": ["json", "csv"]})


def _ok(schema: str, csv: bool = False) -> dict:
    content = {"application/json": {"schema": _ref(schema)}}
    if csv:
        content["text/csv"] = {"schema": {"type": "string"}}
    return {"description": "OK", "content": content}


def openapi_document() -> dict:
    """The OpenAPI document served at /openapi.json."""
    bad = _error("A bad parameter; the message names it")
    return {
        "openapi": "3.1.0",
        "info": {"title": "trainmetrics analytics", "version": "0.1.0",
                 "description": "Training-job analytics computed with PromQL over the Prometheus HTTP API."},
        "paths": {
            "/api/training/{job_id}/analytics": {"get": {
                "summary": "Analytics of one job over its own start..end window",
                "parameters": [_param("job_id", "path", "the job's id",
                                      {"type": "string", "pattern": JOB_ID_PATTERN.pattern}, required=True)],
                "responses": {"200": _ok("JobAnalytics"), "400": bad, "404": _error("No such job in Prometheus"),
                              **PROMETHEUS_ERRORS}}},
            "/api/training/analytics/summary": {"get": {
                "summary": "Fleet summary over the last `range`",
                "parameters": [_param("range", "query", "duration, e.g. 30m, 24h, 7d (default 24h, at most 90d)"),
                               _param("step", "query", "trend resolution (default range/240; at least "
                                                       "max(1s, range/10000))"),
                               _param("owner", "query", "only this owner's jobs (the hosts' trends stay whole)"),
                               FORMAT],
                "responses": {"200": _ok("Summary", csv=True), "400": bad, **PROMETHEUS_ERRORS}}},
            "/api/training/analytics/compare": {"get": {
                "summary": "Side-by-side jobs and the winner per category",
                "parameters": [_param("job_ids", "query", "comma-separated job ids (1..10, no repeats)",
                                      required=True), FORMAT],
                "responses": {"200": _ok("Comparison", csv=True), "400": bad,
                              "404": _error("One of the jobs is not in Prometheus"), **PROMETHEUS_ERRORS}}},
            "/api/training/analytics/jobs": {"get": {
                "summary": "Jobs seen in Prometheus, filtered",
                "parameters": [
                    _param("status", "query", "one status", {"type": "string", "enum": list(shapes.STATES)}),
                    _param("owner", "query", "exact owner label"),
                    _param("since", "query", "unix seconds or ISO 8601: jobs still running at or after it"),
                    _param("until", "query", "unix seconds or ISO 8601: jobs started at or before it"),
                    _param("range", "query", "how far back to look (default: since, else 24h)"), FORMAT],
                "responses": {"200": _ok("JobList", csv=True), "400": bad, **PROMETHEUS_ERRORS}}},
            "/healthz": {"get": {"summary": "Is every part healthy (Prometheus ready)? Open without credentials",
                                 "responses": {"200": _ok("Health"), "503": {
                                     "description": "A check failed; the body says which",
                                     "content": {"application/json": {"schema": _ref("Health")}}}}}},
            "/metrics": {"get": {"summary": "The service's own metrics (Prometheus text format)",
                                 "responses": {"200": {"description": "OK",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": {"200": {"description": "OK",
                                                            "content": {"application/json": {}}}}}},
        },
        "components": {"schemas": SCHEMAS},
    }
