"""The benchmarks as tools: a missing binary is one line before anything starts, and SIGTERM stops what a
benchmark started (it killed the benchmark alone: its exporters, Prometheus or Ray cluster ran on)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

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
