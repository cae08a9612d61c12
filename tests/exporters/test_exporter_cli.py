"""`trainmetrics exporter` flags: bad input exits 2 with one line on stderr naming the flag; --help explains every
option; good input says where it listens, serves and stops."""

import argparse
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from trainmetrics.exporters import cli
from trainmetrics.exporters.collectors import COLLECTORS
from trainmetrics.exporters.job_energy import shared_state_directory, state_file_for
from tests.exporters.exporter_fixtures import parse_exposition
from tests.processes import finish_reading
from trainmetrics.prometheus_process import free_port

REPO = Path(__file__).resolve().parents[2]


def exporter_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainmetrics", "exporter", *args]


def run_exporter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(exporter_command(*args), capture_output=True, text=True, timeout=30, cwd=REPO)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("trainmetrics exporter: error: ") and message in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--collector.nope"], "--collector.nope: unknown collector 'nope' (known: cpu, memory,"),
    (["--no-collector.nope"], "--no-collector.nope: unknown collector 'nope'"),
    (["--sample-interval", "0"], "--sample-interval: must be from 10ms to 15s, got '0'"),
    (["--sample-interval", "-1"], "--sample-interval: invalid duration"),
    (["--slow-interval", "fast"], "--slow-interval: invalid duration"),
    (["--peak-window", "1h"], "--peak-window: invalid duration"),
    (["--sample-interval", "200ms", "--peak-window", "100ms"],
     "--peak-window: must be from --sample-interval (200ms) to 30s, got '100ms'"),
    # Each was only > 0: a slow loop faster than the fast one, a window or an interval of years (a thread's wait
    # overflowed; a window kept every sample), a fast loop faster than its own pass.
    (["--sample-interval", "1ms"], "--sample-interval: must be from 10ms to 15s, got '1ms'"),
    (["--sample-interval", "1m"], "--sample-interval: must be from 10ms to 15s, got '1m'"),
    (["--slow-interval", "0"], "--slow-interval: must be from --sample-interval (100ms) to 15s, got '0'"),
    (["--slow-interval", "50ms"], "--slow-interval: must be from --sample-interval (100ms) to 15s, got '50ms'"),
    (["--slow-interval", "-1"], "--slow-interval: invalid duration"),
    (["--slow-interval", "nan"], "--slow-interval: invalid duration"),
    (["--slow-interval", "inf"], "--slow-interval: invalid duration"),
    (["--slow-interval", "99999999999999999999m"], "--slow-interval: must be from --sample-interval (100ms) to 15s"),
    (["--peak-window", "0"], "--peak-window: must be from --sample-interval (100ms) to 30s, got '0'"),
    (["--peak-window", "31s"], "--peak-window: must be from --sample-interval (100ms) to 30s, got '31s'"),
    (["--peak-window", "9" * 400], "--peak-window: must be from --sample-interval (100ms) to 30s"),
    (["--peak-window", "nan"], "--peak-window: invalid duration"),
    (["--listen", "127.0.0.1:99999"], "--listen: invalid listen address"),
    # Read as host ':' and port 1 ("cannot listen on ::1: Name or service not known"), and as [::1]:9400.
    (["--listen", "::1"], "--listen: invalid listen address '::1': an IPv6 address goes in brackets: write [::1]:PORT"),
    (["--listen", "::1:9400"], "--listen: invalid listen address '::1:9400': an IPv6 address goes in brackets: "
                               "write [::1]:9400"),
    (["--listen", "no-port"], "--listen: invalid listen address"),
    (["--web.config.file", "/nonexistent/web.yml"], "--web.config.file: web config /nonexistent/web.yml"),
])
def test_bad_flags_exit_2_with_one_line(args, message, tmp_path):
    assert_one_line_error(run_exporter("--job-dir", str(tmp_path), *args), message)


def test_port_in_use_exits_2_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_exporter("--job-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}", "--no-collector.gpu")
    assert_one_line_error(result, f"--listen: cannot listen on 127.0.0.1:{port}: address already in use")


