"""The HTTP endpoints: parse and check parameters, call the reports (job, cache, fleet), answer JSON (or CSV
where a table fits)."""

import csv
import io
import math
import re
import time
from datetime import datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from trainmetrics.analytics import fleet, shapes
from trainmetrics.analytics import queries as q
from trainmetrics.analytics.cache import cached_job_analytics
from trainmetrics.analytics.openapi import openapi_document
from trainmetrics.analytics.prometheus import partial_answers
from trainmetrics.contract import MAX_NAME_LENGTH, validate_job_id
from trainmetrics.edge import ApiError

MAX_RANGE_SECONDS = 90 * 86400
MIN_RANGE_SECONDS = 0.001
DEFAULT_SUMMARY_RANGE = "24h"
DEFAULT_TREND_POINTS = 240
MAX_COMPARE_JOBS = 10
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class BadParameter(ApiError):
    """A request parameter is missing or out of range (400); the message names it."""

    def __init__(self, parameter: str, message: str):
        super().__init__(400, "bad_request", f"parameter {parameter!r}: {message}")
        self.parameter = parameter


def _settings(request: Request):
    return request.state.analytics_settings


def _owner(request: Request) -> str | None:
    """Whose jobs this request may see (None: everyone's)."""
    return _settings(request).owner_scope(request)


def _owner_filter(request: Request) -> str | None:
    """The owner whose jobs a fleet route shows: the caller's own with tokens, else the `owner` parameter."""
    owner = _owner(request) or request.query_params.get("owner")
    if owner is not None and len(owner) > MAX_NAME_LENGTH:      # (the summary sends it to Prometheus, quoted)
        raise BadParameter("owner", f"at most {MAX_NAME_LENGTH} characters, as a job's owner is")
    if owner == "":     # the table's filter read it as "owned by ''" (no job), PromQL's owner="" as "no owner"
        raise BadParameter("owner", "empty: name an owner, or leave the parameter out for everyone's jobs")
    return owner


# ----- parameters ---------------------------------------------------------------------------------------

def _job_id(request: Request) -> str:
    job_id = request.path_params["job_id"]
    try:
        return validate_job_id(job_id)
    except ValueError as error:
        raise BadParameter("job_id", str(error)) from None


def parse_duration(parameter: str, text: str, least: float = MIN_RANGE_SECONDS) -> float:
    """'90s', '15m', '24h', '7d', '1h30m' or plain seconds -> seconds in [least, 90 d]; BadParameter otherwise.
    PromQL's ranges are whole milliseconds: a shorter one than 1 ms was looked up as 1 ms and answered as asked."""
    text = text.strip()
    seconds = None
    bounds = f"{least:g}s" if least >= 1 else f"{least * 1000:g}ms"
    # float() would read other scripts' digits, and 1_000: the syntax is ASCII digits, a point and the units only
    if not text.isascii() or "_" in text:
        raise BadParameter(parameter, f"expected a duration like 30m, 24h or 7d ({bounds} to 90d), got {text[:80]!r}")
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if parts and "".join(number + unit for number, unit in parts) == text:
            seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds is None or not math.isfinite(seconds) or not least <= seconds <= MAX_RANGE_SECONDS:
        raise BadParameter(parameter, f"expected a duration like 30m, 24h or 7d ({bounds} to 90d), got {text[:80]!r}")
    return seconds


def parse_time(parameter: str, text: str) -> float:
    """Unix seconds or an ISO 8601 time with a zone -> unix seconds; BadParameter otherwise."""
    if not text.isascii() or "_" in text:       # float() reads 1_700_000_000 (as parse_duration says)
        raise BadParameter(parameter, f"expected unix seconds or an ISO 8601 time, got {text[:80]!r}")
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise BadParameter(parameter, f"expected unix seconds or an ISO 8601 time, got {text[:80]!r}") from None
        if parsed.tzinfo is None:
            raise BadParameter(parameter, f"ISO 8601 time needs a zone (Z or +HH:MM), got {text[:80]!r}")
        value = parsed.timestamp()
    if not math.isfinite(value) or value < 0:
        raise BadParameter(parameter, f"expected a time after 1970, got {text[:80]!r}")
    return value


def _only(request: Request, allowed: set[str]) -> None:
    for name in request.query_params:
        if name not in allowed:
            raise BadParameter(name, f"unknown parameter; this endpoint takes {', '.join(sorted(allowed)) or 'none'}")
        if len(request.query_params.getlist(name)) > 1:     # which one would count is anybody's guess
            raise BadParameter(name, "given more than once")


def _format(request: Request, tabular: bool) -> str:
    value = request.query_params.get("format", "json")
    allowed = ("json", "csv") if tabular else ("json",)
    if value not in allowed:
        raise BadParameter("format", f"expected one of {', '.join(allowed)}, got {value[:40]!r}")
    return value


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection): a job name is anybody's
# text ("=HYPERLINK(...)"), so such a text cell gets a leading apostrophe, which shows it as the text it is.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):     # as JSON spells it: Python's writer wrote `True`, a text no JSON reader knows
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


# The header that says whether a CSV answer is the JSON's `partial` (a CSV has no place of its own for it).
PARTIAL_HEADER = "Trainmetrics-Partial"


def _csv(table: list, shape: type, filename: str, partial: bool) -> Response:
    """Rows of a shape as CSV, one column per field; PARTIAL_HEADER says `true` where the backend answered with part
    of its data (as the JSON's `partial`: rows may be missing or short)."""
    out = io.StringIO()
    # RFC 4180's CRLF: Python's writer quotes only a cell that holds a character of its line end, and a bare CR in
    # a cell (a label is anybody's text) written unquoted ended the row there in a spreadsheet, the rest a new row.
    # Every text cell in quotes: a spreadsheet whose locale separates with ';' split an unquoted `x;=1+1` in two,
    # its second cell a formula that no leading apostrophe guarded.
    writer = csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_NONNUMERIC)
    columns = shapes.columns(shape)
    writer.writerow(columns)
    for row in table:
        writer.writerow(_cell(getattr(row, key)) for key in columns)
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": f'attachment; filename="{filename}"',
                             PARTIAL_HEADER: "true" if partial else "false"})


