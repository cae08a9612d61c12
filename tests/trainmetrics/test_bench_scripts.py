"""The benchmarks as tools: a missing binary is one line before anything starts, and SIGTERM stops what a
benchmark started (it killed the benchmark alone: its exporters, Prometheus or Ray cluster ran on)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_a_missing_node_exporter_is_one_line_and_starts_nothing(tmp_path):
    env = {**os.environ, "NODE_EXPORTER_BIN": str(tmp_path / "nope"), "TMPDIR": str(tmp_path)}
    for script in ("peak_capture.py", "exporter_vs_node_exporter.py"):
        result = subprocess.run([sys.executable, str(BENCH / script)], env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip() == (f"{script}: error: {tmp_path / 'nope'} is not an executable file (install "
                                         "it, or set NODE_EXPORTER_BIN)")
        assert list(tmp_path.iterdir()) == []           # no work dir: nothing was started


def test_sigterm_stops_the_processes_a_benchmark_started():
    bench = subprocess.Popen([sys.executable, str(BENCH / "exporter_load.py"), "--seconds", "120"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        children = []
        while not children and time.monotonic() < deadline:
            children = psutil.Process(bench.pid).children(recursive=True)
            time.sleep(0.1)
        assert children, "the benchmark started no exporter"
        time.sleep(1)
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert alive == [], f"left running: {alive}"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()


@pytest.mark.parametrize("script, flags", [
    ("trainer_overhead.py", ["--scrapes-per-second", "nan"]),     # was taken: "not scraped", said nowhere
    ("trainer_overhead.py", ["--step-ms", "inf"]),
    ("central_ingestion.py", ["--senders", "0"]),                 # nothing sent: it waited for ever
    ("analytics_latency.py", ["--calls", "0"]),                    # an IndexError after minutes of backfill
    ("load_analytics.py", ["--clients", "0"]),
    ("exporter_vs_node_exporter.py", ["--seconds", "0"]),
    ("peak_capture.py", ["--seconds", "3"]),
    ("submit_latency.py", ["--jobs", "0"]),
    ("metrics_flood.py", ["--clients", "0"]),
])
def test_a_nonsense_flag_is_refused_in_one_line_before_anything_starts(script, flags):
    env = {**os.environ, "NODE_EXPORTER_BIN": shutil.which("true")}     # the flag refused, not the binary
    result = subprocess.run([sys.executable, str(BENCH / script), *flags], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1].startswith(f"{script}: error: "), result.stderr[-2000:]


def test_a_baseline_runs_its_own_analytics_not_this_checkouts(tmp_path):
    """--baseline DIR: the service's `trainmetrics.analytics` is DIR's analytics/ (this checkout's editable install maps
    that name here: a baseline tree ran this checkout's code and was timed as the baseline)."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        from bench.analytics_latency import service_code
    finally:
        sys.path.remove(str(BENCH.parent))
    for part in ("analytics", "trainmetrics"):
        shutil.copytree(BENCH.parent / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-c", service_code(tmp_path), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip() == f"baseline analytics from {tmp_path.resolve() / 'analytics' / 'cli.py'}"
