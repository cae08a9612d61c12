"""Every error path answers JSON {"error": {"code", "message"}}: bad input never reaches Prometheus, and a
stopped, paused, starting or misbehaving Prometheus maps to 503 / 504 / 502."""

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import struct
import threading
import time

import httpcore
import httpx
import pytest

from trainmetrics.analytics.app import Settings
from trainmetrics.analytics.prometheus import PrometheusClient, PrometheusError
from trainmetrics.prometheus_process import PrometheusServer

from .conftest import CapturingTransport, empty_vector, serve
from .test_queries import HOSTILE_IDS


def encoded(job_id: str) -> str:
    """Every byte percent-encoded, so the id reaches the route as it is (no dot-segment folding)."""
    return "".join(f"%{byte:02X}" for byte in job_id.encode())


@pytest.fixture(scope="module")
def capturing():
    transport = CapturingTransport(empty_vector)
    with serve(Settings(transport=transport)) as client:
        yield client, transport


def freeze(pid: int) -> None:
    """SIGSTOP the process and return once every thread of it is stopped: the signal is delivered to each thread
    as it next enters the kernel, and a Prometheus thread still running answered a request sent just after the
    kill (the paused-Prometheus test saw /healthz ok)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while True:
        states = set()
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{task}/stat") as stat:
                    states.add(stat.read().rpartition(")")[2].split()[0])
        if states <= {"T", "t"}:
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.005)


def assert_unhealthy(response: httpx.Response, code: str) -> None:
    """/healthz names the failing check: 503 with the Prometheus error's code."""
    assert response.status_code == 503, response.text
    check = response.json()["checks"]["prometheus"]
    assert response.json()["status"] == check["status"] == "failing" and check["error"]["code"] == code, check


