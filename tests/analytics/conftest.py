"""Helpers for analytics tests: the real service on a free port, real jobs, a capturing MockTransport."""

import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Awaitable, Callable

import httpx
import psutil
import pytest
import uvicorn

from tests.processes import finish_reading, kill_left
from trainmetrics.analytics.app import Settings, create_app
from trainmetrics.analytics.prometheus import PrometheusClient
from trainmetrics.contract import JOB_STATES
from trainmetrics.prometheus_process import PrometheusServer, VictoriaMetricsServer, find_binary, free_port


@contextmanager
def serve(settings: Settings):
    """The analytics app under real uvicorn on a free loopback port; yields an httpx.Client for it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                          log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "analytics server did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def asked(url: str, ask: Callable[[PrometheusClient], Awaitable]):
    """What `ask` answers with a PrometheusClient for `url` (closed afterwards), run to its end."""
    async def run():
        client = PrometheusClient(url)
        try:
            return await ask(client)
        finally:
            await client.aclose()

    return asyncio.run(run())


class CapturingTransport(httpx.MockTransport):
    """A MockTransport that records every request it is asked to send to 'Prometheus'."""

    def __init__(self, handler):
        self.requests: list[httpx.Request] = []

        def record(request: httpx.Request):
            self.requests.append(request)
            return handler(request)

        super().__init__(record)

    def queries(self) -> list[str]:
        """The PromQL of every query received."""
        return [self.params(request).get("query", "") for request in self.requests]

    @staticmethod
    def params(request: httpx.Request) -> dict[str, str]:
        """The API parameters of a request: its form body (the client POSTs queries), else its URL."""
        if request.method == "POST":
            return dict(urllib.parse.parse_qsl(request.content.decode()))
        return dict(request.url.params)


def as_openmetrics(lines: list[str]) -> str:
    """Samples ("series value time" lines) as promtool's backfill takes them: each series' together, # EOF last."""
    by_series: dict[str, list[str]] = {}
    for line in lines:
        by_series.setdefault(line.rsplit(" ", 2)[0], []).append(line)
    return "\n".join(line for series in by_series.values() for line in series) + "\n# EOF\n"


def scraped_job(base: str, info: str, start: float, end: float, t: float) -> list[str]:
    """A one-process job that trained from `start` to `end` as a scrape at `t` showed it (its final scrape after
    `end`): its metadata, its process's start (5 s before training), start, heartbeat, 10 samples a second, its
    state (running, then completed) and, once ended, its end."""
    final = t > end
    lines = [f"trainer_job_info{{{base},{info}}} 1 {t:.3f}",
             f"trainer_process_start_timestamp_seconds{{{base}}} {start - 5:.3f} {t:.3f}",
             f"trainer_job_start_timestamp_seconds{{{base}}} {start:.3f} {t:.3f}",
             f"trainer_heartbeat_timestamp_seconds{{{base}}} {t:.3f} {t:.3f}",
             f"trainer_samples_total{{{base}}} {int(10 * (min(t, end) - start))} {t:.3f}"]
    lines += [f'trainer_job_state{{{base},state="{s}"}} {int(s == ("completed" if final else "running"))} {t:.3f}'
              for s in JOB_STATES]
    if final:
        lines.append(f"trainer_job_end_timestamp_seconds{{{base}}} {end:.3f} {t:.3f}")
    return lines


def scraped_evaluations(base: str, t: float, shown: list[tuple[int, float, float]], steps_each: int) -> list[str]:
    """The evaluation history a scrape at `t` showed: each (number, when, loss) of `shown` in its slot, at step
    number x `steps_each`."""
    lines = []
    for index, at, loss in shown:
        slot = f'{base},slot="{index % 8}"'
        lines += [f"trainer_eval_history_index{{{slot}}} {index} {t:.3f}",
                  f"trainer_eval_history_step{{{slot}}} {index * steps_each} {t:.3f}",
                  f"trainer_eval_history_timestamp_seconds{{{slot}}} {at:.3f} {t:.3f}",
                  f"trainer_eval_history_loss{{{slot}}} {loss} {t:.3f}"]
    return lines


