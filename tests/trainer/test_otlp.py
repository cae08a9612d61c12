"""Optional OTLP push: with the standard OTEL_EXPORTER_OTLP_* variables a job also pushes its metrics to an
OTLP/HTTP receiver (here a real HTTP server decoding the protobuf requests)."""

import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from trainmetrics.trainer.metrics import Diagnostics, JobMetrics
from trainmetrics.trainer import telemetry
from trainmetrics.trainer.telemetry import Publish

from .conftest import parse_summary, run_train


class Receiver(BaseHTTPRequestHandler):
    requests: list[ExportMetricsServiceRequest] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        Receiver.requests.append((self.path, request))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver(monkeypatch):
    """A real OTLP/HTTP receiver the job pushes to (OTEL_EXPORTER_OTLP_ENDPOINT), its requests in Receiver.requests."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Receiver.requests = []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_job_pushes_its_metrics_over_otlp_when_asked(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    metrics = JobMetrics("otlp-job-1", log_every=1)
    with metrics:
        for _ in range(5):
            metrics.step(loss=0.5, samples=8)
        # /metrics shows each family once (the pushed step-time histogram was a second copy there)
        families = [line.split()[2] for line in metrics.collect().decode().splitlines()
                    if line.startswith("# TYPE ")]
        assert len(families) == len(set(families)) and "trainer_step_duration_seconds" in families
    # close() shut the providers down, which push a last time
    assert Receiver.requests
    assert {path for path, _ in Receiver.requests} == {"/v1/metrics"}
    resource = {kv.key: kv.value.string_value
                for kv in Receiver.requests[-1][1].resource_metrics[0].resource.attributes}
    assert resource["job_id"] == "otlp-job-1"
    points = {metric.name: metric for _, request in Receiver.requests for resource in request.resource_metrics
              for scope in resource.scope_metrics for metric in scope.metrics}     # the newest of each
    assert points["trainer_steps_total"].sum.data_points[0].as_int == 5
    assert points["trainer_samples_total"].sum.data_points[0].as_int == 40
    assert points["trainer_step_duration_seconds"].histogram.data_points[0].count == 5


@pytest.mark.parametrize("timeout", [None, "soon", "1e300"])
def test_a_collector_that_never_answers_holds_the_end_of_a_job_for_a_bounded_time(monkeypatch, caplog, timeout):
    """The SDK's last push waited up to 30 s (its retries, its 10 s request timeout) for a collector that took
    the connection and never answered: every job's exit, and its job server slot, with it. A timeout that is no
    number is warned of once and bounded the same."""
    monkeypatch.setattr(telemetry, "FINAL_PUSH_SECONDS", 1.0)
    if timeout is not None:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", timeout)
    with socket.socket() as frozen:             # takes connections (the backlog), answers nothing
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(8)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{frozen.getsockname()[1]}")
        metrics = JobMetrics("otlp-frozen-1", log_every=1)
        with metrics:
            metrics.step(loss=0.5, samples=8)
            began = time.monotonic()
        assert metrics.ended                    # the block's end closed it: the last push included
    closed_in = time.monotonic() - began
    assert closed_in < 1.0 + 3, closed_in     # 10 s here before (15-31 s with retries)
    warned = [record for record in caplog.records if "OTEL_EXPORTER_OTLP_TIMEOUT" in record.getMessage()]
    assert len(warned) == (timeout is not None), warned


def test_a_resumed_process_pushes_its_own_counts_while_its_endpoint_shows_the_jobs(receiver):
    """A resumed process's counters are the job's totals on /metrics (Prometheus reads a reset by its value),
    but OTLP stamps a cumulative counter with the process's own start: pushed as totals, a collector turning
    them into deltas counted the earlier runs again (761 steps for 500)."""
    resumed = JobMetrics("otlp-resumed-1", log_every=1)
    resumed.load_state_dict({"steps": 100, "samples": 800, "checkpoints": 2, "evaluations": 3,
                             "phases": {"compute": 40.0}})
    with resumed:
        for _ in range(5):
            resumed.step(loss=0.5, samples=8)
        shown = resumed.collect().decode()
        assert "trainer_steps_total 105.0" in re.sub(r"\{[^}]*\}", "", shown)
    points = {metric.name: metric for _, request in Receiver.requests for resource in request.resource_metrics
              for scope in resource.scope_metrics for metric in scope.metrics}
    assert points["trainer_steps_total"].sum.data_points[0].as_int == 5
    assert points["trainer_samples_total"].sum.data_points[0].as_int == 40
    assert points["trainer_checkpoints_total"].sum.data_points[0].as_int == 0
    phases = {point.attributes[0].value.string_value: point.as_double
              for point in points["trainer_phase_seconds_total"].sum.data_points}
    assert 0 <= phases["compute"] < 40.0                     # its own, not the carried 40 s


def pushed_values(name: str) -> list[int]:
    """`name`'s first data point in every request the receiver got, in the order they came."""
    return [metric.sum.data_points[0].as_int for _, request in Receiver.requests
            for resource in request.resource_metrics for scope in resource.scope_metrics
            for metric in scope.metrics if metric.name == name and metric.sum.data_points]


