"""`trainmetrics demo`: a real Prometheus, the node exporter and the job server, wired together.

Uploads a small CSV to the job server, submits the demo job, prints the Prometheus URLs for its loss
and throughput and its evaluations while it runs, then a summary read back from Prometheus. Ctrl-C
stops every child cleanly (the server pauses a job still running).
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from trainmetrics.command import (DEFAULT_ANALYTICS_PORT, DEFAULT_EXPORTER_PORT, DEFAULT_PROMETHEUS_PORT, FlagError,
                                  check_directory, check_directory_writable, lock_directory, path_argument)
from trainmetrics.contract import MODELS, spec_fields
from trainmetrics.signals import SERVICE_STOP_SIGNALS, signals_to_take


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the demo flags."""
    parser.epilog = ("environment: PROMETHEUS_BIN, the prometheus binary to run (default: prometheus on PATH; "
                     "`make demo` installs Debian's package when it is missing)")
    parser.add_argument("--workdir", type=path_argument, default=None,
                        help="where Prometheus data, logs, targets and checkpoints go, kept after the demo; one demo "
                             "at a time (default: a temp dir, removed when the demo ends well, kept when it fails)")
    parser.add_argument("--prometheus-port", type=int, default=DEFAULT_PROMETHEUS_PORT,
                        help="Prometheus port (a free one is picked if it is taken)")
    parser.add_argument("--exporter-port", type=int, default=DEFAULT_EXPORTER_PORT,
                        help="node exporter port (a free one is picked if it is taken)")
    parser.add_argument("--server-port", type=int, default=DEFAULT_ANALYTICS_PORT,
                        help="job server port (a free one is picked if it is taken)")
    parser.add_argument("--model", default="mlp", choices=MODELS,
                        help="demo job's model: mlp trains on the uploaded digits CSV, cnn on the same digits as "
                             "8x8 images, transformer on the built-in text corpus")
    parser.add_argument("--epochs", type=int, default=15, help="demo job's epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="demo job's batch size")
    parser.add_argument("--exit-after-job", action="store_true",
                        help="stop everything once the job has finished and its summary is printed")


def check_flags(args: argparse.Namespace) -> None:
    """FlagError naming the first bad flag, before anything is started (the stack came up first, then the job
    server's 400 ended the demo in a traceback)."""
    for flag in ("prometheus_port", "exporter_port", "server_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            raise FlagError("--" + flag.replace("_", "-"), f"must be a port, 0 to 65535, got {getattr(args, flag)}")
    fields = spec_fields()
    for flag in ("epochs", "batch_size"):
        # The job server's own check of these spec fields (with a lower bound alone here, --epochs 99999999999
        # reached the server's 400 once the whole stack had started, and ended the demo in a traceback).
        try:
            fields[flag].check(getattr(args, flag))
        except ValueError as error:
            raise FlagError("--" + flag.replace("_", "-"), str(error)) from None
    if args.workdir is not None:
        check_directory("--workdir", args.workdir)
        # Prometheus' data and the job's files go there: it, or the parent it is made in, takes files.
        check_directory_writable("--workdir", args.workdir)


# The uploaded CSV is tabular: the mlp trains on it; the other models on built-in datasets of their kind (the
# cnn needs images, the transformer text): a job on the CSV failed as bad input at its start.
BUILT_IN_DATASET_FOR = {"cnn": "digits", "transformer": "corpus"}


def dataset_for(model: str, uploaded: str) -> str:
    """The demo job's dataset for `model`: the uploaded one, or a built-in one it can train on."""
    return BUILT_IN_DATASET_FOR.get(model, uploaded)


def job_name(model: str) -> str:
    """The demo job's name, as Grafana and the analytics show it: what `model` learns on its dataset (every job
    was named "demo digits classifier", the transformer's on the text corpus too)."""
    return "demo corpus language model" if model == "transformer" else "demo digits classifier"


def submit_line(model: str, epochs: int, dataset: str, uploaded: str) -> str:
    """What the demo says it submitted, short of the job id ("mlp, 1 epochs" said it wrong)."""
    built_in = "" if dataset == uploaded else f" on the built-in {dataset}"
    return f"{model}, {epochs} epoch{'' if epochs == 1 else 's'}{built_in}"


def _port_or_free(port: int) -> int:
    """`port` when it is free, else (or for 0) a free one."""
    with socket.socket() as sock:
        # As the servers bind it (SO_REUSEADDR): the TIME_WAIT a demo stopped a moment ago left on 9090, 9105
        # and 8000 made them look taken, and a demo run again moved every URL; a live listener still refuses.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graph_url(prometheus_url: str, *exprs: str) -> str:
    """A Prometheus graph-page URL showing the given expressions over the last 5 minutes."""
    params = {}
    for i, expr in enumerate(exprs):
        params.update({f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": "5m"})
    return f"{prometheus_url}/graph?{urllib.parse.urlencode(params)}"


def _value(prometheus, expr: str) -> float | None:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else None


def print_summary(prometheus, job_id: str) -> None:
    """What Prometheus itself holds about the job, read back with PromQL: its state and totals."""
    selector = f'{{job_id="{job_id}"}}'
    window = "[10m]"
    state = prometheus.query(f'last_over_time(trainer_job_state{selector}{window}) == 1')
    print("\nRead back from Prometheus:")
    print(f"  state            {state[0]['metric']['state'] if state else 'unknown'}")
    for label, expr in [("steps", f"max(last_over_time(trainer_steps_total{selector}{window}))"),
                        ("samples", f"max(last_over_time(trainer_samples_total{selector}{window}))"),
                        ("evaluations", f"max(last_over_time(trainer_evaluations_total{selector}{window}))")]:
        value = _value(prometheus, expr)
        print(f"  {label:16} {'n/a' if value is None else f'{value:,.0f}'}")


def _number(value) -> str:
    """A number as a person reads it: thousands separated, four significant digits for fractions."""
    if value is None:
        return "n/a"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return f"{value:,.0f}"
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _clock(unix_seconds: float | None) -> str:
    return "n/a" if unix_seconds is None else time.strftime("%H:%M:%S", time.localtime(unix_seconds)) + \
        f".{int(unix_seconds % 1 * 1000):03d}"


def print_analytics(client, job_id: str) -> None:
    """The analytics' view of the job (GET /api/training/{job_id}/analytics): every evaluation, in order."""
    response = client.get(f"/api/training/{job_id}/analytics")
    print(f"\nAnalytics: GET {client.base_url}/api/training/{job_id}/analytics")
    if response.status_code != 200:
        print(f"  unavailable: {response.status_code} {response.text[:200]}")
        return
    body = response.json()
    duration, performance, losses = body["duration"], body["performance"], body["losses"]
    print(f"  ran              {_clock(body['start_time'])} to {_clock(body['end_time'])}: "
          f"{_number(duration['training_seconds'])} s training, {_number(duration['paused_seconds'])} s paused "
          f"(upload {_number(duration['upload_seconds'])} s)")
    print(f"  throughput       {_number(performance['average_samples_per_second'])} samples/s over "
          f"{_number(performance['total_samples'])} samples, {_number(performance['total_steps'])} steps "
          f"(mean step {_number(performance['average_step_seconds'])} s, longest "
          f"{_number(performance['peak_step_seconds'])} s)")
    print(f"  loss             {_number(losses['initial'])} → {_number(losses['final'])} (best "
          f"{_number(losses['best'])}, mean {_number(losses['mean'])}, −{_number(losses['reduction_percent'])} %)")
    evaluations = body.get("evaluations") or []
    print(f"  evaluations      {len(evaluations)}, every one, in order:")
    for evaluation in evaluations:
        accuracy = evaluation.get("accuracy")
        loss = evaluation.get("loss")
        print(f"    step {evaluation['step']:>6}  {_clock(evaluation['time'])}"
              + (f"  loss {loss:.4f}" if loss is not None else "")
              + (f"  accuracy {accuracy:.4f}" if accuracy is not None else ""))
    efficiency = body["efficiency"]
    print(f"  efficiency       overall {_number(efficiency['overall_score'])} (throughput score "
          f"{_number(efficiency['throughput_score'])}, GPU score {_number(efficiency['gpu_utilization_score'])})")
    goodput = body.get("goodput") or {}
    if goodput.get("goodput_ratio") is not None:
        phases = ", ".join(f"{name} {_number(seconds)} s" for name, seconds in goodput["seconds"].items() if seconds)
        print(f"  goodput          {_number(100 * goodput['goodput_ratio'])} % of {_number(goodput['wall_clock_seconds'])} s "
              f"from submission to end: {phases}")
    energy = body.get("energy") or {}
    print("  energy           " + (f"{_number(energy['total_joules'])} J, {_number(energy['samples_per_joule'])} samples/J"
                                    if energy.get("total_joules") is not None else energy.get("unavailable_reason") or "unknown"))


def write_digits_csv(path: Path) -> Path:
    """scikit-learn's 8x8 digits as a CSV with a header and a label column: the demo's upload."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    header = ",".join(f"p{i}" for i in range(digits.data.shape[1])) + ",label"
    rows = [",".join(str(int(v)) for v in row) + f",{label}" for row, label in zip(digits.data, digits.target)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def follow_job(client, job_id: str, log_path: Path) -> dict:
    """Print the job's evaluations as they happen; return the job once it reaches a final state."""
    printed = 0
    while True:
        job = client.get(f"/api/training/jobs/{job_id}").json()
        if log_path.exists():
            lines = log_path.read_text(errors="replace").splitlines()
            for line in lines[printed:]:
                if "eval after" in line or " ERROR " in line or "trainmetrics train: error" in line:
                    print("  " + line.split(": ", 1)[-1], flush=True)
            printed = len(lines)
        if job["state"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.5)


def _last_line(path: Path) -> str:
    """The last line a log holds (its error), "" when none can be read."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def why_prometheus_did_not_start(prometheus, error: Exception) -> str:
    """What stopped Prometheus at its start, in one line: how it exited and the line of its log that says why. The
    first line of the log's tail, which said so once, was a scrap of the usage text Prometheus prints after a flag
    it refuses ("exited with 2:    metrics during expression evaluations and"), or nothing at all."""
    process = prometheus.process
    name = Path(process.args[0]).name if process is not None else ""
    if not str(error).startswith(f"{name} exited with "):      # not started (OSError), or not ready in time
        return str(error).splitlines()[0]
    try:
        lines = [line.strip() for line in prometheus.log_path.read_text(errors="replace").splitlines()]
    except OSError:
        lines = []
    lines = [line for line in lines if line]
    # Its own `level=error` record, or the "Error parsing commandline arguments" above its usage; else its last.
    said = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
    return f"{name} exited with {process.returncode}" + (f": {said[:300]}" if said else "")


# Every process the demo starts runs in a process group of its own, so that a Ctrl-C on the terminal, which the
# kernel sends to the whole foreground group, reaches the demo alone and the demo stops them in order: the job
# server first (it pauses a running job, which lingers until Prometheus has scraped its final state), Prometheus
# last. Prometheus, interrupted along with the demo, was gone first: the paused job waited its whole 15 s linger
# for a scrape that never came, and the demo took some 16 s to stop, its job's last state never recorded.
OWN_PROCESS_GROUP = 0


def start_child(command: list[str], children: list[subprocess.Popen], log_path: Path) -> None:
    """Start a stack process with its output in a log file, in a process group of its own."""
    with open(log_path, "ab") as log:
        children.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         process_group=OWN_PROCESS_GROUP))


def wait_http(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until a URL `process` serves answers 200; RuntimeError once the process exited (a job server that could
    not start was waited for 60 s, then a traceback) or the timeout passed."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1) as poller:     # one for every poll: httpx.get() builds a TLS context each time
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"it exited with code {process.returncode}")
            try:
                if poller.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


WORKDIR_LOCK = ".demo.lock"


def claim_workdir(workdir: Path):
    """The work dir's lock file, locked for as long as it stays open (the demo's life); FlagError naming --workdir
    when another demo holds it. A second demo in the same work dir overwrote the first one's Prometheus config and
    log and ran a second Prometheus on its data (Prometheus takes no lock there), before its job server refused.
    On a file system without locks the demo runs unguarded, as before."""
    return lock_directory("--workdir", workdir, WORKDIR_LOCK, "trainmetrics demo", locks_required=False)


def what_failed(error: Exception) -> str:
    """One line saying what stopped the demo: the job server's answer to a request of ours, the request it did not
    answer, or the file that could not be written (each ended the demo in a traceback: a full disk's 507 to the
    upload, a job server gone while the job trained, the CSV not written)."""
    import httpx

    if isinstance(error, httpx.HTTPStatusError):
        response = error.response
        try:
            said = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            said = response.text.strip()[:200]
        return (f"the job server answered {response.request.method} {response.request.url.path} with "
                f"{response.status_code}: {said}")
    if isinstance(error, httpx.RequestError):
        return f"the job server did not answer {error.request.method} {error.request.url.path}: {error}"
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    return str(error)


STOP_SIGNALS = signals_to_take(SERVICE_STOP_SIGNALS)


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP (a `kill`, a supervisor, a closed terminal) stop the demo as Ctrl-C does: everything
    it started is stopped (they killed the demo alone, leaving Prometheus, the exporter and the server running).
    SIGINT too when the demo started with it ignored (a shell script's background command), as the services do:
    Python then leaves it ignored, and `kill -INT` did nothing."""
    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, stop)


def _ignore_stop_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def run(args: argparse.Namespace) -> int:
    """Start Prometheus, the exporter and the job server; upload a CSV, submit the demo job, print URLs,
    its evaluations and its summary read back from Prometheus."""
    import httpx

    from trainmetrics.prometheus_process import PrometheusNotFound, PrometheusServer, find_binary
    from trainmetrics.trainer.cli import missing_training_packages

    check_flags(args)
    missing = missing_training_packages()
    if missing:
        # Before anything starts: the demo writes its CSV with scikit-learn and its job trains with torch, and the
        # core package alone started the whole stack, then ended in a ModuleNotFoundError traceback.
        print(f"trainmetrics demo: error: the demo trains a model and needs {', '.join(missing)}: "
              "pip install 'trainmetrics[train]'", file=sys.stderr)
        return 2
    try:
        find_binary("prometheus")       # before the work dir is made: a refusal leaves nothing behind
    except PrometheusNotFound as error:
        print(f"trainmetrics demo: error: {error}", file=sys.stderr)
        return 2
    _stop_on_signals()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trainmetrics-demo-"))
    # A temp dir of ours is removed once the demo ended well (every run left one behind, its Prometheus data
    # growing while it ran), kept for its logs when it failed.
    ended_well = False
    workdir.mkdir(parents=True, exist_ok=True)
    claim = claim_workdir(workdir)      # before Prometheus writes its config, log and data there
    exporter_address = f"127.0.0.1:{_port_or_free(args.exporter_port)}"
    server_address = f"127.0.0.1:{_port_or_free(args.server_port)}"
    prometheus = PrometheusServer(workdir / "prometheus", port=_port_or_free(args.prometheus_port),
                                  static_targets={"exporter": [exporter_address], "server": [server_address]},
                                  job_server=f"http://{server_address}", process_group=OWN_PROCESS_GROUP)
    job_dir = workdir / "jobs"
    children: list[subprocess.Popen] = []
    try:
        try:
            prometheus.start()
        except PrometheusNotFound as error:
            print(f"trainmetrics demo: error: {error}", file=sys.stderr)
            return 2
        except (OSError, RuntimeError) as error:        # it exited at its start (a release that refuses the config)
            print(f"trainmetrics demo: error: Prometheus did not start: "
                  f"{why_prometheus_did_not_start(prometheus, error)} (its log: {prometheus.log_path})",
                  file=sys.stderr)
            return 1
        print(f"Prometheus       {prometheus.url}   (data in {prometheus.data_dir})")
        trainmetrics = [sys.executable, "-m", "trainmetrics"]
        start_child([*trainmetrics, "exporter", "--listen", exporter_address, "--job-dir", str(job_dir)],
                    children, workdir / "exporter.log")
        print(f"node exporter    http://{exporter_address}/metrics")
        start_child([*trainmetrics, "server", "--listen", server_address, "--data-dir", str(workdir / "server"),
                     "--prometheus-url", prometheus.url,
                     "--job-dir", str(job_dir)], children, workdir / "server.log")
        base = f"http://{server_address}"
        try:
            wait_http(f"{base}/healthz", children[-1])
        except RuntimeError as error:
            said = _last_line(workdir / "server.log")
            print(f"trainmetrics demo: error: the job server did not start: {error}{': ' + said if said else ''} "
                  f"(its log: {workdir / 'server.log'})", file=sys.stderr)
            return 1
        print(f"job server       {base}   (log {workdir / 'server.log'})")
        with httpx.Client(base_url=base, timeout=60) as client:
            csv_path = write_digits_csv(workdir / "digits.csv")
            print(f"\n1. upload        {csv_path.name} ({csv_path.stat().st_size // 1024} KiB) "
                  f"→ POST {base}/api/training/datasets")
            dataset = client.post("/api/training/datasets", params={"name": csv_path.name},
                                  content=csv_path.read_bytes()).raise_for_status().json()
            print(f"                 dataset {dataset['dataset_id']}: {dataset['rows']} rows, "
                  f"{dataset['features']} features, uploaded in {dataset['upload_seconds']:.3f} s")
            dataset_name = dataset_for(args.model, dataset["dataset_id"])
            spec = {"model": args.model, "dataset": dataset_name, "epochs": args.epochs,
                    "batch_size": args.batch_size, "log_every": 25, "name": job_name(args.model)}
            job = client.post("/api/training/jobs", json=spec).raise_for_status().json()
            job_id = job["job_id"]
            selector = f'{{job_id="{job_id}"}}'
            print(f"2. submit        {submit_line(args.model, args.epochs, dataset_name, dataset['dataset_id'])} "
                  f"→ job {job_id} ({job['state']})")
            print(f"   loss          {graph_url(prometheus.url, f'trainer_loss{selector}', f'trainer_eval_loss{selector}')}")
            print(f"   throughput    {graph_url(prometheus.url, f'sum(rate(trainer_samples_total{selector}[2s]))')}")
            print(f"   accuracy      {graph_url(prometheus.url, f'trainer_eval_accuracy_ratio{selector}')}")
            print("3. train         (evaluations as they happen)", flush=True)
            job = follow_job(client, job_id, workdir / "server" / "jobs" / job_id / "train.log")
            print(f"4. {job['state']:<13} exit code {job['exit_code']}"
                  f"{'; model at ' + base + '/api/training/jobs/' + job_id + '/download/model' if job['state'] == 'completed' else ''}")
            print_summary(prometheus, job_id)
            print_analytics(client, job_id)
        if args.exit_after_job:
            ended_well = job["state"] == "completed"
            return 0 if ended_well else 1
        print(f"\nEverything keeps running for you to explore; Ctrl-C stops it"
              f"{' and removes ' + str(workdir) if args.workdir is None else ''}.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ended_well = True
        try:
            print("\nstopping ...")
        except OSError:     # its reader quit before (`| less`, then q), or its terminal closed (SIGHUP; EIO)
            sys.stdout = open(os.devnull, "w")
        return 0
    except BrokenPipeError:         # its reader quit (`| head`): stopped as by Ctrl-C, without a traceback
        sys.stdout = open(os.devnull, "w")
        ended_well = True
        return 0
    except (httpx.HTTPError, OSError) as error:
        print(f"trainmetrics demo: error: {what_failed(error)} (its logs: {workdir})", file=sys.stderr)
        return 1
    finally:
        _ignore_stop_signals()          # a second Ctrl-C or SIGTERM must not cut the clean-up short
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()        # gone before its work dir is
        prometheus.stop()
        if args.workdir is None:
            if ended_well:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                print(f"trainmetrics demo: its logs and data are kept in {workdir}", file=sys.stderr)
        claim.close()