def backfilled_prometheus(work: Path, history: str) -> PrometheusServer:
    """A Prometheus, not started and without rules, whose store holds `history` (OpenMetrics, kept in
    work/history.om) as promtool's blocks."""
    (work / "history.om").write_text(history)
    subprocess.run([find_binary("promtool"), "tsdb", "create-blocks-from", "openmetrics", str(work / "history.om"),
                    str(work / "blocks")], check=True, capture_output=True)
    prometheus = PrometheusServer(work / "prometheus", rule_files=[])
    prometheus.data_dir.mkdir(parents=True)
    take_blocks(prometheus, work / "blocks")
    return prometheus


@contextmanager
def running(prometheus: PrometheusServer, timeout: float = 60):
    """`prometheus` started, and stopped after. Given a minute to be ready: a store of backfilled blocks takes a
    while to load beside a parallel run's other servers."""
    prometheus.start(timeout=timeout)
    try:
        yield prometheus
    finally:
        prometheus.stop()


def import_to_victoria(victoria: VictoriaMetricsServer, history: str) -> None:
    """History (OpenMetrics, as_openmetrics) imported into a started VictoriaMetrics (Prometheus text format,
    millisecond timestamps) and flushed; returns once a query counts every sample, 2 s past the newest."""
    rows = [(series, value, round(float(at) * 1000)) for series, value, at in
            (line.rsplit(" ", 2) for line in history.splitlines() if line and not line.startswith("#"))]
    httpx.post(f"{victoria.url}/api/v1/import/prometheus",
               content="".join(f"{series} {value} {at}\n" for series, value, at in rows)).raise_for_status()
    httpx.get(f"{victoria.url}/internal/force_flush").raise_for_status()
    wait_until_counted(victoria, rows)
    # The goodput waits' histories end now, a run's last samples exactly Prometheus' lookback (5 minutes) before:
    # within a second of their end VictoriaMetrics' job list still has that run's state. The fixed 2 s sleep after
    # the import gave them that margin (and histories that ended long ago 2 s for nothing).
    time.sleep(max(0.0, max(at for *_, at in rows) / 1000 + 2 - time.time()))


def wait_until_counted(victoria: VictoriaMetricsServer, rows: list[tuple[str, str, int]]) -> None:
    """Return once VictoriaMetrics counts every imported (series, value, milliseconds) sample: some of a flushed
    import is searchable a moment later only (up to 0.9 s here), and the fixed sleep that waited for it went on
    either way. The count bypasses the rollup cache: one cached while samples were missing would stay short."""
    expected = len({(series, at) for series, _, at in rows})
    first, last = min(at for *_, at in rows), max(at for *_, at in rows)
    count = f'sum(count_over_time({{__name__=~".+"}}[{(last - first) // 1000 + 1}s]))'
    deadline, counted = time.monotonic() + 30, None
    while counted != expected and time.monotonic() < deadline:
        answer = httpx.get(f"{victoria.url}/api/v1/query", params={"query": count, "time": last / 1000, "nocache": 1})
        result = answer.raise_for_status().json()["data"]["result"]
        counted = round(float(result[0]["value"][1])) if result else 0
        if counted != expected:
            time.sleep(0.05)
    assert counted == expected, f"VictoriaMetrics counts {counted} of the {expected} samples imported"


@contextmanager
def backfilled_backend(kind: str, work: Path, history: str):
    """A started Prometheus ("prometheus": promtool's blocks) or VictoriaMetrics ("victoria": imported) holding
    `history`, stopped after."""
    server = VictoriaMetricsServer(work) if kind == "victoria" else backfilled_prometheus(work, history)
    with running(server) as backend:
        if kind == "victoria":
            import_to_victoria(backend, history)
        yield backend


def backfilled_history(history: Callable[[float], str], name: str):
    """A module's fixture: `history(written)`, the series up to `written` (now), in a Prometheus (promtool's blocks)
    and in a VictoriaMetrics (imported); each yields (the backend, written)."""
    @pytest.fixture(scope="module", params=["prometheus", "victoria"])
    def backfilled(request, tmp_path_factory):
        written = time.time()
        with backfilled_backend(request.param, tmp_path_factory.mktemp(name), history(written)) as backend:
            yield backend, written

    return backfilled


def take_blocks(prometheus: PrometheusServer, blocks: Path) -> None:
    """promtool's blocks in `blocks` moved into the (stopped) Prometheus' store: read at its next start."""
    for block in blocks.iterdir():
        shutil.move(str(block), prometheus.data_dir / block.name)