def test_dataloader_workers_push_nothing_of_their_own(receiver, monkeypatch):
    """The SDK restarts its push thread in a forked child: every DataLoader worker pushed its copy of the job's
    state (its steps at the fork) under the job's resource, between the job's own pushes (0, 44, 0, 0, 65...)."""
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    done = run_train("--job-id", "otlp-workers-1", "--workers", "2", "--epochs", "2", "--dataset", "blobs",
                     "--batch-size", "16", "--linger-timeout", "0")
    assert done.returncode == 0, done.stderr
    steps = pushed_values("trainer_steps_total")
    assert steps[-1] == parse_summary(done.stdout)["steps"]
    assert steps == sorted(steps), steps      # a cumulative counter of one process never goes back


def test_an_export_interval_of_zero_is_warned_of_not_a_refused_job(receiver, monkeypatch):
    """The SDK refuses an interval of 0 or less: JobMetrics() raised, and the job exited 2 blaming --metrics-listen."""
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "0")
    done = run_train("--job-id", "otlp-interval-1", "--epochs", "1", "--dataset", "blobs", "--linger-timeout", "0")
    assert done.returncode == 0, done.stderr
    assert "OTEL_METRIC_EXPORT_INTERVAL" in done.stderr
    assert pushed_values("trainer_steps_total")[-1] == parse_summary(done.stdout)["steps"]   # the last push


@pytest.mark.parametrize("interval", ["nan", "inf", "1e309", "1e300"])
def test_an_export_interval_that_is_no_finite_number_is_warned_of_and_the_job_still_pushes(receiver, monkeypatch,
                                                                                            interval):
    """The SDK takes NaN or infinity as "never push by itself": no warning, and the job pushed nothing at all,
    not even its final state. 1e300 ms killed its push thread (an OverflowError: longer than a thread can wait)."""
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", interval)
    done = run_train("--job-id", "otlp-interval-2", "--epochs", "1", "--dataset", "blobs", "--linger-timeout", "0")
    assert done.returncode == 0, done.stderr
    assert f"OTEL_METRIC_EXPORT_INTERVAL='{interval}'" in done.stderr, done.stderr
    assert pushed_values("trainer_steps_total")[-1] == parse_summary(done.stdout)["steps"]   # the last push


def test_the_last_push_carries_the_stack_dumps(receiver, monkeypatch, tmp_path):
    """close() dropped the hang watchdog before the last push: trainer_stack_dumps_total, on /metrics, was missing
    from it, and from everything a job shorter than the export interval pushed."""
    metrics = JobMetrics("otlp-hung-1", log_every=1, diagnostics=Diagnostics(stacks_dir=tmp_path, hang_seconds=0.4))
    with metrics:
        for _ in metrics.timed([None]):
            time.sleep(1.5)             # a step that hangs: the watchdog writes the stacks
            metrics.step(loss=0.5, samples=8)
        assert "trainer_stack_dumps_total 1.0" in re.sub(r"\{[^}]*\}", "", metrics.collect().decode())
    assert len(Receiver.requests) == 1                      # the last push alone (the interval is 60 s)
    assert pushed_values("trainer_stack_dumps_total") == [1]