def assert_error(response: httpx.Response, status: int, code: str, mentions: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and mentions in error["message"], error
    return error


@pytest.mark.parametrize("job_id", [v for v in HOSTILE_IDS.values() if v], ids=[k for k, v in HOSTILE_IDS.items() if v])
def test_hostile_job_ids_are_400_and_never_reach_prometheus(capturing, job_id):
    client, transport = capturing
    transport.requests.clear()
    response = client.get(f"/api/training/{encoded(job_id)}/analytics")
    if "/" in job_id:     # a decoded slash leaves the route: no job id was even parsed
        assert_error(response, 404, "not_found")
    elif any(ord(c) < 32 or ord(c) == 127 for c in job_id):    # the edge refuses it before any route
        assert_error(response, 400, "bad_request", "control characters")
    else:
        assert_error(response, 400, "bad_request", "'job_id'")
    assert_error(client.get("/api/training/analytics/compare", params={"job_ids": f"ok-1,{job_id}"}),
                 400, "bad_request", "'job_ids'")
    assert transport.requests == []


def test_an_empty_job_id_is_400_or_no_route(capturing):
    client, transport = capturing
    transport.requests.clear()
    assert_error(client.get("/api/training/analytics/compare", params={"job_ids": "a,,b"}), 400, "bad_request",
                 "'job_ids'")
    assert_error(client.get("/api/training//analytics"), 404, "not_found")
    assert transport.requests == []


BAD_PARAMETERS = {
    "range not a duration": ("/api/training/analytics/summary", {"range": "abc"}, "range"),
    "range too long": ("/api/training/analytics/summary", {"range": "100d"}, "range"),
    "range injection": ("/api/training/analytics/summary", {"range": "1h]) or vector(1"}, "range"),
    "step below the point limit": ("/api/training/analytics/summary", {"range": "30d", "step": "1s"}, "step"),
    "unknown format": ("/api/training/analytics/summary", {"format": "xml"}, "format"),
    "csv of one job": ("/api/training/run-1/analytics", {"format": "csv"}, "format"),
    "unknown parameter": ("/api/training/analytics/jobs", {"color": "red"}, "color"),
    "unknown status": ("/api/training/analytics/jobs", {"status": "exploded"}, "status"),
    "since not a time": ("/api/training/analytics/jobs", {"since": "yesterday"}, "since"),
    "since without zone": ("/api/training/analytics/jobs", {"since": "2026-01-01T00:00:00"}, "since"),
    "until before since": ("/api/training/analytics/jobs", {"since": "2000", "until": "1000"}, "until"),
    "job_ids missing": ("/api/training/analytics/compare", {}, "job_ids"),
    "job_ids too many": ("/api/training/analytics/compare", {"job_ids": ",".join(f"j{i}" for i in range(11))},
                         "job_ids"),
    "job_ids repeated": ("/api/training/analytics/compare", {"job_ids": "a,b,a"}, "job_ids"),
    "a parameter given twice": ("/api/training/analytics/summary", [("range", "1h"), ("range", "2h")], "range"),
    # The summary's trends were wrong or its figures at odds with them (the three below answered 200).
    "step past the range": ("/api/training/analytics/summary", {"range": "1h", "step": "90d"}, "step"),
    "step between milliseconds": ("/api/training/analytics/summary", {"range": "30m", "step": "1.0004"}, "step"),
    "range under a rate's window": ("/api/training/analytics/summary", {"range": "0.5s"}, "range"),
    "owner empty": ("/api/training/analytics/summary", {"range": "1h", "owner": ""}, "owner"),
    "owner empty in the job list": ("/api/training/analytics/jobs", {"owner": ""}, "owner"),
    "range with underscores": ("/api/training/analytics/summary", {"range": "1_000"}, "range"),
    # These two answered 200: the list looked back 1 ms and said 1e-09 s; 1_700_000_000 was read as a time.
    "a job list's range under a millisecond": ("/api/training/analytics/jobs", {"range": "1e-9"}, "range"),
    "since with underscores": ("/api/training/analytics/jobs", {"since": "1_700_000_000"}, "since"),
    "a job id with a newline": ("/api/training/analytics/compare", {"job_ids": "a\n,b"}, "job_ids"),
    "a job id with a tab": ("/api/training/analytics/compare", {"job_ids": "a,\tb"}, "job_ids"),
    "a job id with a no-break space": ("/api/training/analytics/compare", {"job_ids": "a\u00a0,b"}, "job_ids"),
}


@pytest.mark.parametrize("case", BAD_PARAMETERS, ids=list(BAD_PARAMETERS))
def test_bad_parameters_are_400_naming_the_parameter(capturing, case):
    client, transport = capturing
    path, params, parameter = BAD_PARAMETERS[case]
    transport.requests.clear()
    assert_error(client.get(path, params=params), 400, "bad_request", f"'{parameter}'")
    assert transport.requests == []


def test_a_summary_range_under_a_rates_window_says_the_least_range_at_once(capturing):
    """range=0s said "1ms to 90d", and 1ms then "at least 1s": two tries to learn the bound."""
    client, _ = capturing
    for too_short in ("0s", "1ms", "0.5"):
        assert_error(client.get("/api/training/analytics/summary", params={"range": too_short}), 400, "bad_request",
                     "(1s to 90d)")


def test_unknown_routes_and_methods_answer_json(capturing):
    client, _ = capturing
    assert_error(client.get("/api/nothing"), 404, "not_found")
    assert_error(client.post("/api/training/analytics/jobs"), 405, "method_not_allowed")


def test_unknown_job_asks_prometheus_with_a_quoted_id_only(capturing):
    client, transport = capturing
    transport.requests.clear()
    assert_error(client.get("/api/training/run-1/analytics"), 404, "not_found", "run-1")
    queries = transport.queries()
    assert queries and all('job_id="run-1"' in query for query in queries)
    assert all("=~" not in query for query in queries)


# ----- rare answers, through MockTransport ----------------------------------------------------------------

def answering(response_factory):
    def handler(request: httpx.Request) -> httpx.Response:
        return response_factory(request)
    return CapturingTransport(handler)


RARE_ANSWERS = {
    "plain-text 503 while starting": (
        lambda r: httpx.Response(503, text="Service Unavailable", headers={"content-type": "text/plain"}),
        503, "prometheus_unavailable"),
    "503 with Retry-After": (
        lambda r: httpx.Response(503, text="Service Unavailable", headers={"retry-after": "7"}),
        503, "prometheus_unavailable"),
    "query timeout": (
        lambda r: httpx.Response(503, json={"status": "error", "errorType": "timeout",
                                            "error": "query timed out in query execution"}),
        504, "prometheus_timeout"),
    "400 bad_data": (
        lambda r: httpx.Response(400, json={"status": "error", "errorType": "bad_data",
                                            "error": "1:1: parse error"}),
        502, "prometheus_bad_answer"),
    "422 execution": (
        lambda r: httpx.Response(422, json={"status": "error", "errorType": "execution",
                                            "error": "query processing would load too many samples"}),
        502, "prometheus_bad_answer"),
    "200 that is not JSON": (lambda r: httpx.Response(200, text="<html>proxy</html>"), 502, "prometheus_bad_answer"),
    # Success of a shape the readers cannot take (a 500 with a TypeError or AttributeError before).
    "success with data null": (lambda r: httpx.Response(200, json={"status": "success", "data": None}),
                               502, "prometheus_bad_answer"),
    "success with a string result": (
        lambda r: httpx.Response(200, json={"status": "success", "data": {"resultType": "string",
                                                                          "result": [1, "s"]}}),
        502, "prometheus_bad_answer"),
    "success with a value that is no number": (
        lambda r: httpx.Response(200, json={"status": "success", "data": {
            "resultType": "matrix" if "query_range" in r.url.path else "vector",
            "result": [{"metric": {"job_id": "run-1"},
                        **({"values": [[1, "oops"]]} if "query_range" in r.url.path else {"value": [1, "oops"]})}]}}),
        502, "prometheus_bad_answer"),
    # A time Python's JSON reads as NaN or infinite (NaN, 1e999) reached the summary's trends: a 500.
    "success with a time that is no number": (
        lambda r: httpx.Response(200, headers={"content-type": "application/json"}, content=json.dumps({
            "status": "success", "data": {
                "resultType": "matrix" if "query_range" in r.url.path else "vector",
                "result": [{"metric": {"job_id": "run-1"}, **({"values": [[math.nan, "1"]]}
                                                              if "query_range" in r.url.path
                                                              else {"value": [math.inf, "1"]})}]}}).encode()),
        502, "prometheus_bad_answer"),
    "500 from a proxy": (lambda r: httpx.Response(500, text="oops"), 502, "prometheus_bad_answer"),
    # Back-pressure (Mimir's query-frontend), and a proxy before Prometheus that cannot reach it, or not in time:
    # a 429 was a 502 logged as our bug, a proxy's 502 and 504 were 502s without Retry-After.
    "429 with Retry-After": (
        lambda r: httpx.Response(429, text="too many outstanding requests", headers={"retry-after": "7"}),
        503, "prometheus_unavailable"),
    "502 from a proxy": (lambda r: httpx.Response(502, text="<html>502 Bad Gateway</html>"),
                         503, "prometheus_unavailable"),
    "504 from a proxy": (lambda r: httpx.Response(504, text="<html>504 Gateway Time-out</html>"),
                         504, "prometheus_timeout"),
}


@pytest.mark.parametrize("case", RARE_ANSWERS, ids=list(RARE_ANSWERS))
def test_rare_prometheus_answers_map_to_gateway_errors(case, caplog):
    factory, status, code = RARE_ANSWERS[case]
    with serve(Settings(transport=answering(factory))) as client:
        for path in ("/api/training/run-1/analytics", "/api/training/analytics/summary", "/api/training/analytics/jobs",
                     "/api/training/analytics/compare?job_ids=a,b"):
            response = client.get(path)
            assert_error(response, status, code)
            if status == 503:
                expected = "7" if "Retry-After" in case else "5"
                assert response.headers["retry-after"] == expected
            else:
                assert "retry-after" not in response.headers
    bug_logged = any("BUG" in record.getMessage() and record.levelno == logging.ERROR for record in caplog.records)
    assert bug_logged == case.startswith(("400", "422"))


def test_a_slow_prometheus_is_504_at_the_client_deadline():
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return empty_vector(request)

    with serve(Settings(transport=httpx.MockTransport(slow), prometheus_deadline=0.3, service_deadline=2)) as client:
        began = time.monotonic()
        assert_error(client.get("/api/training/run-1/analytics"), 504, "prometheus_timeout")
        assert time.monotonic() - began < 1.5


def test_the_service_deadline_bounds_a_request_of_many_prometheus_calls():
    async def sluggish(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        return empty_vector(request)

    # Each call is within the client's deadline, but the endpoint as a whole is not.
    settings = Settings(transport=httpx.MockTransport(sluggish), prometheus_deadline=1, service_deadline=0.3,
                        max_concurrency=1)
    with serve(settings) as client:
        assert_error(client.get("/api/training/analytics/summary"), 504, "timeout")


def big_vector(series: int) -> bytes:
    """A vector answer of `series` series, as Prometheus writes it."""
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"__name__": "trainer_job_info", "job_id": f"job-{i:06d}"}, "value": [1.0, "1"]}
        for i in range(series)]}}).encode()


@pytest.mark.parametrize("declared", [True, False], ids=["with Content-Length", "streamed"])
def test_an_answer_past_max_answer_bytes_is_502_naming_the_flag(declared):
    """An answer was read whole, however large (a proxy's loop, a query over a fleet far larger than ours filled
    the service's memory): it is read up to --max-answer-bytes, refused at once when its length says more."""
    body = big_vector(30_000)
    assert len(body) > 2 << 20

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/-/ready":
            return empty_vector(request)
        if declared:
            return httpx.Response(200, content=body, headers={"content-type": "application/json"})

        async def chunks():
            for start in range(0, len(body), 65536):
                yield body[start:start + 65536]
        return httpx.Response(200, content=chunks(), headers={"content-type": "application/json"})

    with serve(Settings(transport=answering(handler), max_answer_bytes=1 << 20)) as client:
        assert_error(client.get("/api/training/analytics/summary"), 502, "prometheus_bad_answer",
                     "Prometheus answered more than 1048576 bytes (--max-answer-bytes)")

    async def read_within(limit: int) -> int:
        client = PrometheusClient("http://prometheus", transport=httpx.MockTransport(handler), max_answer_bytes=limit)
        try:
            return len(await client.query("trainer_job_info"))
        finally:
            await client.aclose()

    assert asyncio.run(read_within(len(body))) == 30_000
    with pytest.raises(PrometheusError, match="more than"):
        asyncio.run(read_within(len(body) - 1))