def empty_vector(request: httpx.Request) -> httpx.Response:
    """A Prometheus that knows nothing: every query answers an empty vector, /-/ready answers 200."""
    if request.url.path == "/-/ready":
        return httpx.Response(200, text="Prometheus Server is Ready.\n")
    return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": []}})


def same_answer(ours, theirs, where: str = "") -> None:
    """Equal, but for float digits the backends cannot share (nor VictoriaMetrics with itself once it merged
    its data). VictoriaMetrics stores a value to 12-15 significant digits: a unix time stored as a value (a
    job's start and end) to 10 microseconds, a loss to 1e-12 relative. So times agree to 20 us; figures
    derived from them differ by those microseconds over the job's duration (fail-1 runs for ~65 ms: 3e-5
    relative) and may round the other way at 6 digits."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        assert set(ours) == set(theirs), where
        for key in ours:
            if key != "evaluated_at":
                same_answer(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for index, (a, b) in enumerate(zip(ours, theirs)):
            same_answer(a, b, f"{where}[{index}]")
    elif isinstance(ours, float) and isinstance(theirs, float):
        if where.endswith(("_time", "_at", ".time")):
            assert ours == pytest.approx(theirs, abs=2e-5), where
        else:
            assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-12), where
    else:
        assert ours == theirs, where



# ----- real jobs ----------------------------------------------------------------------------------------

def train_command(*args: str) -> list[str]:
    """The real `trainmetrics train` command line."""
    return [sys.executable, "-m", "trainmetrics", "train", *args]


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* step=\d+ samples=\d+ loss=(\S+) ")
EVAL_LINE = re.compile(r" eval after step (\d+): loss (\S+)(?:, accuracy (\S+))?$")


@dataclass
class Run:
    """One run of a job that has exited (torchrun's processes for several ranks): what it printed."""

    returncode: int
    summaries: list[dict]       # by rank
    stderr: str                 # rank 0's

    @property
    def summary(self) -> dict:
        """Rank 0's summary line."""
        return self.summaries[0]


@dataclass
class RealJob:
    """A real job that has exited, run by run (a resumed job has several): what its rank 0 printed."""

    job_id: str
    runs: list[Run]

    @property
    def returncode(self) -> int:
        return self.runs[-1].returncode

    @property
    def summary(self) -> dict:
        """The last run's summary line (rank 0's)."""
        return self.runs[-1].summary

    @property
    def stderr(self) -> str:
        return "".join(run.stderr for run in self.runs)

    @property
    def logged_losses(self) -> list[tuple[float, float]]:
        """(unix time of the log line, loss) per logged interval, in order (4 decimals)."""
        losses = []
        for line in self.stderr.splitlines():
            match = LOG_LINE.match(line)
            if match and match.group(2) != "n/a":
                logged = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                losses.append((logged, float(match.group(2))))
        return losses

    @property
    def logged_evaluations(self) -> list[tuple[int, float, float | None]]:
        """(step, loss, accuracy) per evaluation, in order (4 decimals)."""
        found = [EVAL_LINE.search(line) for line in self.stderr.splitlines()]
        return [(int(m.group(1)), float(m.group(2)), None if m.group(3) is None else float(m.group(3)))
                for m in found if m]


def parse_run(job_id: str, returncode: int, stdout: str, stderr: str) -> Run:
    """A run from its exit code, stdout (every rank's summary line) and rank 0's stderr."""
    summaries = sorted((json.loads(line[len("summary "):]) for line in stdout.splitlines()
                        if line.startswith("summary ")), key=lambda summary: summary["rank"])
    assert summaries, f"job {job_id}: no summary line\n{stdout}\n{stderr[-3000:]}"
    return Run(returncode, summaries, stderr)


def finish(job_id: str, process: subprocess.Popen, stderr_lines: list[str] = (), timeout: float = 120) -> Run:
    """Wait for a job started by start_job and parse what it printed. Read by finish_reading, not communicate():
    what read_until's readline() had read ahead into stderr's buffer (a step's loss line and its evaluation's,
    written together) was lost, and the test's log missed an evaluation the job had made."""
    stdout, stderr = finish_reading(process, timeout=timeout)
    if process.log is not None:
        stderr = process.log.read_text()
    return parse_run(job_id, process.returncode, stdout, "".join(stderr_lines) + stderr)


def start_job(job_id: str, targets_dir: Path, *args: str, log: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `trainmetrics train` announced to Prometheus through targets_dir; its stderr piped, or in `log`
    (a job that logs every step outgrows a pipe nobody reads); `env`: variables added to its environment."""
    with open(log or os.devnull, "w") as log_file:
        process = subprocess.Popen(train_command("--job-id", job_id, "--targets-dir", str(targets_dir), *args),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE if log is None else log_file,
                                   text=True, cwd=Path(__file__).parent, env={**os.environ, **(env or {})})
    process.log = log
    return process


def start_ranks(job_id: str, targets_dir: Path, log_dir: Path, *args: str) -> subprocess.Popen:
    """Start `trainmetrics train` under torchrun with two ranks, each rank's stderr in log_dir (rank_log)."""
    log_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--redirects", "2",
               "--log-dir", str(log_dir), "-m", "trainmetrics", "train", "--job-id", job_id, "--targets-dir",
               str(targets_dir), *args]
    with open(log_dir / "launcher.log", "w") as launcher:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=launcher, text=True,
                                   cwd=Path(__file__).parent)
    process.log = log_dir
    return process