class Overloaded(Receiver):
    """A collector that answers its first two requests 503 (overloaded), then takes them."""

    def do_POST(self):
        Overloaded.attempts += 1
        if Overloaded.attempts <= 2:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_POST()


def test_the_last_push_has_the_timeout_the_user_set(monkeypatch):
    """The last push was cut at FINAL_PUSH_SECONDS even where OTEL_EXPORTER_OTLP_TIMEOUT gave pushes longer: a job
    ended while the SDK backed off from an overloaded collector (503, retried after 1 s, then 2 s), and the final
    state was never delivered (the exporter's thread died with the process)."""
    monkeypatch.setattr(telemetry, "FINAL_PUSH_SECONDS", 1.0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Overloaded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Overloaded.attempts, Receiver.requests = 0, []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "10")
    try:
        metrics = JobMetrics("otlp-overloaded-1", log_every=1)
        with metrics:
            metrics.step(loss=0.5, samples=8)
        assert Overloaded.attempts == 3
        assert pushed_values("trainer_steps_total") == [1]     # delivered before close() returned
    finally:
        server.shutdown()
        server.server_close()


class Slow(Receiver):
    """A collector that takes each request at once (Slow.arrived) and answers it after Slow.seconds."""

    arrived = threading.Event()
    seconds = 0.0

    def do_POST(self):
        Slow.arrived.set()
        time.sleep(Slow.seconds)
        super().do_POST()


