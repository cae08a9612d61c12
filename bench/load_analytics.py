"""Load on the analytics service: N concurrent clients for S seconds against `trainmetrics analytics` (its
own process) over a real Prometheus holding real finished jobs.

    .venv/bin/python bench/load_analytics.py --seconds 60 --clients 50

Each client loops over a mix: a finished job's analytics (cached after the first call), a comparison of the
jobs, the job list, a 10-minute summary (never cached) and an unknown job (404). Reports the error count
(any status other than the expected one, or a transport error), p50/p99 per kind, and the service's RSS
(/proc/PID/status VmRSS) before and after.
"""

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cleanup import stop_on_signals  # noqa: E402
from trainmetrics.prometheus_process import PrometheusServer, free_port  # noqa: E402

JOBS = ("load-1", "load-2")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_jobs(prometheus: PrometheusServer, work: Path) -> None:
    processes = []
    try:
        for job_id in JOBS:
            processes.append(subprocess.Popen([sys.executable, "-m", "trainmetrics", "train", "--job-id", job_id,
                                               "--model", "mlp", "--dataset", "blobs", "--epochs", "2",
                                               "--targets-dir", str(prometheus.targets_dir)],
                                              cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for process in processes:
            process.wait(timeout=300)
    finally:
        # A SIGTERM (or a job past its 300 s) left the jobs training on, orphaned, after the benchmark ended.
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for job_id in JOBS:
        prometheus.wait_for(f'last_over_time(trainer_job_state{{job_id="{job_id}",state="completed"}}[5m]) == 1',
                            timeout=60)


MIX = [("job analytics", f"/api/training/{JOBS[0]}/analytics", 200),
       ("compare", f"/api/training/analytics/compare?job_ids={','.join(JOBS)}", 200),
       ("job list", "/api/training/analytics/jobs?range=1h", 200),
       ("summary 10m", "/api/training/analytics/summary?range=10m", 200),
       ("unknown job", "/api/training/no-such-job/analytics", 404)]


async def client_loop(client: httpx.AsyncClient, index: int, until: float, latencies: dict, errors: list):
    i = index
    while time.monotonic() < until:
        kind, path, expected = MIX[i % len(MIX)]
        i += 1
        began = time.perf_counter()
        try:
            response = await client.get(path)
            status = response.status_code
        except httpx.HTTPError as error:
            status = type(error).__name__
        latencies.setdefault(kind, []).append(time.perf_counter() - began)
        if status != expected:
            errors.append((kind, status))


async def load(url: str, clients: int, seconds: float):
    latencies: dict[str, list[float]] = {}
    errors: list = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        until = time.monotonic() + seconds
        await asyncio.gather(*(client_loop(client, i, until, latencies, errors) for i in range(clients)))
    return latencies, errors


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000 if len(values) > 1 else values[0] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    if not args.seconds > 0 or args.clients < 1:
        parser.error(f"--seconds must be positive and --clients at least 1, got {args.seconds:g} and {args.clients}")
    stop_on_signals()
    work = Path(tempfile.mkdtemp(prefix="trainmetrics-load-"))
    prometheus = PrometheusServer(work / "prometheus")
    port = free_port()
    service = None
    try:
        prometheus.start()   # inside: a signal while it starts still stops it
        began = time.monotonic()
        start_jobs(prometheus, work)
        print(f"{len(JOBS)} real jobs in Prometheus after {time.monotonic() - began:.0f} s")
        service = subprocess.Popen([sys.executable, "-m", "trainmetrics", "analytics", "--listen", f"127.0.0.1:{port}",
                                    "--prometheus-url", prometheus.url], stdout=subprocess.DEVNULL,
                                   stderr=open(work / "analytics.log", "wb"))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        for _, path, _ in MIX:                     # warm: imports, first cache fill
            httpx.get(url + path, timeout=30)
        rss_before = rss_mib(service.pid)
        load_began = time.monotonic()
        latencies, errors = asyncio.run(load(url, args.clients, args.seconds))
        elapsed = time.monotonic() - load_began
        rss_after = rss_mib(service.pid)
        total = sum(len(v) for v in latencies.values())
        print(f"{args.clients} clients for {elapsed:.1f} s: {total} requests ({total / elapsed:.0f}/s), "
              f"{len(errors)} errors; service RSS {rss_before:.1f} -> {rss_after:.1f} MiB "
              f"({rss_after - rss_before:+.1f})")
        print(f"{'kind':<16}{'requests':>9}{'p50 ms':>10}{'p99 ms':>10}")
        for kind, _, _ in MIX:
            values = latencies.get(kind, [])
            if values:
                print(f"{kind:<16}{len(values):>9}{pct(values, 50):>10.1f}{pct(values, 99):>10.1f}")
        if errors:
            kinds: dict = {}
            for kind, status in errors:
                kinds[(kind, status)] = kinds.get((kind, status), 0) + 1
            print("errors:", kinds)
        return 1 if errors else 0
    finally:
        if service is not None:
            service.terminate()
            service.wait(timeout=10)
        prometheus.stop()
        shutil.rmtree(work, ignore_errors=True)     # its Prometheus data, left behind by every run


if __name__ == "__main__":
    sys.exit(main())