def test_an_answer_trickled_past_the_deadline_frees_its_slot():
    """httpx's timeouts bound each read: an answer that kept coming, a byte at a time, held its connection slot
    past the caller's deadline for as long as it came, and with every slot held every later request timed out."""
    trickling = [True]

    async def handler(request: httpx.Request) -> httpx.Response:
        if trickling and request.url.path != "/-/ready":
            trickling.clear()

            async def drip():
                yield b'{"status": "success", "data": {"resultType": "vector", "result": ['
                while True:
                    await asyncio.sleep(0.05)
                    yield b" "
            return httpx.Response(200, content=drip(), headers={"content-type": "application/json"})
        return empty_vector(request)

    settings = Settings(transport=httpx.MockTransport(handler), prometheus_deadline=0.5, service_deadline=5,
                        max_concurrency=1)
    with serve(settings) as client:
        assert_error(client.get("/api/training/run-1/analytics"), 504, "prometheus_timeout")
        assert_error(client.get("/api/training/run-1/analytics"), 404, "not_found")


def test_an_answer_whose_head_trickles_past_the_deadline_frees_its_slot():
    """A backend (or a proxy before it) that sends its answer's head a byte at a time, each within httpx's read
    timeout: that bounds each read only, so the request held its slot as long as the head came (200 s here),
    and every later request waited for it and timed out."""
    empty = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode()
    trickling = [True]

    def answer(connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536) or b"\r\n\r\n"
            if trickling:
                trickling.clear()
                for byte in b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-padding: " + b"a" * 1000:
                    connection.sendall(bytes([byte]))
                    time.sleep(0.2)
            connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                               b"content-length: %d\r\n\r\n%s" % (len(empty), empty))

    with socket.create_server(("127.0.0.1", 0)) as listener:
        answer_each_connection(listener, answer)
        settings = Settings(prometheus_url=f"http://127.0.0.1:{listener.getsockname()[1]}", prometheus_deadline=0.5,
                            service_deadline=5, max_concurrency=1)
        with serve(settings) as client:
            assert_error(client.get("/api/training/run-1/analytics"), 504, "prometheus_timeout")
            assert_error(client.get("/api/training/run-1/analytics"), 404, "not_found")


async def arrive_as_the_deadline_passes(late: float, busy: float) -> None:
    """Return in the event loop's turn in which the deadline passes, before its timer: the loop busy (a long
    callback) from `late` seconds on for `busy` seconds, the awaited bytes in before it ends."""
    loop = asyncio.get_running_loop()
    arrived = loop.create_future()

    def arrive() -> None:
        time.sleep(busy)
        arrived.set_result(None)
    loop.call_later(late, arrive)
    await arrived


@pytest.mark.parametrize("when", ["its connection opens", "its answer ends"])
def test_a_deadline_that_passes_as_a_connection_opens_or_its_answer_ends_leaves_the_slot_free(when):
    """The whole request's deadline cancels it inside httpx: a connection that httpcore opened but had not yet
    given the request (NEW), or one that had answered but not yet been released (ACTIVE), was owned by no request
    when cancelled there, and held its pool slot for good: every later request timed out."""
    body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    late = [when]

    class Stream(httpcore.AsyncMockStream):
        """A socket's: each read and write waits for the event loop; every request on it is answered."""

        async def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self._buffer = self._buffer or [head, body]
            await asyncio.sleep(0)

        async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            if late == ["its answer ends"] and self._buffer == [body]:
                late.clear()
                await arrive_as_the_deadline_passes(0.1, 0.3)
            else:
                await asyncio.sleep(0)
            return await super().read(max_bytes, timeout)

    class Backend(httpcore.AsyncMockBackend):
        async def connect_tcp(self, *args, **kwargs) -> httpcore.AsyncNetworkStream:
            if late == ["its connection opens"]:
                late.clear()
                await arrive_as_the_deadline_passes(0.1, 0.3)
            return Stream([])

    async def two_requests() -> list:
        transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        transport._pool._network_backend = Backend([])
        client = PrometheusClient("http://prometheus", deadline=0.2, max_concurrency=1, transport=transport)
        try:
            with pytest.raises(PrometheusError, match="did not answer"):
                await client.query("up")
            return await client.query("up")
        finally:
            await client.aclose()

    assert asyncio.run(two_requests()) == []


def test_a_large_answer_is_decoded_off_the_event_loop(monkeypatch):
    """JSON decoding is CPU (a 17 MB range answer: 0.7 s), and every other request of the service waited for it on the
    event loop."""
    from trainmetrics.analytics import prometheus as module

    threads = []

    class RecordingJson:
        @staticmethod
        def loads(content):
            threads.append(threading.current_thread())
            return json.loads(content)

    monkeypatch.setattr(module, "json", RecordingJson)
    sizes = {"small": 10, "large": 12_000}

    async def main():
        def handler(request: httpx.Request) -> httpx.Response:
            series = sizes[CapturingTransport.params(request)["query"]]
            return httpx.Response(200, content=big_vector(series), headers={"content-type": "application/json"})

        client = PrometheusClient("http://prometheus", transport=httpx.MockTransport(handler))
        try:
            return [len(await client.query(name)) for name in sizes]
        finally:
            await client.aclose()

    assert len(big_vector(sizes["large"])) > module.DECODE_IN_THREAD_BYTES > len(big_vector(sizes["small"]))
    assert asyncio.run(main()) == [10, 12_000]
    assert threads[0] is threading.main_thread() and threads[1] is not threading.main_thread()


# ----- a real Prometheus: stopped, paused, starting -------------------------------------------------------

@pytest.mark.slow
def test_a_stopped_prometheus_is_503_with_retry_after(prometheus):
    prometheus.stop()
    with serve(Settings(prometheus_url=prometheus.url)) as client:
        assert_unhealthy(client.get("/healthz"), "prometheus_unavailable")
        for path in ("/api/training/run-1/analytics", "/api/training/analytics/summary"):
            response = client.get(path)
            assert_error(response, 503, "prometheus_unavailable", "unreachable")
            assert int(response.headers["retry-after"]) > 0