def test_unreadable_job_dir_exits_2_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_exporter("--job-dir", str(blocker / "jobs"), "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(result, f"--job-dir: '{blocker / 'jobs'}' is not a directory ('{blocker}' is a file)")
    result = run_exporter("--job-dir", str(blocker), "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(result, f"--job-dir: '{blocker}' is not a directory")


def test_a_relative_job_dir_is_resolved_and_the_root_refused(tmp_path):
    """`--job-dir .` was a traceback (the energy accounts go beside the directory: `.` has no name), and
    `--job-dir jobs/sub/..` put them inside the job directory, where any job's user may write."""
    jobs = tmp_path / "jobs"
    (jobs / "sub").mkdir(parents=True)
    assert cli.job_dir_flag(str(jobs / "sub" / "..")) == jobs
    process = subprocess.Popen(exporter_command("--listen", f"127.0.0.1:{free_port()}", "--job-dir", ".",
                                                "--no-collector.gpu"), cwd=jobs, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    said = []
    hung = threading.Timer(30, process.kill)      # (one that neither says it listens nor exits: readline's end)
    hung.start()
    try:
        # Through its start (where `.` raised) once it says where it listens, about 0.4 s in: a fixed 3 s sleep
        # waited 2.6 s more for nothing.
        while not said or "listening on" not in said[-1]:
            said.append(process.stderr.readline())
            assert said[-1], "it exited without listening within 30 s: " + "".join(said)
        assert process.poll() is None, "".join(said)
    finally:
        hung.cancel()
        process.send_signal(signal.SIGTERM)
        stderr = "".join(said) + finish_reading(process, timeout=30)[1]
    assert process.returncode == 0 and "Traceback" not in stderr, stderr
    assert_one_line_error(run_exporter("--job-dir", "/", "--listen", f"127.0.0.1:{free_port()}"),
                          "--job-dir: '/' is the root directory")


def test_help_explains_every_option_and_says_each_default_once():
    result = run_exporter("--help")
    assert result.returncode == 0, result.stderr
    options = " ".join(result.stdout.split("options:", 1)[1].split())     # one line, single spaces
    entries = re.split(r" (?=-h, |--[\w.-]+[ ,])(?<!, )", " " + options)[1:]
    helps = {entry.split(" ", 1)[0].rstrip(","): entry for entry in entries}
    assert set(helps) >= {"--listen", "--web.config.file", "--sample-interval", "--slow-interval", "--peak-window",
                          "--job-dir", "--log-level", *(f"--collector.{name}" for name in COLLECTORS)}
    for entry in helps.values():
        assert entry.count("default") <= 1, entry
        assert "(default: True)" not in entry and "(default: False)" not in entry, entry
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    assert all(action.help for action in parser._actions), [action.dest for action in parser._actions if not action.help]
    for name, spec in COLLECTORS.items():
        assert helps[f"--collector.{name}"].endswith(f"(default: {'on' if spec.enabled_by_default else 'off'})")
    assert helps["--sample-interval"].endswith("(default: 100ms)")
    assert helps["--listen"].endswith("(default: 127.0.0.1:9105)")


def test_collector_flags_come_from_the_table():
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["--no-collector.gpu", "--collector.cpu"])
    assert {name: getattr(args, f"collector_{name}") for name in COLLECTORS} == {
        name: name != "gpu" for name in COLLECTORS}
    assert cli.durations(args) == (0.1, 1.0, 1.0)


@pytest.mark.parametrize("text, seconds", [("0.1", 0.1), ("100ms", 0.1), ("1s", 1.0), ("2m", 120.0), (".5", 0.5)])
def test_durations(text, seconds):
    assert cli.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("flags, seconds", [
    (["--sample-interval", "10ms", "--slow-interval", "10ms", "--peak-window", "10ms"], (0.01, 0.01, 0.01)),
    (["--sample-interval", "15s", "--slow-interval", "15s", "--peak-window", "30s"], (15.0, 15.0, 30.0)),
    (["--sample-interval", "0.25", "--slow-interval", "250ms", "--peak-window", "0.5m"], (0.25, 0.25, 30.0)),
])
def test_the_interval_bounds_are_allowed(flags, seconds):
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    assert cli.durations(parser.parse_args(flags)) == pytest.approx(seconds)


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
    assert f"trainmetrics exporter: listening on http://127.0.0.1:{port}/metrics (collectors: cpu," in stderr


def test_a_job_dir_beside_which_other_users_write_is_refused(tmp_path):
    """In a shared sticky directory (/tmp) another user's file at the energy state file's name blocked every save
    for good (only a warning; the counts started from 0 at each restart): refused at the start, naming the path."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    result = run_exporter("--job-dir", str(shared / "jobs"), "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(result, f"--job-dir: other users can create files in '{shared}', where the energy state "
                                  f"file '{shared / 'jobs.energy.json'}' would be")
    (shared / "private").mkdir(mode=0o755)
    assert shared_state_directory(state_file_for(shared / "private" / "jobs")) is None
    assert shared_state_directory(state_file_for(shared / "private" / "new" / "jobs")) is None
    assert shared_state_directory(state_file_for(shared / "elsewhere" / "jobs")) == shared