def rank_log(log_dir: Path, rank: int) -> Path | None:
    """A rank's stderr file under torchrun's log dir, once it exists."""
    return next(log_dir.glob(f"*/attempt_*/{rank}/stderr.log"), None)


def finish_ranks(job_id: str, process: subprocess.Popen, timeout: float = 120) -> Run:
    """Wait for a job started by start_ranks and parse what it printed (every rank's summary, rank 0's log)."""
    stdout, _ = process.communicate(timeout=timeout)
    log = rank_log(process.log, 0)
    return parse_run(job_id, process.returncode, stdout, log.read_text() if log else "")


def wait_for_log(log_dir: Path, needle: str, timeout: float = 120) -> None:
    """Poll rank 0's stderr file until it holds needle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = rank_log(log_dir, 0)
        if log is not None and needle in log.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not logged within {timeout}s under {log_dir}")


def signal_ranks(process: subprocess.Popen, signum: int) -> None:
    """Signal torchrun's workers (the job server's way: the launcher would die of SIGUSR1)."""
    for child in psutil.Process(process.pid).children(recursive=True):
        command = child.cmdline()
        if "train" in command and "torch.distributed.run" not in command:
            child.send_signal(signum)

def read_until(process: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """Read stderr lines until one contains needle; return them."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen:\n{''.join(lines)}")


def checkpointed_metrics(checkpoint_dir: Path) -> dict:
    """The job's own figures as its newest checkpoint holds them, at full precision (its losses' first, lowest,
    sum and count; its evaluations' count, lowest loss, highest accuracy; its longest step)."""
    import torch    # only here: the analytics tests otherwise never load it

    newest = max(checkpoint_dir.glob("step-*.pt"))
    return torch.load(newest, weights_only=True)["metrics_by_rank"][0]     # rank 0: the job's losses


# What must agree between Prometheus and the store it remote-writes to before the tests read the store.
# Sample counts of every series family the tests read over time: remote write sends each series through
# one of several shards, so one series' samples (a job's final state, say) can still be queued after
# another's have all arrived.
ARRIVED = ("count(last_over_time(trainer_job_end_timestamp_seconds[10m]))",
           "sum(max_over_time(trainer_samples_total[10m]))",
           "count(count_over_time(trainer_loss[10m]))",
           "sum(count_over_time(trainer_loss[10m]))",
           "sum(count_over_time(trainer_eval_history_index[10m]))",
           "count(trainer_heartbeat_timestamp_seconds)",
           "sum(count_over_time(trainer_job_state[10m]))",
           "sum(count_over_time(trainer_samples_total[10m]))",
           "sum(count_over_time(trainer_phase_seconds_total[10m]))")


def pause_and_resume(job_id: str, targets_dir: Path, work: Path, *args: str) -> list[Run]:
    """A two-rank job paused (SIGUSR1) once rank 0 logged step 40, then resumed to its end: its two runs."""
    first = start_ranks(job_id, targets_dir, work / "logs-1", *args)
    try:
        wait_for_log(work / "logs-1", "step=40 ")
        signal_ranks(first, signal.SIGUSR1)
        paused = finish_ranks(job_id, first)
    finally:
        if first.poll() is None:
            first.kill()
    second = start_ranks(job_id, targets_dir, work / "logs-2", *args, "--resume")
    try:
        return [paused, finish_ranks(job_id, second)]
    finally:
        if second.poll() is None:
            second.kill()


