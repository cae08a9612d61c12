"""The OpenAPI 3.1 document of the analytics service: every route, parameter, response and schema."""

from analytics import scoring
from trainmetrics.names import JOB_ID_PATTERN

NUMBER_OR_NULL = {"type": ["number", "null"]}
STRING_OR_NULL = {"type": ["string", "null"]}
INTEGER_OR_NULL = {"type": ["integer", "null"]}
UNIX_TIME = {"type": ["number", "null"], "description": "unix seconds"}


def _object(properties: dict, description: str | None = None) -> dict:
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    if description:
        schema["description"] = description
    return schema


def _numbers(*names: str) -> dict:
    return {name: NUMBER_OR_NULL for name in names}


JOB_ROW = _object({
    "job_id": {"type": "string"}, "job_name": STRING_OR_NULL, "model": STRING_OR_NULL, "dataset": STRING_OR_NULL,
    "owner": STRING_OR_NULL, "device": STRING_OR_NULL, "status": {"type": "string"},
    "start_time": UNIX_TIME, "end_time": UNIX_TIME, "duration_seconds": NUMBER_OR_NULL,
    "total_samples": INTEGER_OR_NULL, "average_samples_per_second": NUMBER_OR_NULL, "final_loss": NUMBER_OR_NULL,
})

