"""What a user feels when they press submit: submit → running and submit → first sample in Prometheus, for the
local executor and the Ray executor side by side in one run (a real job server per executor, a real
two-node Ray cluster on loopback, a real Prometheus finding the jobs through the job server's http_sd).

    .venv/bin/python bench/submit_latency.py [--jobs 5]

Both executors' job servers and Prometheus run throughout, and their jobs take turns (local, ray, ray, local, ...),
so drift on the machine hits both alike. Prints the median of each latency per executor and the ratio Ray ÷ local.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.jobserver.ray_cluster import RayCluster  # noqa: E402
from tests.jobserver.server_process import Server  # noqa: E402
from bench.cleanup import stop_on_signals  # noqa: E402
from trainmetrics.prometheus_process import PrometheusServer, free_port  # noqa: E402


FINAL = ("completed", "failed", "cancelled")
WAIT_SECONDS = 300      # a job that never runs, or never shows in Prometheus, is an error, not a hang


def measure(server: Server, prometheus: PrometheusServer, job_id: str) -> tuple[float, float]:
    """(seconds to `running` as the job server reports it, seconds to the job's first sample in Prometheus)."""
    client = httpx.Client(base_url=server.url, timeout=60)
    began = time.monotonic()
    deadline = began + WAIT_SECONDS
    answer = client.post("/api/training/jobs", json={"job_id": job_id, "dataset": "blobs", "epochs": 3}).json()
    running, state = None, answer["state"]
    if state == "running":
        running = time.monotonic() - began
    while running is None:
        state = client.get(f"/api/training/jobs/{job_id}").json()["state"]
        if state == "running":
            running = time.monotonic() - began
        elif state in FINAL or time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} never ran ({state})")
        time.sleep(0.02)
    while not prometheus.query(f'trainer_steps_total{{job_id="{job_id}"}}'):
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} never showed in Prometheus")
        time.sleep(0.05)
    sampled = time.monotonic() - began
    while client.get(f"/api/training/jobs/{job_id}").json()["state"] not in FINAL:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not end")
        time.sleep(0.2)
    client.close()
    return running, sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5, help="jobs per executor, one after the other")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    stop_on_signals()
    work = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    cluster = RayCluster()
    stacks: dict[str, tuple[Server, PrometheusServer]] = {}
    results: dict[str, list[tuple[float, float]]] = {"local": [], "ray": []}
    try:
        cluster.start()      # inside: a signal while it starts still stops what started
        # Both executors up from the start and their jobs taking turns, each first every other time: measured one
        # executor after the other, a change in the machine's load between the two blocks went into the ratio.
        for executor, extra in (("local", ()), ("ray", ("--executor", "ray", "--ray-address", cluster.dashboard))):
            port = free_port()
            prometheus = PrometheusServer(work / f"prometheus-{executor}", job_server=f"http://127.0.0.1:{port}")
            (work / executor).mkdir()
            server = Server(work / executor, extra=extra)
            server.port, server.url = port, f"http://127.0.0.1:{port}"
            stacks[executor] = (server, prometheus)
            prometheus.start()
            server.start()
        for executor, (server, prometheus) in stacks.items():
            measure(server, prometheus, f"warm-{executor}")          # imports, caches, Ray's workers
        for i in range(args.jobs):
            for executor in (("local", "ray") if i % 2 == 0 else ("ray", "local")):
                results[executor].append(measure(*stacks[executor], f"{executor}-{i}"))
    finally:
        for server, prometheus in stacks.values():
            for stop in (server.stop, prometheus.stop):
                try:
                    stop()
                except Exception as error:      # the rest are stopped all the same
                    print(f"submit_latency.py: stopping: {error!r}", file=sys.stderr)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)     # two Prometheus' data and the jobs', left behind by every run
    print(f"{args.jobs} jobs per executor (blobs, mlp, 3 epochs), one at a time, the executors taking turns, medians:")
    for executor, runs in results.items():
        print(f"  {executor:6} submit → running {statistics.median(r for r, _ in runs):6.2f} s   "
              f"submit → first sample in Prometheus {statistics.median(s for _, s in runs):6.2f} s")
    for index, name in ((0, "submit → running"), (1, "submit → first sample")):
        ratio = statistics.median(r[index] for r in results["ray"]) / statistics.median(r[index] for r in results["local"])
        print(f"  ray ÷ local, {name}: {ratio:.2f}")


if __name__ == "__main__":
    main()