def test_a_push_under_way_at_the_end_leaves_the_last_push_its_whole_timeout(monkeypatch):
    """The SDK counted a periodic push under way at the job's end against the last push's time: with a collector
    answering in 3 s of a 4 s timeout, close() returned after the periodic push and before the last one was
    answered, so the job's exit killed it and its final state never reached the collector (nothing said so)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Slow.seconds, Receiver.requests = 3.0, []
    Slow.arrived.clear()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "4")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    try:
        metrics = JobMetrics("otlp-slow-1", log_every=1)
        with metrics:
            metrics.step(loss=0.5, samples=8)
            assert Slow.arrived.wait(10)         # a periodic push is under way as the job ends
            metrics.step(loss=0.5, samples=8)
        assert pushed_values("trainer_steps_total")[-1] == 2      # the final state, before close() returned
    finally:
        server.shutdown()
        server.server_close()


def test_the_service_name_the_user_set_is_kept(receiver, monkeypatch):
    """The job's resource named its service trainmetrics-trainer over OTEL_SERVICE_NAME (and service.name in
    OTEL_RESOURCE_ATTRIBUTES), which a collector's Prometheus exporter makes the `job` label of every series."""
    monkeypatch.setenv("OTEL_SERVICE_NAME", "vision-team-trainer")
    with JobMetrics("otlp-service-1", log_every=1) as metrics:
        metrics.step(loss=0.5, samples=8)
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    with JobMetrics("otlp-service-2", log_every=1) as metrics:
        metrics.step(loss=0.5, samples=8)
    resources = [{kv.key: kv.value.string_value for kv in resource.resource.attributes}
                 for _, request in Receiver.requests for resource in request.resource_metrics]
    assert {(r["job_id"], r["service.name"]) for r in resources} == {
        ("otlp-service-1", "vision-team-trainer"), ("otlp-service-2", "trainmetrics-trainer")}


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"])
def test_a_protocol_other_than_http_protobuf_is_warned_of(receiver, monkeypatch, caplog, variable):
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc was ignored without a word: the job pushed HTTP to the endpoint (a
    collector's gRPC port, 4317, for one who set grpc), and every push failed in the SDK's log."""
    monkeypatch.setenv(variable, "grpc")
    with JobMetrics("otlp-grpc-1", log_every=1) as metrics:
        metrics.step(loss=0.5, samples=8)
    warned = [record.getMessage() for record in caplog.records if variable in record.getMessage()]
    assert len(warned) == 1 and "http/protobuf" in warned[0], warned


def test_an_endpoint_without_a_scheme_is_said_at_the_start_and_nothing_pushed(monkeypatch, caplog):
    """OTEL_EXPORTER_OTLP_ENDPOINT=collector:4318 (no http://) was taken: every push failed with the SDK's "No
    connection adapters were found", once a minute, the job's final state with them."""
    from trainmetrics.trainer.telemetry import otlp_readers

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4318")
    assert otlp_readers() == []
    warned = [record.getMessage() for record in caplog.records if "OTEL_EXPORTER_OTLP_ENDPOINT" in record.getMessage()]
    assert len(warned) == 1 and "has no http:// or https://" in warned[0], warned
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "HTTP://127.0.0.1:4318")      # a scheme in any case is one
    readers = otlp_readers()
    assert len(readers) == 1
    readers[0].shutdown(timeout_millis=100)


def test_the_metrics_own_protocol_overrides_the_general_one(receiver, monkeypatch, caplog):
    """OTEL_EXPORTER_OTLP_METRICS_PROTOCOL=http/protobuf is the metrics' protocol whatever the general variable says
    (grpc for the process's traces): it was warned of by the general variable's name, a false alarm."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
    with JobMetrics("otlp-protocol-1", log_every=1) as metrics:
        metrics.step(loss=0.5, samples=8)
    warned = [record.getMessage() for record in caplog.records if "PROTOCOL" in record.getMessage()]
    assert warned == []
    assert pushed_values("trainer_steps_total") == [1]


def make_read_only(directory, read_only: bool) -> None:
    """Make `directory` read-only (its filesystem gone read-only) or writable again; root ignores modes, so it
    makes it immutable (skipped where the filesystem cannot)."""
    if os.geteuid() != 0:
        directory.chmod(0o555 if read_only else 0o755)
    elif subprocess.run(["chattr", "+i" if read_only else "-i", str(directory)], capture_output=True).returncode:
        pytest.skip("chattr cannot make a directory immutable here")


def test_a_targets_directory_gone_read_only_still_gets_the_final_state_pushed_and_every_other_file_removed(
        receiver, tmp_path):
    """The target file's removal raised (EROFS, EPERM) out of the job's end: the last OTLP push, the only one of a
    job shorter than the push interval, was never sent, and its job-mapping file and its /metrics were left."""
    targets, jobs = tmp_path / "targets", tmp_path / "jobs"
    metrics = JobMetrics("otlp-read-only-1", log_every=1,
                         publish=Publish(targets_dir=targets, job_dir=jobs, linger_timeout=0))
    try:
        with metrics:
            metrics.step(loss=0.5, samples=8)
            make_read_only(targets, True)
    finally:
        make_read_only(targets, False)
    assert pushed_values("trainer_steps_total") == [1]
    assert list(jobs.glob("*.json")) == [] and metrics.metrics_port is None


def pushed_history_slots(requests) -> list[dict[str, float]]:
    """Each pushed history slot's five values (by metric name), one dict per slot per push."""
    slots = []
    for _, request in requests:
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                pushed: dict[str, dict[str, float]] = {}
                for metric in scope.metrics:
                    if metric.name.startswith("trainer_eval_history_"):
                        for point in metric.gauge.data_points:
                            slot = next(a.value.string_value for a in point.attributes if a.key == "slot")
                            pushed.setdefault(slot, {})[metric.name] = point.as_double or point.as_int
                slots.extend(pushed.values())
    return slots


def test_a_pushed_history_slot_shows_one_evaluation_while_the_loop_evaluates_during_the_push(receiver, monkeypatch):
    """Before: the push read each of a slot's five series afresh, so an evaluation made between two of them
    gave a slot one evaluation's number with a later one's step and loss (seen: number 696, step 712)."""
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "5")
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)         # the loop's thread runs between the push's callbacks often
    try:
        metrics = JobMetrics("otlp-eval-race", log_every=1)
        with metrics:
            while len(Receiver.requests) < 100 and metrics.steps < 100_000:
                metrics.step(loss=0.5, samples=8)
                metrics.eval(loss=float(metrics.steps), accuracy=0.5)     # its number, step and loss are equal
    finally:
        sys.setswitchinterval(switch)
    slots = pushed_history_slots(Receiver.requests)
    assert slots
    mixed = [slot for slot in slots if len({slot["trainer_eval_history_index"], slot["trainer_eval_history_step"],
                                             slot["trainer_eval_history_loss"]}) > 1]
    assert mixed == []
