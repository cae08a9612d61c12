"""`trainmetrics exporter` flags: bad input exits 2 with one line on stderr; good input serves and stops."""

import argparse
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from exporters import cli
from exporters.collectors import COLLECTORS
from tests.exporters.exporter_fixtures import parse_exposition
from trainmetrics.prometheus_process import free_port

REPO = Path(__file__).resolve().parents[2]


def exporter_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "exporters", *args]


def run_exporter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(exporter_command(*args), capture_output=True, text=True, timeout=30, cwd=REPO)


@pytest.mark.parametrize("args, message", [
    (["--collector.nope"], "unknown collector 'nope'"),
    (["--no-collector.nope"], "unknown collector 'nope'"),
    (["--sample-interval", "0"], "--sample-interval must be > 0"),
    (["--sample-interval", "-1"], "invalid duration"),
    (["--sample-interval", "fast"], "invalid duration"),
    (["--sample-interval", "200ms", "--peak-window", "100ms"], "--peak-window (0.1s) must be >= --sample-interval"),
    (["--listen", "127.0.0.1:99999"], "invalid listen address"),
])
def test_bad_flags_exit_2_with_one_line(args, message, tmp_path):
    result = run_exporter("--job-dir", str(tmp_path), *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_port_in_use_exits_2_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_exporter("--job-dir", str(tmp_path), "--listen", f"127.0.0.1:{taken.getsockname()[1]}")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "cannot listen on" in result.stderr


def test_unreadable_job_dir_exits_2_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_exporter("--job-dir", str(blocker / "jobs"), "--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "job dir" in result.stderr


def test_collector_flags_come_from_the_table():
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["--no-collector.gpu", "--collector.cpu"])
    assert {name: getattr(args, f"collector_{name}") for name in COLLECTORS} == {
        name: name != "gpu" for name in COLLECTORS}
    assert args.sample_interval == 0.1 and args.peak_window == 1.0


@pytest.mark.parametrize("text, seconds", [("0.1", 0.1), ("100ms", 0.1), ("1s", 1.0), ("2m", 120.0), (".5", 0.5)])
def test_durations(text, seconds):
    assert cli.parse_duration(text) == pytest.approx(seconds)


def test_serves_selected_collectors_and_stops_on_sigterm(tmp_path):
    port = free_port()
    process = subprocess.Popen(exporter_command("--listen", f"127.0.0.1:{port}", "--job-dir", str(tmp_path),
                                                "--no-collector.gpu", "--no-collector.filesystem",
                                                "--sample-interval", "50ms", "--peak-window", "500ms"),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        body = None
        while body is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    body = response.read()
            except OSError:
                time.sleep(0.1)
        assert body is not None, "exporter did not answer"
        collectors = {dict(labels)["collector"] for labels in parse_exposition(body)["exporter_collector_success"]}
        assert collectors == set(COLLECTORS) - {"gpu", "filesystem"}
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
