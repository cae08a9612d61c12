"""`trainmetrics demo`: a real Prometheus, the node exporter and a demo training job, wired together.

Prints the Prometheus URLs for the job's loss and throughput while it runs, then a summary read back
from Prometheus. Ctrl-C stops every child cleanly.
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from trainmetrics.names import DEFAULT_EXPORTER_PORT, DEFAULT_PROMETHEUS_PORT


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the demo flags."""
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where Prometheus data, targets and checkpoints go (default: a temp dir)")
    parser.add_argument("--prometheus-port", type=int, default=DEFAULT_PROMETHEUS_PORT,
                        help="Prometheus port (a free one is picked if it is taken)")
    parser.add_argument("--exporter-port", type=int, default=DEFAULT_EXPORTER_PORT,
                        help="node exporter port (a free one is picked if it is taken)")
    parser.add_argument("--model", default="cnn", help="demo job's model")
    parser.add_argument("--dataset", default="digits", help="demo job's dataset")
    parser.add_argument("--epochs", type=int, default=15, help="demo job's epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="demo job's batch size")
    parser.add_argument("--exit-after-job", action="store_true",
                        help="stop everything once the job has finished and its summary is printed")


def _port_or_free(port: int) -> int:
    """`port` when it is free, else (or for 0) a free one."""
    with socket.socket() as sock:
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
    """What Prometheus holds about the job: state, totals and the accuracy after each evaluation."""
    selector = f'{{job_id="{job_id}"}}'
    window = "[10m]"
    state = prometheus.query(f'last_over_time(trainer_job_state{selector}{window}) == 1')
    print("\nSummary read back from Prometheus:")
    print(f"  state:           {state[0]['metric']['state'] if state else 'unknown'}")
    for label, expr in [("steps", f"max(last_over_time(trainer_steps_total{selector}{window}))"),
                        ("samples", f"max(last_over_time(trainer_samples_total{selector}{window}))"),
                        ("final loss", f"last_over_time(trainer_loss{selector}{window})"),
                        ("eval accuracy", f"last_over_time(trainer_eval_accuracy_ratio{selector}{window})"),
                        ("samples/s (avg)", f"max(last_over_time(trainer_samples_total{selector}{window})) / "
                                            f"(max(last_over_time(trainer_job_end_timestamp_seconds{selector}{window}))"
                                            f" - max(last_over_time(trainer_job_start_timestamp_seconds{selector}{window})))")]:
        value = _value(prometheus, expr)
        shown = "n/a" if value is None else f"{value:.0f}" if value.is_integer() else f"{value:.4g}"
        print(f"  {label + ':':16} {shown}")
    end = time.time()
    series = prometheus.query_range(f"trainer_eval_accuracy_ratio{selector}", end - 600, end, 0.25)
    accuracies = []
    for _, value in (series[0]["values"] if series else []):
        if not accuracies or float(value) != accuracies[-1]:
            accuracies.append(float(value))
    print("  accuracy by evaluation: " + " → ".join(f"{a:.3f}" for a in accuracies))


def run(args: argparse.Namespace) -> int:
    """Start Prometheus, the exporter and the demo job; print URLs and the job's summary."""
    from trainmetrics.prometheus_process import PrometheusNotFound, PrometheusServer

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trainmetrics-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    exporter_port = _port_or_free(args.exporter_port)
    exporter_address = f"127.0.0.1:{exporter_port}"
    prometheus = PrometheusServer(workdir / "prometheus", port=_port_or_free(args.prometheus_port),
                                  static_targets={"exporter": [exporter_address]})
    job_dir = workdir / "jobs"
    children: list[subprocess.Popen] = []
    job_id = f"demo-{time.strftime('%H%M%S')}"
    try:
        try:
            prometheus.start()
        except PrometheusNotFound as error:
            print(f"trainmetrics demo: error: {error}", file=sys.stderr)
            return 2
        print(f"Prometheus       {prometheus.url}   (data in {prometheus.data_dir})")
        children.append(subprocess.Popen([sys.executable, "-m", "trainmetrics", "exporter",
                                          "--listen", exporter_address, "--job-dir", str(job_dir)]))
        print(f"node exporter    http://{exporter_address}/metrics")
        job_command = [sys.executable, "-m", "trainmetrics", "train", "--job-id", job_id,
                       "--model", args.model, "--dataset", args.dataset, "--epochs", str(args.epochs),
                       "--batch-size", str(args.batch_size), "--log-every", "25",
                       "--checkpoint-dir", str(workdir / "checkpoints" / job_id),
                       "--targets-dir", str(prometheus.targets_dir), "--job-dir", str(job_dir)]
        selector = f'{{job_id="{job_id}"}}'
        print(f"demo job         {job_id}: {args.model} on {args.dataset}, {args.epochs} epochs")
        print(f"  loss           {graph_url(prometheus.url, f'trainer_loss{selector}', f'trainer_eval_loss{selector}')}")
        print(f"  throughput     {graph_url(prometheus.url, f'sum(rate(trainer_samples_total{selector}[2s]))')}")
        print(f"  accuracy       {graph_url(prometheus.url, f'trainer_eval_accuracy_ratio{selector}')}")
        sys.stdout.flush()
        job_log = workdir / f"{job_id}.log"
        print(f"  log            {job_log}")
        job = subprocess.Popen(job_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        children.append(job)
        with open(job_log, "w") as log_file:
            for line in job.stdout:            # the whole log to the file, evaluations to the screen
                log_file.write(line)
                if "eval after" in line or " ERROR " in line or line.startswith("trainmetrics train: error"):
                    print("  " + line.split(": ", 1)[-1].rstrip(), flush=True)
        code = job.wait()
        print(f"\ndemo job exited with code {code}")
        print_summary(prometheus, job_id)
        if args.exit_after_job:
            return 0 if code == 0 else 1
        print("\nEverything keeps running for you to explore; Ctrl-C stops it.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...")
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
        prometheus.stop()