@pytest.mark.slow
def test_a_paused_prometheus_is_504_within_the_deadline(prometheus):
    with serve(Settings(prometheus_url=prometheus.url, prometheus_deadline=1.0, service_deadline=2.0)) as client:
        assert client.get("/healthz").status_code == 200
        freeze(prometheus.process.pid)
        try:
            began = time.monotonic()
            assert_unhealthy(client.get("/healthz"), "prometheus_timeout")
            assert_error(client.get("/api/training/run-1/analytics"), 504, "prometheus_timeout")
            assert time.monotonic() - began < 4.0
        finally:
            os.kill(prometheus.process.pid, signal.SIGCONT)
        assert client.get("/healthz").status_code == 200


@pytest.mark.slow
def test_a_starting_prometheus_is_503_until_ready(tmp_path):
    server = PrometheusServer(tmp_path / "prometheus")
    answers = []
    with serve(Settings(prometheus_url=server.url)) as client:
        starter = threading.Thread(target=server.start)
        starter.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                response = client.get("/healthz")
                answers.append(response.status_code)
                if response.status_code == 200:
                    break
                assert_unhealthy(response, "prometheus_unavailable")
                time.sleep(0.01)
        finally:
            starter.join()
            server.stop()
    assert answers[-1] == 200 and 503 in answers


@pytest.mark.slow
def test_a_prometheus_killed_mid_request_is_503(prometheus):
    with serve(Settings(prometheus_url=prometheus.url, prometheus_deadline=5.0, service_deadline=8.0)) as client:
        assert client.get("/healthz").status_code == 200
        freeze(prometheus.process.pid)        # the request connects, then waits ...
        answers = []
        request = threading.Thread(target=lambda: answers.append(client.get("/api/training/run-1/analytics")))
        request.start()
        time.sleep(0.5)
        os.kill(prometheus.process.pid, signal.SIGKILL)        # ... and its connection dies under it
        request.join(timeout=10)
        prometheus.process.wait(timeout=10)
    assert answers, "no answer"
    assert_error(answers[0], 503, "prometheus_unavailable")
    assert int(answers[0].headers["retry-after"]) > 0


@pytest.mark.slow
def test_a_frozen_prometheus_under_a_burst_recovers_within_one_deadline(prometheus):
    """Prometheus frozen (SIGSTOP) under 200 uncached requests: each answers 504; once it runs again the
    service answers within one deadline (the HTTP client's pool once kept every slot for cancelled requests)."""
    settings = Settings(prometheus_url=prometheus.url, prometheus_deadline=1.0, service_deadline=2.0)
    with serve(settings) as client:
        assert client.get("/healthz").status_code == 200

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=client.base_url, timeout=30,
                                         limits=httpx.Limits(max_connections=250)) as many:
                answers = await asyncio.gather(*(many.get("/api/training/analytics/summary",
                                                          params={"range": f"{600 + index}s"})
                                                 for index in range(200)))
            return [answer.status_code for answer in answers]

        freeze(prometheus.process.pid)
        try:
            codes = asyncio.run(burst())
        finally:
            os.kill(prometheus.process.pid, signal.SIGCONT)
        assert set(codes) == {504}, codes
        began = time.monotonic()
        assert client.get("/healthz").status_code == 200
        response = client.get("/api/training/analytics/summary", params={"range": "599s"})
        assert response.status_code == 200, response.text
        assert time.monotonic() - began < settings.service_deadline


@pytest.mark.slow
def test_callers_cancelled_at_any_point_leave_the_client_whole(prometheus):
    """A caller cancelled at any point of its request (a deadline, a disconnect) never costs the client a
    connection slot: cancelled inside httpcore's pool, a request could keep its slot for good (httpcore#1093),
    and once every slot was kept every request timed out."""
    async def run() -> float:
        client = PrometheusClient(prometheus.url, deadline=2.0, max_concurrency=2)
        try:
            for point in range(40):     # every loop iteration of a request, from the first to past its answer
                for _ in range(3):
                    caller = asyncio.ensure_future(client.query("1"))
                    for _ in range(point):
                        await asyncio.sleep(0)
                    caller.cancel()
                    with contextlib.suppress(asyncio.CancelledError, PrometheusError):
                        await caller
            began = time.monotonic()
            assert await client.query("1")
            return time.monotonic() - began
        finally:
            await client.aclose()

    assert asyncio.run(run()) < 2.0


def test_with_prometheus_down_another_owners_stored_job_answers_as_an_unknown_one():
    """While Prometheus cannot answer, jobs come from their stored reports. Another owner's stored job was a 404
    and an unknown id a 503: one owner could tell which ids another had used."""
    from trainmetrics.analytics.cache import AnalyticsCache, cached_jobs_analytics
    from trainmetrics.prometheus_process import free_port
    from trainmetrics.reports import ReportArchive

    stored = {"alice-1": ("alice", {"job_id": "alice-1"}), "bob-1": ("bob", {"job_id": "bob-1"})}

    async def load(job_id):
        return stored.get(job_id)

    async def ask(job_ids, owner):
        client = PrometheusClient(f"http://127.0.0.1:{free_port()}", deadline=2.0)     # nothing listens there
        try:
            return await cached_jobs_analytics(client, AnalyticsCache(), job_ids, 300, owner=owner,
                                               archive=ReportArchive(load=load))
        finally:
            await client.aclose()

    [alice] = asyncio.run(ask(["alice-1"], "alice"))
    assert alice.job_id == "alice-1" and alice.source == "stored"
    for job_ids in (["bob-1"], ["bob-2"], ["alice-1", "bob-1"]):
        with pytest.raises(PrometheusError) as raised:
            asyncio.run(ask(job_ids, "alice"))
        assert raised.value.status == 503, job_ids
    assert [job.job_id for job in asyncio.run(ask(["alice-1", "bob-1"], None))] == ["alice-1", "bob-1"]