SCHEMAS = {
    "Error": _object({"error": _object({"code": {"type": "string"}, "message": {"type": "string"}})}),
    "JobAnalytics": _object({
        "job_id": {"type": "string"}, "job_name": STRING_OR_NULL, "model": STRING_OR_NULL,
        "dataset": STRING_OR_NULL, "owner": STRING_OR_NULL, "device": STRING_OR_NULL,
        "status": {"type": "string", "enum": ["queued", "running", "paused", "completed", "failed", "cancelled",
                                              "unknown"]},
        "error_type": STRING_OR_NULL, "start_time": UNIX_TIME, "end_time": UNIX_TIME,
        "evaluated_at": {"type": "number", "description": "unix seconds the analytics were computed at"},
        "duration": _object(_numbers("total_seconds", "total_minutes", "total_hours", "upload_seconds")),
        "performance": _object({"total_samples": INTEGER_OR_NULL, "total_steps": INTEGER_OR_NULL,
                                **_numbers("average_samples_per_second", "peak_samples_per_second"),
                                "peak_samples_per_second_at": UNIX_TIME, "average_step_seconds": NUMBER_OR_NULL}),
        "resource_utilization": _object({
            **_numbers("average_gpu_utilization_percent", "peak_gpu_utilization_percent"),
            "peak_gpu_utilization_at": UNIX_TIME,
            **_numbers("peak_gpu_memory_mb", "average_gpu_temperature_celsius", "average_cpu_percent",
                       "peak_cpu_percent"),
            "peak_cpu_at": UNIX_TIME, "peak_memory_mb": NUMBER_OR_NULL, "peak_memory_at": UNIX_TIME,
            "host": _object({
                "cpu": _object({**_numbers("baseline_percent", "average_percent", "increase_percent",
                                           "peak_percent"), "peak_at": UNIX_TIME}),
                "memory": _object({**_numbers("baseline_mb", "average_mb", "increase_mb", "peak_mb"),
                                   "peak_at": UNIX_TIME, "limit_mb": NUMBER_OR_NULL}),
            }, "The host under the job: the minute before it started (baseline) and during it."),
        }, "Percent of one CPU core for the job's process tree; MB are MiB (2^20 bytes)."),
        "checkpoints": _object({"count": INTEGER_OR_NULL}),
        "losses": _object(_numbers("initial", "final", "best", "reduction_percent", "final_eval_accuracy")),
        "efficiency": _object(_numbers("gpu_utilization_score", "throughput_score", "overall_score"),
                              scoring.__doc__.split("Efficiency, each score 0..100 (docs/api.md holds the same "
                                                    "text):", 1)[-1].strip()),
    }),
    "JobRow": JOB_ROW,
    "JobList": _object({"range_seconds": {"type": "number"}, "count": {"type": "integer"},
                        "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobRow"}}}),
    "Summary": _object({
        "range_seconds": {"type": "number"}, "evaluated_at": {"type": "number"}, "total_jobs": {"type": "integer"},
        "jobs_by_status": {"type": "object", "additionalProperties": {"type": "integer"}},
        **_numbers("average_duration_seconds", "total_training_seconds", "average_throughput_samples_per_sec"),
        "top_performing_jobs": {"type": "array", "maxItems": 5, "items": _object({
            "job_id": {"type": "string"}, "job_name": STRING_OR_NULL, "owner": STRING_OR_NULL,
            "status": {"type": "string"}, **_numbers("average_samples_per_second", "duration_seconds"),
            "total_samples": INTEGER_OR_NULL, "final_loss": NUMBER_OR_NULL})},
        "resource_trends": _object({
            "step_seconds": {"type": "number"},
            "series": {"type": "object", "additionalProperties": _object({
                **_numbers("average", "peak"),
                "points": {"type": "array", "items": {"type": "array", "prefixItems": [
                    {"type": "number"}, NUMBER_OR_NULL]}}})},
        }),
    }),
    "CompareRow": _object({
        "job_id": {"type": "string"}, "job_name": STRING_OR_NULL, "status": {"type": "string"},
        **_numbers("duration_seconds", "throughput", "peak_throughput"), "total_samples": INTEGER_OR_NULL,
        **_numbers("final_loss", "best_loss", "gpu_utilization", "average_cpu_percent", "peak_memory_mb",
                   "overall_score")}),
    "Comparison": _object({
        "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/CompareRow"}},
        "winner": _object({name: STRING_OR_NULL for name in scoring.CATEGORIES},
                          "Winning job id per category (first in request order among equals); fastest counts "
                          "completed jobs only; null when no job has the value."),
        "ties": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}},
                 "description": "For each tied category, every job id sharing the best value."},
    }),
    "Health": _object({"status": {"type": "string"}, "prometheus": {"type": "string"}}),
}


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
                                                       "max(0.25s, range/10000))"),
                               _param("owner", "query", "only this owner's jobs (the hosts' trends stay whole)"),
                               FORMAT],
                "responses": {"200": _ok("Summary", csv=True), "400": bad, **PROMETHEUS_ERRORS}}},
            "/api/training/analytics/compare": {"get": {
                "summary": "Side-by-side jobs and the winner per category",
                "parameters": [_param("job_ids", "query", "comma-separated job ids (1..10, no repeats)",
                                      required=True), FORMAT],
                "responses": {"200": _ok("Comparison", csv=True), "400": bad,
                              "404": _error("One of the jobs is not in Prometheus"), **PROMETHEUS_ERRORS}}},
            "/api/training/jobs": {"get": {
                "summary": "Jobs seen in Prometheus, filtered",
                "parameters": [
                    _param("status", "query", "one state", {"type": "string", "enum": [
                        "queued", "running", "paused", "completed", "failed", "cancelled"]}),
                    _param("owner", "query", "exact owner label"),
                    _param("since", "query", "unix seconds or ISO 8601: jobs still running at or after it"),
                    _param("until", "query", "unix seconds or ISO 8601: jobs started at or before it"),
                    _param("range", "query", "how far back to look (default: since, else 24h)"), FORMAT],
                "responses": {"200": _ok("JobList", csv=True), "400": bad, **PROMETHEUS_ERRORS}}},
            "/healthz": {"get": {"summary": "Is Prometheus ready?",
                                 "responses": {"200": _ok("Health"), **PROMETHEUS_ERRORS}}},
            "/metrics": {"get": {"summary": "The service's own metrics (Prometheus text format)",
                                 "responses": {"200": {"description": "OK",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": {"200": {"description": "OK",
                                                            "content": {"application/json": {}}}}}},
        },
        "components": {"schemas": SCHEMAS},
    }