CANCELLED_JOB_NAME = "=1+2 cancelled"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A real Prometheus remote-writing into a real VictoriaMetrics, and four real jobs that have exited:
    completed (logging every step, evaluating every 10), failed, cancelled, and a two-rank job paused and
    resumed to completion. Yields ({backend name: server}, jobs, work dir); both backends hold every sample.

    They run at once (each pays ~6 s of interpreter and torch start-up); the module's tests share them.
    """
    victoria = VictoriaMetricsServer(tmp_path_factory.mktemp("victoria")).start()
    prometheus = PrometheusServer(tmp_path_factory.mktemp("prometheus"),
                                  remote_write=[victoria.remote_write_url]).start()
    work = tmp_path_factory.mktemp("jobs")
    targets = prometheus.targets_dir
    processes: list[subprocess.Popen] = []
    try:
        common = ("--model", "mlp", "--dataset", "blobs")
        with concurrent.futures.ThreadPoolExecutor(1) as background:
            ranks = background.submit(pause_and_resume, "ddp-1", targets, work / "ddp", *common, "--epochs", "12",
                                      "--batch-size", "32", "--log-every", "1", "--eval-every", "15", "--owner",
                                      "carol", "--checkpoint-dir", str(work / "ddp" / "checkpoints"))
            # 5 ms more a step: on one OpenMP thread its 400 steps took 0.5 s, under the 1 s a peak rate is read
            # over, and a run that short has no measured peak (the test read None).
            done = start_job("done-1", targets, *common, "--epochs", "8", "--log-every", "1", "--eval-every", "10",
                             "--owner", "alice", "--checkpoint-dir", str(work / "done"), log=work / "done.log",
                             env={"TRAINMETRICS_FAULTS": '{"slow_compute": {"job": "done-1", "seconds": 0.005}}'})
            processes.append(done)
            fail_ckpt = work / "fail"
            failing = start_job("fail-1", targets, *common, "--epochs", "50", "--batch-size", "16",
                                "--log-every", "10", "--owner", "bob", "--checkpoint-dir", str(fail_ckpt),
                                "--checkpoint-every", "5")
            # Long log intervals: some of its losses stay published for over a second.
            # A name a spreadsheet would run as a formula (the CSV answers must not let it).
            cancelled = start_job("cancel-1", targets, *common, "--epochs", "50", "--batch-size", "16",
                                  "--log-every", "150", "--owner", "bob", "--job-name", CANCELLED_JOB_NAME)
            processes += [failing, cancelled]
            fail_lines = read_until(failing, "step=10 ")
            # The checkpoint dir turns into a file: the next checkpoint write fails for real. (A rename, not a
            # removal: the job may be writing a checkpoint into it right now.)
            fail_ckpt.rename(work / "fail-moved")
            fail_ckpt.write_text("not a directory")
            # Cancel once Prometheus scrapes the job and three more losses were logged, so its rates are
            # measured before the end.
            prometheus.wait_for('trainer_samples_total{job_id="cancel-1"} > 0', timeout=30)
            scraped_at, cancel_lines, losses = time.monotonic(), [], 0
            # And over 3 s after that: on one OpenMP thread three intervals took under the 1 s a peak rate is
            # read over, and a run that short has no measured peak.
            while losses < 3 or time.monotonic() - scraped_at < 3:
                cancel_lines += read_until(cancelled, " loss=")
                losses += 1
            cancelled.send_signal(signal.SIGTERM)
            jobs = {"done-1": RealJob("done-1", [finish("done-1", done)]),
                    "fail-1": RealJob("fail-1", [finish("fail-1", failing, fail_lines)]),
                    "cancel-1": RealJob("cancel-1", [finish("cancel-1", cancelled, cancel_lines)]),
                    "ddp-1": RealJob("ddp-1", ranks.result(timeout=300))}
        victoria.wait_until_agrees(prometheus, ARRIVED)
        yield {"prometheus": prometheus, "victoria-metrics": victoria}, jobs, work
    finally:
        kill_left(processes)
        prometheus.stop()
        victoria.stop()