# ----- endpoints ----------------------------------------------------------------------------------------

async def job_analytics(request: Request) -> JSONResponse:
    """GET /api/training/{job_id}/analytics"""
    job_id = _job_id(request)
    _only(request, {"format"})
    _format(request, tabular=False)
    analytics = await cached_job_analytics(request.state.prometheus, request.state.cache, job_id,
                                           _settings(request).lookback, _owner(request), _settings(request).archive)
    return JSONResponse(shapes.plain(analytics))


async def summary(request: Request) -> Response:
    """GET /api/training/analytics/summary"""
    _only(request, {"range", "step", "owner", "format"})
    fmt = _format(request, tabular=True)
    # At least the window a rate is read over (a shorter range said "1ms to 90d", then "at least 1s").
    range_seconds = parse_duration("range", request.query_params.get("range", DEFAULT_SUMMARY_RANGE),
                                   least=q.PEAK_RATE_WINDOW_SECONDS)
    minimum_step = q.range_step(range_seconds)
    if "step" in request.query_params:
        step = parse_duration("step", request.query_params["step"])
        if step < minimum_step:
            raise BadParameter("step", f"at least {minimum_step:g}s for this range (the "
                                       f"{q.PEAK_RATE_WINDOW_SECONDS:g}s a rate is read over, and at most "
                                       f"{q.MAX_POINTS_PER_SERIES} points)")
        if step > range_seconds:      # its one point fell before the range, and the trends read 0
            raise BadParameter("step", f"at most the range ({range_seconds:g}s)")
        if round(step * 1000, 6) != round(step * 1000):     # the points are whole milliseconds apart
            raise BadParameter("step", f"a whole number of milliseconds, got {step:g}s")
    else:       # (whole milliseconds, as the grid's points are: the trends' sums times the step add up)
        step = math.ceil(max(minimum_step, range_seconds / DEFAULT_TREND_POINTS) * 1000) / 1000
    owner = _owner_filter(request)
    body = await fleet.summary(request.state.prometheus, range_seconds, step, owner,
                               recorded=_settings(request).recorded_series, lookback=_settings(request).lookback)
    if fmt == "csv":
        return _csv(body.top_performing_jobs, shapes.TopJob, "top_jobs.csv", body.partial)
    return JSONResponse(shapes.plain(body))


async def compare(request: Request) -> Response:
    """GET /api/training/analytics/compare?job_ids=a,b,c"""
    _only(request, {"job_ids", "format"})
    fmt = _format(request, tabular=True)
    raw = request.query_params.get("job_ids")
    if not raw:
        raise BadParameter("job_ids", "required: a comma-separated list of job ids")
    job_ids = [part.strip(" ") for part in raw.split(",")]     # "a, b"; other white space is no part of an id
    if len(job_ids) > MAX_COMPARE_JOBS:
        raise BadParameter("job_ids", f"at most {MAX_COMPARE_JOBS} jobs, got {len(job_ids)}")
    for job_id in job_ids:
        try:
            validate_job_id(job_id)
        except ValueError as error:
            raise BadParameter("job_ids", str(error)) from None
    duplicates = sorted({job_id for job_id in job_ids if job_ids.count(job_id) > 1})
    if duplicates:
        raise BadParameter("job_ids", f"listed more than once: {', '.join(duplicates)}")
    body = await fleet.compare(request.state.prometheus, request.state.cache, job_ids, _settings(request).lookback,
                               _owner(request), _settings(request).archive)
    if fmt == "csv":
        return _csv(body.jobs, shapes.CompareRow, "compare.csv", body.partial)
    return JSONResponse(shapes.plain(body))


async def jobs(request: Request) -> Response:
    """GET /api/training/analytics/jobs"""
    _only(request, {"status", "owner", "since", "until", "range", "format"})
    fmt = _format(request, tabular=True)
    params = request.query_params
    status = params.get("status")
    if status is not None and status not in shapes.STATES:
        raise BadParameter("status", f"expected one of {', '.join(shapes.STATES)}, got {status[:40]!r}")
    owner = _owner_filter(request)
    now = time.time()
    since = parse_time("since", params["since"]) if "since" in params else None
    until = parse_time("until", params["until"]) if "until" in params else None
    if since is not None and until is not None and until < since:
        raise BadParameter("until", "must not be before since")
    if "range" in params:
        range_seconds = parse_duration("range", params["range"])
    elif since is not None:
        range_seconds = max(now - since, 1.0)
        if range_seconds > MAX_RANGE_SECONDS:
            raise BadParameter("since", "at most 90 days ago")
    else:
        range_seconds = parse_duration("range", DEFAULT_SUMMARY_RANGE)
    with partial_answers() as partial:
        split = await fleet.recorded_split(request.state.prometheus, range_seconds, now,
                                           _settings(request).recorded_series)
        table = await fleet.job_list(request.state.prometheus, range_seconds, now, split, status, owner, since, until,
                                     _settings(request).lookback)
    if fmt == "csv":
        return _csv(table, shapes.JobRow, "jobs.csv", bool(partial))
    return JSONResponse(shapes.plain(shapes.JobList(range_seconds=range_seconds, count=len(table), jobs=table,
                                                    partial=bool(partial))))


async def openapi(request: Request) -> JSONResponse:
    """GET /openapi.json"""
    return JSONResponse(openapi_document())