def test_a_stored_report_holds_nothing_of_another_owners_job_that_shares_its_id(tmp_path):
    """A job id another owner's job also used in Prometheus (a `trainmetrics train --owner bob` by hand, another
    job server): its analytics are no one's (404 to alice and to bob alike), but its report was computed for
    everyone's eyes and stored in alice's row: once Prometheus no longer held the job, alice read bob's run in it,
    `"owner": "bob"` and all. With owners, a report is computed in its owner's scope: such a job has none."""
    from trainmetrics.analytics.app import build_component
    from trainmetrics.contract import JOB_STATES
    from trainmetrics.jobserver import reports
    from trainmetrics.jobserver.store import JobRecord, JobStore
    from trainmetrics.reports import ReportArchive

    from .conftest import as_openmetrics, backfilled_prometheus, running

    end = round(time.time() - 600)
    runs = {"h:1": ("alice-1", "alice", end - 120, end - 60), "h:2": ("alice-1", "bob", end - 50, end),
            "h:3": ("alice-2", "alice", end - 60, end)}
    lines = []
    for instance, (job_id, owner, start, stop) in runs.items():
        base = f'job_id="{job_id}",instance="{instance}",job="trainer",rank="0"'
        for t in [start + 5.0 * i for i in range(int((stop - start) // 5) + 1)] + [stop + 0.25]:
            final = t > stop
            lines += [f'trainer_job_info{{{base},job_name="{owner}-run",owner="{owner}",device="cpu"}} 1 {t:.3f}',
                      f"trainer_job_start_timestamp_seconds{{{base}}} {start:.3f} {t:.3f}",
                      f"trainer_heartbeat_timestamp_seconds{{{base}}} {t:.3f} {t:.3f}",
                      f"trainer_samples_total{{{base}}} {int(10 * (min(t, stop) - start))} {t:.3f}"]
            now_in = "completed" if final else "running"
            lines += [f'trainer_job_state{{{base},state="{state}"}} {int(state == now_in)} {t:.3f}'
                      for state in JOB_STATES]
            if final:
                lines.append(f"trainer_job_end_timestamp_seconds{{{base}}} {stop:.3f} {t:.3f}")
    prometheus = backfilled_prometheus(tmp_path, as_openmetrics(lines))
    store = JobStore(tmp_path / "db.sqlite")
    for job_id in ("alice-1", "alice-2"):
        store.add_job(JobRecord(id=job_id, owner="alice", name=job_id, state="completed", spec={},
                                ended=time.time() - 10))

    async def call(operation, *args):
        return operation(*args)

    async def keep_reports() -> None:      # the server's keeper, with owners (--tokens), and the analytics' half
        archive = ReportArchive()
        async with build_component(Settings(prometheus_url=prometheus.url, archive=archive)).lifespan():
            await reports.ReportKeeper(archive, call, store, reports.UpTime(store), owners=True).round()

    with running(prometheus):
        asyncio.run(keep_reports())
    assert json.loads(store.get_report("alice-2")[1])["owner"] == "alice"
    assert store.get_report("alice-1") is None
    store.close()


@contextlib.contextmanager
def serving_stored_reports(tmp_path, texts: dict[str, str]):
    """The analytics with Prometheus down, answering from stored reports: a completed job per id, its report the
    text given (as a job server's store holds it)."""
    from trainmetrics.jobserver import reports
    from trainmetrics.jobserver.store import JobRecord, JobStore
    from trainmetrics.prometheus_process import free_port
    from trainmetrics.reports import ReportArchive

    store = JobStore(tmp_path / "db.sqlite")
    try:
        for job_id, text in texts.items():
            store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="completed", spec={}, ended=1.0))
            assert store.keep_report(job_id, text, 1.0)

        async def call(operation, *args):
            return operation(*args)

        keeper = reports.ReportKeeper(None, call, store, reports.UpTime(store))
        down = f"http://127.0.0.1:{free_port()}"            # nothing listens there: the stored reports answer
        settings = Settings(prometheus_url=down, prometheus_deadline=2.0, archive=ReportArchive(load=keeper.load))
        with serve(settings) as client:
            yield client
    finally:
        store.close()


@pytest.mark.parametrize("figure", ["NaN", "Infinity", "-1e999", "1" + "0" * 400],
                         ids=["nan", "infinity", "past-float", "huge-int"])
def test_a_stored_report_edited_by_hand_answers_its_odd_figure_as_null(figure, tmp_path):
    """A stored report is text in the job's row, and json.loads reads NaN, Infinity and 1e999: such a figure
    answered 500 (JSON has none), and an integer past a float's range failed the comparison's arithmetic. A
    report lacking a block (`duration`, `energy`...) answered it null, against the schema, and its comparison
    500 (AttributeError). Such figures read as null, a missing block as the block with every figure null."""
    texts = {"odd-1": '{"job_id": "odd-1", "status": "completed", "performance": {"average_samples_per_second": %s},'
                      ' "goodput": {"goodput_ratio": 0.5, "seconds": {"step": %s}}}' % (figure, figure),
             "bare-1": '{"job_id": "bare-1", "status": "completed"}'}
    with serving_stored_reports(tmp_path, texts) as client:
        odd = client.get("/api/training/odd-1/analytics")
        assert odd.status_code == 200, odd.text
        assert odd.json()["source"] == "stored" and odd.json()["performance"]["average_samples_per_second"] is None
        assert odd.json()["goodput"]["goodput_ratio"] == 0.5 and odd.json()["goodput"]["seconds"] == {"step": None}
        bare = client.get("/api/training/bare-1/analytics")
        assert bare.status_code == 200, bare.text
        assert bare.json()["duration"]["total_seconds"] is None and bare.json()["energy"]["total_joules"] is None
        compared = client.get("/api/training/analytics/compare?job_ids=odd-1,bare-1")
        assert compared.status_code == 200, compared.text
        assert [row["throughput"] for row in compared.json()["jobs"]] == [None, None]
        assert compared.json()["winner"]["best_goodput"] == "odd-1"


def test_a_stored_report_holding_a_lone_surrogate_answers_that_text_as_null(tmp_path):
    """json.loads reads `"\\ud800"` in a stored report edited by hand, a string UTF-8 cannot encode: the job's
    analytics and its comparison failed as they were sent (a 500, the connection reset). Such text reads as
    null, as a figure of the wrong type does, and a key of it is left out."""
    text = ('{"job_id": "odd-1", "status": "completed", "job_name": "run \\ud800", '
            '"goodput": {"seconds": {"step": 2.0, "\\udfff": 1.0}}}')
    with serving_stored_reports(tmp_path, {"odd-1": text}) as client:
        odd = client.get("/api/training/odd-1/analytics")
        assert odd.status_code == 200, odd.text
        assert odd.json()["job_name"] is None and odd.json()["goodput"]["seconds"] == {"step": 2.0}
        compared = client.get("/api/training/analytics/compare?job_ids=odd-1&format=csv")
        assert compared.status_code == 200, compared.text
        assert compared.text.splitlines()[1].startswith('"odd-1","",')        # its name null: an empty cell


def test_retry_after_is_read_as_seconds_or_an_http_date_and_kept_within_bounds():
    from trainmetrics.analytics.prometheus import (DEFAULT_RETRY_AFTER_SECONDS, MAX_RETRY_AFTER_SECONDS,
                                                   retry_after_seconds)
    now = 1_764_900_000.0                                      # Fri, 05 Dec 2025 02:00:00 GMT
    assert retry_after_seconds("7", now) == 7
    assert retry_after_seconds(" 12 ", now) == 12
    assert retry_after_seconds("Fri, 05 Dec 2025 02:00:30 GMT", now) == 30
    assert retry_after_seconds("Fri, 05 Dec 2025 02:00:29 GMT", now + 0.5) == 29     # rounded up
    assert retry_after_seconds("Fri, 05 Dec 2025 01:59:00 GMT", now) == 1              # already past
    assert retry_after_seconds("0", now) == 1
    assert retry_after_seconds("86400", now) == MAX_RETRY_AFTER_SECONDS
    assert retry_after_seconds("Sat, 06 Dec 2025 02:00:00 GMT", now) == MAX_RETRY_AFTER_SECONDS
    for useless in ("", "soon", "-3", "1.5", "\u0661\u0662", "Fri, 05 Dec 2025 02:00:30 -0000", "Fri, 99 Foo"):
        assert retry_after_seconds(useless, now) == DEFAULT_RETRY_AFTER_SECONDS, useless


def test_a_retry_after_date_from_prometheus_is_passed_on_as_seconds():
    from email.utils import formatdate
    factory = lambda r: httpx.Response(503, text="Service Unavailable",  # noqa: E731
                                       headers={"retry-after": formatdate(time.time() + 42, usegmt=True)})
    with serve(Settings(transport=answering(factory))) as client:
        response = client.get("/api/training/run-1/analytics")
    assert_error(response, 503, "prometheus_unavailable")
    assert 40 <= int(response.headers["retry-after"]) <= 43


def test_the_password_in_the_prometheus_url_is_not_shown_to_callers():
    """--prometheus-url https://user:password@host works (httpx sends it as basic auth), and the open /healthz
    showed it, whole, to anyone who asked, as did every answer that Prometheus was unreachable."""
    def down(request: httpx.Request):
        raise httpx.ConnectError("refused", request=request)

    up = CapturingTransport(empty_vector)
    with serve(Settings(prometheus_url="http://scraper:S3CRET@prometheus:9090", transport=up)) as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["checks"]["prometheus"]["prometheus"] == \
            "http://scraper:***@prometheus:9090", health.text
    assert up.requests and up.requests[0].headers["authorization"].startswith("Basic ")    # still sent
    with serve(Settings(prometheus_url="http://scraper:S3CRET@prometheus:9090",
                        transport=httpx.MockTransport(down))) as client:
        for response in (client.get("/healthz"), client.get("/api/training/run-1/analytics")):
            assert response.status_code == 503 and "scraper:***@prometheus:9090" in response.text, response.text
            assert "S3CRET" not in response.text


# ----- a pooled connection the backend closed while it was idle -------------------------------------------

EMPTY_ANSWER = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode()


def read_request(connection: socket.socket, buffered: bytes) -> tuple[bytes, bytes] | None:
    """One HTTP/1.1 request (its head and a Content-Length body) off a connection, and what was read past it;
    None when the client closed it first."""
    while b"\r\n\r\n" not in buffered:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        buffered += chunk
    head, _, rest = buffered.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return head, rest[length:]


@contextlib.contextmanager
def keep_alive_backend(on_reuse, on_new=None):
    """A backend on a loopback socket that answers every request an empty vector and keeps the connection open,
    except that the second request on a connection (one the client took from its pool) goes to on_reuse(connection)
    and a connection's first to on_new(connection) when given, either of which may answer (return True) or not.
    Yields (its URL, the count of connections it accepted)."""
    accepted = [0]

    def answer(connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            buffered, served = b"", 0
            while (found := read_request(connection, buffered)) is not None:
                buffered = found[1]
                handler = on_new if served == 0 else on_reuse if served == 1 else None
                if handler is not None and not handler(connection):
                    return
                connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                   b"content-length: %d\r\n\r\n%s" % (len(EMPTY_ANSWER), EMPTY_ANSWER))
                served += 1

    with socket.create_server(("127.0.0.1", 0)) as listener:
        def accept() -> None:
            with contextlib.suppress(OSError):
                while True:
                    connection = listener.accept()[0]
                    accepted[0] += 1
                    threading.Thread(target=answer, args=(connection,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted


def closed(connection: socket.socket) -> bool:
    """Close without an answer, as a backend (or a proxy) whose idle timer fired as the request came: the client
    reads the end of the connection (httpx.RemoteProtocolError)."""
    return False


def reset(connection: socket.socket) -> bool:
    """Drop the connection with a reset, as a proxy that forgot it does (httpx.ReadError)."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return False


@pytest.mark.parametrize("on_reuse", [closed, reset], ids=["closed", "reset"])
def test_a_pooled_connection_the_backend_dropped_is_retried_once_on_a_fresh_one(on_reuse):
    """A keep-alive connection that the backend or a proxy closed while it was idle in the pool (the client had not
    yet seen it go): the next query on it failed as an unreachable Prometheus, a 503, where the backend was up.
    A query is a read: sent again on a fresh connection, it answers."""
    async def two_queries(url: str) -> list:
        client = PrometheusClient(url, deadline=2.0, max_concurrency=1)
        try:
            return [await client.query("up"), await client.query("up")]
        finally:
            await client.aclose()

    with keep_alive_backend(on_reuse) as (url, accepted):
        assert asyncio.run(two_queries(url)) == [[], []]
        assert accepted[0] == 2

    with keep_alive_backend(on_reuse) as (url, accepted):
        with serve(Settings(prometheus_url=url, max_concurrency=1)) as client:
            assert client.get("/healthz").status_code == 200
            assert_error(client.get("/api/training/run-1/analytics"), 404, "not_found")


def test_a_fresh_connection_that_fails_is_not_retried():
    """A backend that drops every request on a new connection is unreachable as far as the client can tell: one
    try (a 503), not two."""
    async def query(url: str) -> None:
        client = PrometheusClient(url, deadline=2.0, max_concurrency=1)
        try:
            await client.query("up")
        finally:
            await client.aclose()

    with keep_alive_backend(closed, on_new=closed) as (url, accepted):
        with pytest.raises(PrometheusError) as raised:
            asyncio.run(query(url))
        assert raised.value.status == 503 and accepted[0] == 1


def test_a_retry_on_a_fresh_connection_keeps_to_the_requests_deadline():
    """The retry has what is left of the request's deadline, not a deadline of its own."""
    def late_close(connection: socket.socket) -> bool:
        time.sleep(0.6)
        return False

    def slow_answer(connection: socket.socket) -> bool:
        if accepted[0] > 1:         # the retry's connection: an answer after the deadline
            time.sleep(3)
        return True

    async def two_queries(url: str) -> float:
        client = PrometheusClient(url, deadline=1.0, max_concurrency=1)
        try:
            await client.query("up")
            began = time.monotonic()
            with pytest.raises(PrometheusError, match="did not answer"):
                await client.query("up")
            return time.monotonic() - began
        finally:
            await client.aclose()

    with keep_alive_backend(late_close, on_new=slow_answer) as (url, accepted):
        took = asyncio.run(two_queries(url))
    assert accepted[0] == 2 and 0.9 < took < 2.0, (accepted, took)


# ----- a backend whose answers lie: JSON Python reads, but not as the readers take it ------------------------

@contextlib.contextmanager
def lying_backend(answer):
    """A backend on a loopback socket that answers every query answer(kind, key) (kind: the result type a reader
    asks for, vector or matrix; key: where a sample's points go), raw JSON bytes sent as they are, and /-/ready an
    empty vector. Yields its URL."""
    def serve_one(connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            buffered = b""
            while (found := read_request(connection, buffered)) is not None:
                head, buffered = found
                path = head.split(b" ", 2)[1]
                if path.startswith(b"/api/v1/query"):
                    body = answer(*(("matrix", "values") if b"query_range" in path else ("vector", "value")))
                else:
                    body = EMPTY_ANSWER
                connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                   b"content-length: %d\r\n\r\n%s" % (len(body), body))

    with socket.create_server(("127.0.0.1", 0)) as listener:
        answer_each_connection(listener, serve_one)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def answer_each_connection(listener: socket.socket, answer) -> None:
    """Hand each connection `listener` takes to `answer` on a thread of its own, until the listener is closed."""
    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=answer, args=(listener.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


ROUTES = ("/api/training/run-1/analytics", "/api/training/analytics/summary", "/api/training/analytics/jobs",
          "/api/training/analytics/compare?job_ids=run-1,b")


def one_sample(kind: str, key: str, labels: str, point: str) -> bytes:
    """A success answer of one sample, its labels and point as JSON text (written by hand: json.dumps escapes)."""
    points = f"[{point}]" if kind == "matrix" else point
    return (f'{{"status":"success","data":{{"resultType":"{kind}","result":[{{"metric":{labels},'
            f'"{key}":{points}}}]}}}}').encode()


def test_an_answer_nested_past_the_recursion_limit_is_502_and_the_service_answers_on():
    """JSON nested deeper than Python's recursion limit ("[[[...]]]", 20 kB) raised a RecursionError in the decoding,
    which only a ValueError was caught for: a 500, and the summary's took the ASGI application down (the connection
    reset). It is a body that is not JSON as Python reads it: a bad answer."""
    nested = b"[" * 100_000 + b"]" * 100_000

    def answer(kind: str, key: str) -> bytes:
        return b'{"status":"success","data":{"resultType":"%s","result":%s}}' % (kind.encode(), nested)

    with lying_backend(answer) as url, serve(Settings(prometheus_url=url)) as client:
        for path in ROUTES:
            assert_error(client.get(path), 502, "prometheus_bad_answer")
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("point", ['[1%s,"1"]' % ("0" * 400), '[1700000000,1%s]' % ("0" * 400)],
                         ids=["time", "value"])
def test_a_point_written_as_an_integer_past_a_floats_range_is_502(point):
    """Python's JSON reads 1 followed by 400 zeros as an int, and float() of it raises OverflowError, which the
    answer's shape check did not catch (only TypeError and ValueError): a 500 instead of a bad answer."""
    def answer(kind: str, key: str) -> bytes:
        return one_sample(kind, key, '{"job_id":"run-1"}', point)

    with lying_backend(answer) as url, serve(Settings(prometheus_url=url)) as client:
        for path in ROUTES:
            assert_error(client.get(path), 502, "prometheus_bad_answer", "unexpected shape")


def test_a_label_holding_a_lone_surrogate_is_read_as_the_replacement_character():
    """JSON may escape half a UTF-16 pair ("\\ud800"), and Python reads it as a str that UTF-8 cannot encode: a job
    name so reached the job list, whose encoding failed (a 500 UnicodeEncodeError). Read as U+FFFD, as Go's
    encoder writes what is no text; an escaped pair (an emoji) stays the character it is."""
    labels = r'{"job_id":"run-1","job_name":"a\ud800b","owner":"\ud83d\ude00","instance":"h:1"}'

    def answer(kind: str, key: str) -> bytes:
        return one_sample(kind, key, labels, '[1700000000,"1"]')

    with lying_backend(answer) as url, serve(Settings(prometheus_url=url)) as client:
        response = client.get("/api/training/analytics/jobs")
        assert response.status_code == 200, response.text
        (job,) = response.json()["jobs"]
        assert (job["job_name"], job["owner"]) == ("a\ufffdb", "\U0001F600")


def test_a_job_name_with_a_line_break_stays_one_cell_of_the_csv_and_its_formula_stays_text(tmp_path):
    """The CSV answers ended their lines in a bare LF, and Python's writer quotes only a cell holding its line end:
    a job name (a Prometheus label, a stored report: anybody's text) `x<CR>=cmd|' /C calc'!A0` was written unquoted,
    and a spreadsheet broke the row at the CR, the formula the first cell of a row of its own, run."""
    import csv
    import io

    names = {"cr-1": "x\r=cmd|' /C calc'!A0", "lf-1": "y\n@SUM(1)",
             "crlf-1": 'a, "b"\r\n+1', "plain-1": "=1+1"}
    texts = {job_id: json.dumps({"job_id": job_id, "status": "completed", "job_name": name})
             for job_id, name in names.items()}
    with serving_stored_reports(tmp_path, texts) as client:
        compared = client.get("/api/training/analytics/compare", params={"job_ids": ",".join(names), "format": "csv"})
    assert compared.status_code == 200, compared.text
    # A spreadsheet (RFC 4180) ends a row at any unquoted CR or LF: each of them is inside a quoted cell.
    unquoted = "".join(part for index, part in enumerate(compared.text.split('"')) if index % 2 == 0)
    assert unquoted.replace("\r\n", "\n").count("\n") == len(names) + 1 and "\r" not in unquoted.replace("\r\n", "")
    rows = list(csv.DictReader(io.StringIO(compared.text, newline="")))
    assert {row["job_id"]: row["job_name"] for row in rows} == {
        "cr-1": "x\r=cmd|' /C calc'!A0", "lf-1": "y\n@SUM(1)", "crlf-1": 'a, "b"\r\n+1',
        "plain-1": "'=1+1"}


def test_a_job_name_with_a_semicolon_stays_one_quoted_cell_of_the_csv(tmp_path):
    """A text cell was quoted only when it held a comma, a quote or a line end: a job name `x;=1+1` was written
    bare, and a spreadsheet whose locale separates with `;` split it in two cells, the second a formula it ran."""
    import csv
    import io

    name = "x;=SUM(1+1)*cmd|' /C calc'!A0"
    texts = {"semi-1": json.dumps({"job_id": "semi-1", "status": "completed", "job_name": name})}
    with serving_stored_reports(tmp_path, texts) as client:
        compared = client.get("/api/training/analytics/compare", params={"job_ids": "semi-1", "format": "csv"})
    assert compared.status_code == 200, compared.text
    # Outside the quoted cells there is no ';' for such a spreadsheet to split on.
    unquoted = "".join(part for index, part in enumerate(compared.text.split('"')) if index % 2 == 0)
    assert ";" not in unquoted
    (row,) = csv.DictReader(io.StringIO(compared.text, newline=""))
    assert (row["job_id"], row["job_name"], row["task"]) == ("semi-1", name, "")


@pytest.mark.parametrize("status", [None, "bogus", 7], ids=["missing", "no-status", "a-number"])
def test_a_stored_report_without_a_known_status_answers_unknown_as_the_schema_has_it(status, tmp_path):
    """A stored report (text anyone with the database may edit) whose `status` was missing, none of the statuses or
    of the wrong type answered `status` null or that text, both outside the OpenAPI document's enum of statuses
    (the job's analytics and its comparison row alike): a client validating answers against it failed."""
    import jsonschema_rs

    from trainmetrics.analytics.openapi import openapi_document

    components = openapi_document()["components"]
    report = {"job_id": "odd-status-1", "evaluated_at": 170.0}
    if status is not None:
        report["status"] = status
    with serving_stored_reports(tmp_path, {"odd-status-1": json.dumps(report)}) as client:
        answers = {"JobAnalytics": client.get("/api/training/odd-status-1/analytics"),
                   "Comparison": client.get("/api/training/analytics/compare", params={"job_ids": "odd-status-1"})}
    for name, answer in answers.items():
        assert answer.status_code == 200, answer.text
        validator = jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                                        "components": components})
        assert not list(validator.iter_errors(answer.json())), [e.message for e in validator.iter_errors(answer.json())]
    assert answers["JobAnalytics"].json()["status"] == answers["Comparison"].json()["jobs"][0]["status"] == "unknown"


def test_a_csv_cell_is_spelled_as_the_json_field_it_holds_booleans_included(tmp_path):
    """The comparison's CSV wrote its booleans (`efficiency_complete`, `energy_complete`, `goodput_complete`,
    `partial`) as Python spells them, `True` and `False`, where its JSON says `true` and `false`: a reader that takes
    the documented columns as the JSON fields got text no JSON reader knows."""
    import csv
    import io

    report = {"job_id": "flags-1", "status": "completed", "job_name": "naïve, \"quoted\" ✓",
              "duration": {"total_seconds": 12.5},
              "performance": {"total_samples": 10, "average_samples_per_second": 1e-05},
              "efficiency": {"overall_score": 50.0}}
    with serving_stored_reports(tmp_path, {"flags-1": json.dumps(report)}) as client:
        as_json = client.get("/api/training/analytics/compare", params={"job_ids": "flags-1"})
        as_csv = client.get("/api/training/analytics/compare", params={"job_ids": "flags-1", "format": "csv"})
    assert as_json.status_code == as_csv.status_code == 200, (as_json.text, as_csv.text)
    (json_row,) = as_json.json()["jobs"]
    (csv_row,) = csv.DictReader(io.StringIO(as_csv.text, newline=""))
    assert list(csv_row) == list(json_row)
    spelled = {key: "" if value is None else value if isinstance(value, str) else json.dumps(value)
               for key, value in json_row.items()}
    assert csv_row == spelled
    assert {csv_row[key] for key in ("efficiency_complete", "energy_complete", "goodput_complete", "partial")} == {
        "true", "false"}


def test_an_answer_whose_content_encoding_does_not_decode_is_502_naming_it():
    """A backend or proxy that gzips its answer (the client asks for identity, which a proxy may ignore) and sends
    bytes that are no gzip: httpx's DecodingError is no transport error, so it escaped every mapping, a 500 with a
    traceback, and the summary's took the ASGI application down (the next request's connection was reset)."""
    def serve_one(connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            buffered = b""
            while (found := read_request(connection, buffered)) is not None:
                head, buffered = found
                if head.split(b" ", 2)[1].startswith(b"/api/v1/query"):
                    connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                       b"content-encoding: gzip\r\ncontent-length: 10\r\n\r\n\x1f\x8bno gzip!")
                else:
                    connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                       b"content-length: %d\r\n\r\n%s" % (len(EMPTY_ANSWER), EMPTY_ANSWER))

    with socket.create_server(("127.0.0.1", 0)) as listener:
        answer_each_connection(listener, serve_one)
        with serve(Settings(prometheus_url=f"http://127.0.0.1:{listener.getsockname()[1]}")) as client:
            for path in ROUTES:
                assert_error(client.get(path), 502, "prometheus_bad_answer", "Content-Encoding (gzip) does not decode")
            assert client.get("/healthz").status_code == 200


def step_ms(step: str) -> int:
    """A range query's step parameter in milliseconds."""
    return int(step.removesuffix("ms")) if step.endswith("ms") else round(float(step) * 1000)


# Each range answer's points: the grid asked (start, end, step in ms) and what a backend added to it.
OFF_GRID = {
    "the grid asked": lambda start, end, step: [],
    "a point before the start": lambda start, end, step: [start - step],
    "a point past the end": lambda start, end, step: [end + step],
    "a point twice": lambda start, end, step: [start],
    "a point between two of the grid": lambda start, end, step: [start + step // 2],
}


@pytest.mark.parametrize("added", OFF_GRID, ids=list(OFF_GRID))
def test_a_range_answer_with_points_off_the_grid_asked_is_502_not_a_wrong_trend(added):
    """A backend answering a range query with more points than asked (before its start, past its end, one time
    twice, between two grid points: its raw samples) had every one of them averaged and peaked into the summary's
    resource trends (a point worth 1000 among ones of 1: a trend 200 times too high), served as right."""
    def handler(request: httpx.Request) -> httpx.Response:
        params = CapturingTransport.params(request)
        if request.url.path != "/api/v1/query_range":
            return empty_vector(request)
        start, end = round(float(params["start"]) * 1000), round(float(params["end"]) * 1000)
        step = step_ms(params["step"])
        extra = OFF_GRID[added](start, end, step)
        values = [[t / 1000, "1000" if t in extra else "1"] for t in sorted([*range(start, end + 1, step), *extra])]
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": [
            {"metric": {}, "values": values}]}})

    with serve(Settings(transport=answering(handler), recorded_series=False)) as client:
        response = client.get("/api/training/analytics/summary", params={"range": "1h"})
        if added == "the grid asked":
            assert response.status_code == 200, response.text
            trends = response.json()["resource_trends"]["series"].values()
            assert all(trend["average"] == trend["peak"] == 1 for trend in trends), trends
        else:
            assert_error(response, 502, "prometheus_bad_answer", "off the grid asked")


