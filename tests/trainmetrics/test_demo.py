"""`trainmetrics demo --exit-after-job`: the whole stack with a real Prometheus, as `make demo` runs it."""

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import finish_reading
from trainmetrics.cli import main
from trainmetrics.contract import MODELS
from trainmetrics.demo import _port_or_free, dataset_for, job_name, submit_line, write_digits_csv
from trainmetrics.trainer.data import load_dataset
from trainmetrics.trainer.models import build_model


def test_demo_runs_a_job_through_prometheus_and_reads_it_back(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainmetrics", "demo", "--exit-after-job", "--epochs", "3", "--batch-size", "32",
         "--prometheus-port", "0", "--exporter-port", "0", "--server-port", "0", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^Prometheus\s+http://127\.0\.0\.1:\d+", out, re.M)
    assert "graph?g0.expr=trainer_loss" in out
    assert re.search(r"state\s+completed", out)
    assert re.search(r"dataset ds-\w+: 1797 rows, 64 features", out)
    assert re.search(r"^  steps\s+135$", out, re.M)                 # 3 epochs x ceil(1438 / 32)
    assert re.search(r"^  evaluations\s+3$", out, re.M)             # one per epoch, held until read
    # Every evaluation from the analytics, in order, readable at a glance (clock times, no 1.796e+09).
    rows = re.findall(r"^    step\s+(\d+)  (\d\d:\d\d:\d\d\.\d{3})  loss (\d\.\d{4})  accuracy (\d\.\d{4})$", out, re.M)
    assert [int(step) for step, *_ in rows] == [45, 90, 135]
    assert float(rows[-1][3]) > 0.8
    assert "e+0" not in out.split("Analytics:", 1)[1]
    # 3 x 1438 samples; the rate has four significant digits (a decimal point below 1,000/s: a loaded host).
    assert re.search(r"^  throughput\s+\d[\d,]*(\.\d+)? samples/s over 4,314 samples", out, re.M)
    # The goodput ledger, and the energy line: joules, or why not (no GPU and no readable RAPL here; a job
    # this short may also end before the exporter attributes it).
    goodput = re.search(r"^  goodput\s+([\d.]+) % of ([\d.]+) s from submission to end: (.*)$", out, re.M)
    assert goodput and 0 < float(goodput[1]) < 100, out
    parts = dict(re.findall(r"(\w+) ([\d.]+) s", goodput[3]))
    assert {"init", "step"} <= set(parts) and sum(map(float, parts.values())) == pytest.approx(float(goodput[2]), rel=0.01)
    assert re.search(r"^  energy\s+(\d[\d,.]* J, [\d,.]+ samples/J|no .+)$", out, re.M), out


def kill_all(demo: subprocess.Popen, started: list) -> None:
    """The demo and what it started, killed if still there; its pipes closed."""
    import psutil

    for process in [demo, *started]:
        try:
            process.kill()
        except (psutil.Error, ProcessLookupError):
            pass
    if demo.poll() is None:
        demo.wait()
    for pipe in (demo.stdout, demo.stderr):
        if pipe is not None:
            pipe.close()


def test_a_default_port_its_last_run_left_in_time_wait_is_taken_again():
    """A demo run again right after the last one (Ctrl-C, then `make demo`) gets 9090, 9105 and 8000 again:
    the connections its servers closed leave those ports in TIME_WAIT for a minute, which the servers' own
    SO_REUSEADDR binds ignore; the probe took them for in use and moved every URL to a random port."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()            # the server closes first: its side, on `port`, waits in TIME_WAIT
            client.recv(1)
    assert _port_or_free(port) == port
    with socket.create_server(("127.0.0.1", 0)) as live:       # a live listener still moves the demo
        assert _port_or_free(live.getsockname()[1]) != live.getsockname()[1]


@pytest.mark.parametrize("stop,ignored_at_start", [("SIGTERM", None), ("SIGINT", "SIGINT")])
def test_a_stop_signal_stops_the_demo_and_everything_it_started(tmp_path, stop, ignored_at_start):
    """A `kill` (or a supervisor, a closed terminal) killed the demo alone: Prometheus, the node exporter and the
    job server ran on, orphaned. SIGTERM now stops it as Ctrl-C does, and the temp dir it made goes with it
    (every run left one behind). A demo started with SIGINT ignored (`make demo &` in a script: the shell ignores
    it for background commands) ignored `kill -INT`, which stops the job server, the analytics and the exporter
    started the same way."""
    import signal

    import psutil

    def ignore():
        if ignored_at_start:
            signal.signal(signal.Signals[ignored_at_start], signal.SIG_IGN)

    demo = subprocess.Popen(
        [sys.executable, "-m", "trainmetrics", "demo", "--epochs", "1", "--prometheus-port", "0", "--exporter-port",
         "0", "--server-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)}, preexec_fn=ignore)
    started = []
    try:
        for line in demo.stdout:
            if line.startswith("job server"):       # Prometheus, the exporter and the server are up
                break
        started = psutil.Process(demo.pid).children()
        assert len(started) >= 3, started
        demo.send_signal(signal.Signals[stop])
        rest, _ = finish_reading(demo, timeout=90)         # the loop read part of its stdout
        assert demo.returncode == 0 and "stopping" in rest, rest[-1500:]
        gone, alive = psutil.wait_procs(started, timeout=10)
        assert alive == [], [p.cmdline() for p in alive]
        assert list(tmp_path.iterdir()) == []
    finally:
        kill_all(demo, started)


def test_a_terminals_ctrl_c_while_the_job_trains_stops_prometheus_last(tmp_path):
    """Ctrl-C on a terminal goes to the whole foreground process group: Prometheus, stopped along with the demo,
    was gone before the job server paused the job, which then waited its whole 15 s linger for a scrape of its
    final state that never came (the demo took some 16 s to stop). Only the demo takes it now, and stops
    Prometheus last. (start_new_session: the demo leads its group, as a shell's foreground job does.)"""
    import signal

    import psutil

    demo = subprocess.Popen(
        [sys.executable, "-m", "trainmetrics", "demo", "--epochs", "200", "--workdir", str(tmp_path),
         "--prometheus-port", "0", "--exporter-port", "0", "--server-port", "0"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started = []
    try:
        for line in demo.stdout:
            if "eval after step" in line:           # the job trains
                break
        started = psutil.Process(demo.pid).children()
        os.killpg(demo.pid, signal.SIGINT)
        rest, _ = finish_reading(demo, timeout=90)
        assert demo.returncode == 0 and "stopping" in rest, rest[-1500:]
        assert psutil.wait_procs(started, timeout=10)[1] == []
        [log] = (tmp_path / "server" / "jobs").glob("*/train.log")
        assert '"state": "paused"' in log.read_text()
        assert "not read by every scraper" not in log.read_text()
    finally:
        kill_all(demo, started)


def test_a_wrong_prometheus_bin_is_one_line_and_leaves_no_work_dir(tmp_path):
    """PROMETHEUS_BIN naming no file was a FileNotFoundError traceback from Popen, after the demo had made its
    temporary work dir."""
    env = {**os.environ, "PROMETHEUS_BIN": str(tmp_path / "nope"), "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "trainmetrics", "demo", "--exit-after-job"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"trainmetrics demo: error: PROMETHEUS_BIN={tmp_path / 'nope'}: not an executable file"
    assert list(tmp_path.iterdir()) == []


REFUSES_A_FLAG = """#!/bin/sh
echo "Error parsing commandline arguments: unknown long flag '--web.enable-lifecycle'" >&2
yes '      --flag=VALUE  what the usage text, 10 KB of it, says of each flag' | head -n 150 >&2
exit 2
"""


@pytest.mark.parametrize("prometheus,said", [
    (None, "false exited with 1 "),
    (REFUSES_A_FLAG, "prometheus exited with 2: Error parsing commandline arguments: unknown long flag "
                     "'--web.enable-lifecycle' ")])
def test_a_prometheus_that_exits_at_its_start_is_one_line_naming_its_log(tmp_path, prometheus, said):
    """An older Prometheus refusing the config (here /bin/false) ended the demo in a RuntimeError traceback. One
    refusing a flag prints its usage after the error: the line said a scrap of that usage instead."""
    binary = Path("/bin/false")
    if prometheus:
        binary = tmp_path / "bin" / "prometheus"
        binary.parent.mkdir()
        binary.write_text(prometheus)
        binary.chmod(0o755)
    env = {**os.environ, "PROMETHEUS_BIN": str(binary)}
    result = subprocess.run([sys.executable, "-m", "trainmetrics", "demo", "--exit-after-job", "--workdir",
                             str(tmp_path), "--prometheus-port", "0"], env=env, capture_output=True, text=True,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0] == (f"trainmetrics demo: error: Prometheus did not start: {said}"
                        f"(its log: {tmp_path / 'prometheus' / 'prometheus.log'})")


def test_a_job_server_that_exits_at_its_start_is_one_line_naming_its_log(tmp_path):
    """A job server that could not start (here its data dir is a file; a demo already running in the same work
    dir holds it) was waited for 60 s, then the demo ended in a RuntimeError traceback."""
    (tmp_path / "server").write_text("not a directory")
    result = subprocess.run([sys.executable, "-m", "trainmetrics", "demo", "--exit-after-job", "--workdir",
                             str(tmp_path), "--prometheus-port", "0", "--exporter-port", "0", "--server-port", "0"],
                            capture_output=True, text=True, timeout=55)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("trainmetrics demo: error: the job server did not start: it exited with code 2: "
                               "trainmetrics server: error: --data-dir: "), lines[0]
    assert lines[0].endswith(f"(its log: {tmp_path / 'server.log'})")


@pytest.mark.parametrize("model", MODELS)
def test_every_model_the_demo_offers_can_train_on_its_dataset(model, tmp_path):
    """--model cnn and transformer were offered, then the job failed at its start: the uploaded CSV is tabular."""
    uploaded = write_digits_csv(tmp_path / "digits.csv")
    dataset = load_dataset(dataset_for(model, str(uploaded)))
    build_model(model, dataset)


def test_the_transformer_demo_job_is_named_for_what_it_learns():
    """Every demo job was named "demo digits classifier": the transformer's too, which learns the text corpus."""
    assert job_name("transformer") == "demo corpus language model"
    assert job_name("mlp") == job_name("cnn") == "demo digits classifier"


def test_a_one_epoch_demo_says_one_epoch():
    """`--epochs 1` printed "transformer, 1 epochs on the built-in corpus"."""
    assert submit_line("transformer", 1, "corpus", "ds-1") == "transformer, 1 epoch on the built-in corpus"
    assert submit_line("mlp", 15, "ds-1", "ds-1") == "mlp, 15 epochs"


@pytest.mark.parametrize("then", ["nothing", "ctrl-c"])
def test_a_demo_whose_reader_quit_stops_everything_it_started_without_a_traceback(tmp_path, then):
    """`trainmetrics demo | head`: head gone, the demo's next line raised BrokenPipeError, a traceback. Or
    `| less`, q, then Ctrl-C: the line saying it stops raised it in the interrupt's handler."""
    import signal

    import psutil

    demo = subprocess.Popen(
        [sys.executable, "-m", "trainmetrics", "demo", "--epochs", "1", "--prometheus-port", "0", "--exporter-port",
         "0", "--server-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    started = []
    try:
        last = "job server" if then == "nothing" else "Everything keeps running"
        for line in demo.stdout:
            if line.lstrip().startswith(last):
                break
        started = psutil.Process(demo.pid).children()
        demo.stdout.close()                 # the reader quits
        if then == "ctrl-c":
            demo.send_signal(signal.SIGINT)
        stderr = demo.stderr.read()
        assert demo.wait(timeout=90) == 0 and "Traceback" not in stderr, stderr[-1500:]
        assert psutil.wait_procs(started, timeout=10)[1] == []
        assert list(tmp_path.glob("trainmetrics-demo-*")) == []        # its work dir (torch may leave a cache)
    finally:
        kill_all(demo, started)


def test_the_demo_without_the_train_extra_is_one_line_naming_it_before_anything_starts(tmp_path, monkeypatch, capsys):
    """The core package alone (no scikit-learn, no torch) started Prometheus, the exporter and the job server, then
    ended in a ModuleNotFoundError traceback where the demo writes its CSV, its temp dir kept."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name in ("torch", "sklearn")
                        else find_spec(name, *rest))
    monkeypatch.setenv("PROMETHEUS_BIN", str(tmp_path / "nope"))   # not started, whichever check says no
    code = main(["demo", "--exit-after-job"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.strip() == ("trainmetrics demo: error: the demo trains a model and needs PyTorch, "
                                            "scikit-learn: pip install 'trainmetrics[train]'"), stderr


def test_a_second_demo_in_the_same_work_dir_is_one_line_and_leaves_the_first_ones_files_alone(tmp_path):
    """A second `trainmetrics demo --workdir DIR` while one ran there overwrote the first one's Prometheus config
    and log and started a second Prometheus on its data (Prometheus takes no lock on it); only the job server's
    own lock stopped it, with a line about --data-dir. Here the first demo's claim is held as a running one holds
    it (and /bin/false stands in for Prometheus, which the second demo must not start)."""
    from trainmetrics.demo import claim_workdir

    log = tmp_path / "prometheus" / "prometheus.log"
    log.parent.mkdir()
    log.write_text("the first demo's Prometheus log\n")
    with claim_workdir(tmp_path):
        result = subprocess.run([sys.executable, "-m", "trainmetrics", "demo", "--exit-after-job", "--workdir",
                                 str(tmp_path), "--prometheus-port", "0"], capture_output=True, text=True,
                                env={**os.environ, "PROMETHEUS_BIN": "/bin/false"}, timeout=120)
    assert result.returncode == 2, result.stderr
    said = result.stderr.strip()
    assert said == f"trainmetrics demo: error: --workdir: {tmp_path}: another trainmetrics demo uses it"
    assert log.read_text() == "the first demo's Prometheus log\n"
    assert not (tmp_path / "prometheus" / "prometheus.yml").exists()


def test_a_file_the_demo_cannot_write_is_one_line_naming_it_and_stops_everything(tmp_path):
    """A write that failed once the stack was up (a full disk; here a directory where the demo writes its CSV)
    ended the demo in a traceback."""
    import psutil

    (tmp_path / "digits.csv").mkdir()
    result = subprocess.run([sys.executable, "-m", "trainmetrics", "demo", "--exit-after-job", "--workdir",
                             str(tmp_path), "--prometheus-port", "0", "--exporter-port", "0", "--server-port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (f"trainmetrics demo: error: {tmp_path / 'digits.csv'}: Is a directory "
                                     f"(its logs: {tmp_path})")
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert left == []


def test_the_job_servers_refusal_or_silence_is_said_in_one_line():
    """A full disk's 507 to the upload, or a job server gone while the job trained, ended the demo in an httpx
    traceback."""
    import httpx

    from trainmetrics.demo import what_failed

    upload = httpx.Request("POST", "http://127.0.0.1:8000/api/training/datasets?name=digits.csv")
    full = httpx.Response(507, request=upload, json={"error": {"code": "insufficient_storage",
                                                               "message": "no space left on the server's disk"}})
    refused = httpx.HTTPStatusError("507", request=upload, response=full)
    assert what_failed(refused) == ("the job server answered POST /api/training/datasets with 507: no space left "
                                    "on the server's disk")
    follow = httpx.Request("GET", "http://127.0.0.1:8000/api/training/jobs/job-1")
    gone = httpx.ConnectError("[Errno 111] Connection refused", request=follow)
    assert what_failed(gone) == ("the job server did not answer GET /api/training/jobs/job-1: [Errno 111] "
                                 "Connection refused")


def test_a_demo_whose_terminal_closed_stops_everything_it_started_and_exits_0(tmp_path):
    """Closing the terminal (SIGHUP) stopped everything, but the line saying so met the closed terminal (EIO, not
    the BrokenPipeError of a reader that quit): the demo ended in a traceback and exit code 1."""
    import fcntl
    import termios

    import psutil

    controller, terminal = os.openpty()

    def own_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    errors = tmp_path / "stderr"
    with open(errors, "w") as stderr:
        demo = subprocess.Popen(
            [sys.executable, "-m", "trainmetrics", "demo", "--epochs", "1", "--prometheus-port", "0",
             "--exporter-port", "0", "--server-port", "0"], stdin=terminal, stdout=terminal, stderr=stderr,
            preexec_fn=own_terminal, env={**os.environ, "TMPDIR": str(tmp_path)})
    os.close(terminal)
    started = []
    try:
        shown = b""
        while b"job server" not in shown:
            shown += os.read(controller, 4096)
        started = psutil.Process(demo.pid).children()
        assert len(started) >= 3, started
        os.close(controller)            # the terminal window closes: the kernel hangs up its session
        controller = None
        assert demo.wait(timeout=90) == 0, errors.read_text()[-1500:]
        assert "Traceback" not in errors.read_text()
        assert psutil.wait_procs(started, timeout=10)[1] == []
        assert list(tmp_path.glob("trainmetrics-demo-*")) == []
    finally:
        if controller is not None:
            os.close(controller)
        kill_all(demo, started)
