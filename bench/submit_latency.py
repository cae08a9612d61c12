"""What a user feels when they press submit: submit → running and submit → first sample in Prometheus, for the
local executor and the Ray executor side by side in one run (a real job server per executor, a real
two-node Ray cluster on loopback, a real Prometheus finding the jobs through the job server's http_sd).

    .venv/bin/python bench/submit_latency.py [--jobs 5]

Prints the median of each latency per executor and the ratio Ray ÷ local.
"""

import argparse
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


def measure(server: Server, prometheus: PrometheusServer, job_id: str) -> tuple[float, float]:
    """(seconds to `running` as the job server reports it, seconds to the job's first sample in Prometheus)."""
    client = httpx.Client(base_url=server.url, timeout=60)
    began = time.monotonic()
    answer = client.post("/api/training/jobs", json={"job_id": job_id, "dataset": "blobs", "epochs": 3}).json()
    running = None
    if answer["state"] == "running":
        running = time.monotonic() - began
    while running is None:
        if client.get(f"/api/training/jobs/{job_id}").json()["state"] == "running":
            running = time.monotonic() - began
        time.sleep(0.02)
    while not prometheus.query(f'trainer_steps_total{{job_id="{job_id}"}}'):
        time.sleep(0.05)
    sampled = time.monotonic() - began
    while client.get(f"/api/training/jobs/{job_id}").json()["state"] == "running":
        time.sleep(0.2)
    client.close()
    return running, sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5, help="jobs per executor, one after the other")
    args = parser.parse_args()
    stop_on_signals()
    work = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    cluster = RayCluster()
    results = {}
    try:
        cluster.start()      # inside: a signal while it starts still stops what started
        for executor, extra in (("local", ()), ("ray", ("--executor", "ray", "--ray-address", cluster.dashboard))):
            port = free_port()
            prometheus = PrometheusServer(work / f"prometheus-{executor}", job_server=f"http://127.0.0.1:{port}")
            (work / executor).mkdir()
            server = Server(work / executor, extra=extra)
            server.port, server.url = port, f"http://127.0.0.1:{port}"
            try:
                prometheus.start()
                server.start()
                measure(server, prometheus, f"warm-{executor}")          # imports, caches, Ray's workers
                results[executor] = [measure(server, prometheus, f"{executor}-{i}") for i in range(args.jobs)]
            finally:
                server.stop()
                prometheus.stop()
    finally:
        cluster.stop()
    print(f"{args.jobs} jobs per executor (blobs, mlp, 3 epochs), one after the other, medians:")
    for executor, runs in results.items():
        print(f"  {executor:6} submit → running {statistics.median(r for r, _ in runs):6.2f} s   "
              f"submit → first sample in Prometheus {statistics.median(s for _, s in runs):6.2f} s")
    for index, name in ((0, "submit → running"), (1, "submit → first sample")):
        ratio = statistics.median(r[index] for r in results["ray"]) / statistics.median(r[index] for r in results["local"])
        print(f"  ray ÷ local, {name}: {ratio:.2f}")


if __name__ == "__main__":
    main()