def test_a_stored_report_from_before_a_list_or_map_was_added_answers_it_empty_not_null(tmp_path):
    """A stored report lacking a list or map the schema always has (one stored before goodput's
    `step_seconds_by_part` was added, or without `evaluations`), or holding one of the wrong type, answered it
    `null` where the OpenAPI document promises an array or object: every client that reads the schema failed on
    it. Such a field reads as empty, and the stored report answers the current schema."""
    import jsonschema_rs

    from trainmetrics.analytics.openapi import openapi_document

    document = openapi_document()
    validator = jsonschema_rs.Draft202012Validator({"$ref": "#/components/schemas/JobAnalytics",
                                                    "components": document["components"]})
    text = ('{"job_id": "old-1", "status": "completed", "start_time": 100.0, "end_time": 160.0, '
            '"evaluated_at": 170.0, "goodput": {"goodput_ratio": 0.5, "seconds": {"step": 30.0}, '
            '"badput_percent": 7}}')
    with serving_stored_reports(tmp_path, {"old-1": text}) as client:
        answer = client.get("/api/training/old-1/analytics")
        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert report["source"] == "stored" and report["evaluations"] == []
        assert report["goodput"]["step_seconds_by_part"] == {} and report["goodput"]["badput_percent"] == {}
        assert report["goodput"]["seconds"] == {"step": 30.0}
        assert not list(validator.iter_errors(report)), [error.message for error in validator.iter_errors(report)]
