"""Analytics latency over 1,000 jobs of history in a real Prometheus: job analytics of a 1-hour job, the
fleet summary and a 5-job comparison, p50/p95 over repeated calls, cold (cache off) and warm.

History is backfilled with `promtool tsdb create-blocks-from openmetrics`: 1,000 jobs over the last
20 hours with every trainer series a real job publishes, plus per-job process series and host series.
Five jobs run 1 hour at 250 ms resolution (the scrape interval); the other 995 run 2-20 minutes at 10 s.
The analytics recording rules (deploy/prometheus/rules/analytics.rules.yml) are backfilled over the same
history with `promtool tsdb create-blocks-from rules` against a first Prometheus holding the raw blocks; the
measured Prometheus then holds both and evaluates the rules live from its start, as a deployment whose rules
have run all along would. Before timing, the benchmark checks that the summary's job table from the recorded
series equals the one from raw series only.

The service runs as its own process (`analytics.cli`), measured over HTTP from this one.

    .venv/bin/python bench/analytics_latency.py [--calls 40] [--keep DIR]
"""

import argparse
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainmetrics.analytics import queries as q  # noqa: E402
from bench.cleanup import stop_on_signals  # noqa: E402
from trainmetrics.prometheus_process import PrometheusServer, find_binary, free_port  # noqa: E402

GOALS_MS = {"job analytics (1-hour job)": 50, "summary (1,000 jobs)": 200, "compare (5 jobs)": 100}
ORIGINAL = {"job analytics (1-hour job)": "< 100 ms", "summary (1,000 jobs)": "< 500 ms at 100 jobs",
            "compare (5 jobs)": "< 200 ms"}
JOBS, LONG_JOBS = 1000, 5
RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "rules" / "analytics.rules.yml"
STATES = ("queued", "running", "paused", "completed", "failed", "cancelled")


def write_history(path: Path, now: float, seed: int = 7) -> tuple[list[str], int]:
    """OpenMetrics text of the fleet's history; returns the 1-hour jobs' ids and the sample count."""
    rng = random.Random(seed)
    history_start = now - 20 * 3600
    lines: list[str] = []
    long_ids = []
    for index in range(JOBS):
        job_id = f"bench-{index:04d}"
        long = index < LONG_JOBS
        duration = 3600.0 if long else rng.uniform(120, 1200)
        interval = 0.25 if long else 10.0
        start = (now - 2 * 3600 - index * 300.0) if long else rng.uniform(history_start, now - 1500)
        end = start + duration
        if long:
            long_ids.append(job_id)
        final = rng.choices(("completed", "failed", "cancelled"), weights=(85, 10, 5))[0]
        throughput = rng.uniform(200, 5000)
        base = (f'job_id="{job_id}",instance="127.0.0.1:{20000 + index}",job="trainer"')
        times = [start + i * interval for i in range(int(duration / interval) + 1)]
        linger = [end + 0.25]
        info = (f'trainer_job_info{{{base},job_name="{job_id}",model="{rng.choice(["mlp", "cnn"])}",'
                f'dataset="blobs",owner="{rng.choice(["alice", "bob", "carol"])}",device="cpu",world_size="1"}}')
        every = times + linger

        def series(name: str, values, at=every):
            lines.extend(f"{name} {value} {t:.3f}" for t, value in zip(at, values))

        series(info, [1] * len(every))
        for state in STATES:
            series(f'trainer_job_state{{{base},state="{state}"}}',
                   [1 if state == "running" else 0 for _ in times] + [1 if state == final else 0])
        series(f"trainer_job_start_timestamp_seconds{{{base}}}", [f"{start:.3f}"] * len(every))
        series(f"trainer_job_end_timestamp_seconds{{{base}}}", [f"{end:.3f}"], linger)
        series(f"trainer_upload_duration_seconds{{{base}}}", [f"{rng.uniform(0.1, 30):.3f}"] * len(every))
        progress = [min(duration, t - start) for t in every]
        # Throughput wobbles ±20 % around its mean: samples = ∫ throughput × (1 + 0.2 sin(t / 37)) dt.
        samples = [int(throughput * (p + 7.4 * (1 - math.cos(p / 37.0)))) for p in progress]
        series(f"trainer_samples_total{{{base}}}", samples)
        series(f"trainer_steps_total{{{base}}}", [s // 64 for s in samples])
        series(f"trainer_loss{{{base}}}", [f"{2.3 * math.exp(-p / (duration / 3)) + 0.05:.6f}" for p in progress])
        series(f"trainer_eval_accuracy_ratio{{{base}}}", [f"{min(0.99, 0.1 + p / duration):.4f}" for p in progress])
        series(f"trainer_checkpoints_total{{{base}}}", [int(p // 300) for p in progress])
        # Every checkpoint written by the process itself (a resumed one counts more than it wrote).
        series(f"trainer_checkpoint_duration_seconds_count{{{base}}}", [int(p // 300) for p in progress])
        series(f"trainer_heartbeat_timestamp_seconds{{{base}}}", [f"{t:.3f}" for t in every])
        series(f"trainer_step_duration_seconds_sum{{{base}}}", [f"{s / throughput:.3f}" for s in samples])
        series(f"trainer_step_duration_seconds_count{{{base}}}", [s // 64 for s in samples])
        exporter = f'job_id="{job_id}",instance="127.0.0.1:9105",job="exporter"'
        series(f"process_cpu_time_seconds_total{{{exporter}}}", [f"{p * 1.7:.3f}" for p in progress])
        series(f"process_memory_rss_bytes{{{exporter}}}",
               [int(8e8 + 2e8 * math.sin(p / 50)) for p in progress])
    host = 'instance="127.0.0.1:9105",job="exporter"'
    host_times = [history_start + i for i in range(int(now - history_start))]
    for name, value in ((f"system_cpu_utilization_ratio{{{host}}}", lambda t: 0.5 + 0.3 * math.sin(t / 600)),
                        (f"system_cpu_utilization_peak_ratio{{{host}}}", lambda t: 0.6 + 0.3 * math.sin(t / 600)),
                        (f'system_memory_usage_bytes{{{host},state="used"}}', lambda t: 3e10 + 1e9 * math.sin(t / 900)),
                        (f"system_memory_used_peak_bytes{{{host}}}", lambda t: 3.1e10 + 1e9 * math.sin(t / 900)),
                        (f"system_memory_limit_bytes{{{host}}}", lambda t: 6.4e10)):
        lines.extend(f"{name} {value(t):.6g} {t:.3f}" for t in host_times)
    lines.append("# EOF")
    path.write_text("\n".join(lines) + "\n")
    return long_ids, len(lines) - 1


def service_code(source: Path | None = None) -> str:
    """The service's process (`python -c`): this checkout's `analytics.cli`, or the one of the `--baseline` tree.

    A baseline's `trainmetrics.analytics` is its own `analytics/` dir, but this checkout's editable install maps that
    name to this checkout's: imported by name, a baseline from after the move into `trainmetrics.` ran this
    checkout's analytics (the baseline rows were the code under test, timed twice), and one from before it (the
    README's a2198d6, whose analytics is the top-level `analytics` package) did not start. So a baseline's parts
    are found in its tree first, and the service refuses to run code from anywhere else."""
    if source is None:
        return ("import argparse, sys; from trainmetrics.analytics import cli; p = argparse.ArgumentParser(); "
                "cli.configure(p); sys.exit(cli.run(p.parse_args(sys.argv[1:])))")
    source = source.resolve()
    top_level = any("from analytics" in path.read_text() for path in (source / "analytics").glob("*.py"))
    module = "analytics.cli" if top_level else "trainmetrics.analytics.cli"
    return f"""
import argparse, importlib, importlib.machinery, os, sys
source = {str(source)!r}
sys.path.insert(0, source)


class BaselineParts:
    # trainmetrics.<part> from the baseline's <part>/ when its trainmetrics/ has none (the editable install's own
    # finder would map it to this checkout's).
    @staticmethod
    def find_spec(name, path=None, target=None):
        parent, _, part = name.partition(".")
        if (parent == "trainmetrics" and part and "." not in part and os.path.isdir(os.path.join(source, part))
                and not os.path.isdir(os.path.join(source, "trainmetrics", part))):
            return importlib.machinery.PathFinder.find_spec(name, [source])
        return None


sys.meta_path.insert(0, BaselineParts)
cli = importlib.import_module({module!r})
if not os.path.realpath(cli.__file__).startswith(source + os.sep):
    sys.exit(f"--baseline: the service's code came from {{cli.__file__}}, not from {{source}}")
print(f"baseline analytics from {{cli.__file__}}", file=sys.stderr, flush=True)
p = argparse.ArgumentParser()
cli.configure(p)
sys.exit(cli.run(p.parse_args(sys.argv[1:])))
"""


def start_service(prometheus_url: str, cache_entries: int, log_path: Path,
                  extra: tuple[str, ...] = (), source: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`analytics.cli` in its own process; returns it and its base URL once /healthz answers."""
    port = free_port()
    code = service_code(source)
    process = subprocess.Popen([sys.executable, "-c", code, "--listen", f"127.0.0.1:{port}", "--prometheus-url",
                                prometheus_url, "--cache-entries", str(cache_entries), *extra],
                               stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), cwd=source)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise RuntimeError(f"analytics did not start: {log_path.read_text()[-2000:]}")


def wait_for_compaction(data_dir: Path, limit: float = 300.0) -> int:
    """Wait until Prometheus has merged the backfilled 2-hour blocks (one per rule and 2 hours from
    promtool) as its first compactions do a minute after start: the block count fell and then held for
    30 s. A Prometheus that ran through the history would hold compacted blocks too."""
    def count() -> int:
        return sum(1 for block in data_dir.iterdir() if (block / "meta.json").exists())

    initial, deadline = count(), time.monotonic() + limit
    last, since = initial, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(5)
        now_count = count()
        if now_count != last:
            last, since = now_count, time.monotonic()
        elif last < initial and time.monotonic() - since >= 30:
            break
    return last


def measure(client: httpx.Client, paths: list[str], calls: int) -> list[float]:
    """Milliseconds per call, cycling through paths; every answer must be 200."""
    timings = []
    for i in range(calls):
        began = time.perf_counter()
        response = client.get(paths[i % len(paths)])
        timings.append((time.perf_counter() - began) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"{paths[i % len(paths)]}: {response.status_code} {response.text[:300]}")
    return timings


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=40, help="calls per figure and mode")
    parser.add_argument("--keep", type=Path, default=None, help="work dir to keep (default: a temp dir, removed)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="also time, cold, the service from this source tree (e.g. `git archive HEAD~1 "
                             "analytics trainmetrics | tar -x -C DIR`) on the same Prometheus")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    if args.baseline is not None and not (args.baseline / "analytics").is_dir():
        parser.error(f"--baseline {args.baseline}: no analytics/ in it (git archive COMMIT analytics trainmetrics | "
                     "tar -x -C DIR)")
    stop_on_signals()
    work = args.keep or Path(tempfile.mkdtemp(prefix="analytics-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    now = time.time()
    began = time.perf_counter()
    long_ids, sample_count = write_history(work / "history.om", now)
    generated = time.perf_counter() - began
    blocks = work / "blocks"
    subprocess.run([find_binary("promtool"), "tsdb", "create-blocks-from", "openmetrics",
                    str(work / "history.om"), str(blocks)], check=True, stdout=subprocess.DEVNULL)
    backfilled = time.perf_counter() - began - generated
    (work / "history.om").unlink()
    prometheus = PrometheusServer(work / "prometheus")
    prometheus.data_dir.mkdir(parents=True, exist_ok=True)
    for block in blocks.iterdir():
        shutil.move(str(block), prometheus.data_dir / block.name)
    # The rules over the history, evaluated by promtool against a Prometheus that holds only the raw blocks.
    raw_only = PrometheusServer(work / "prometheus", rule_files=[]).start(timeout=120)
    try:
        # From before the 24-hour summary range: the rules "ran all along", also before the first job.
        done = subprocess.run([find_binary("promtool"), "tsdb", "create-blocks-from", "rules", "--url", raw_only.url,
                               "--start", f"{now - 24 * 3600 - 900:.0f}", "--end", f"{time.time():.0f}",
                               "--output-dir", str(work / "rule-blocks"), str(RULES)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"promtool create-blocks-from rules failed:\n{done.stdout}{done.stderr}")
    finally:
        raw_only.stop()
    for block in (work / "rule-blocks").iterdir():
        shutil.move(str(block), prometheus.data_dir / block.name)
    rules_backfilled = time.perf_counter() - began - generated - backfilled
    prometheus.start(timeout=120)
    compacted = wait_for_compaction(prometheus.data_dir)
    services = []
    try:
        total = prometheus.query("count(last_over_time(trainer_job_start_timestamp_seconds[24h]))")
        print(f"history: {JOBS} jobs ({LONG_JOBS} of 1 h at 250 ms), {sample_count:,} samples; "
              f"generated in {generated:.0f} s, backfilled in {backfilled:.0f} s, recording rules backfilled in "
              f"{rules_backfilled:.0f} s; Prometheus sees {total[0]['value'][1]} jobs in {compacted} blocks after "
              f"its first compactions")
        gap = prometheus.query(q.recorded_gap(86400, time.time()))
        if gap:   # the live rules must have taken over within the rules' coverage window
            raise RuntimeError(f"recorded series do not cover the last 24 h: gap at {gap[0]['value'][1]}")
        same = {}
        for mode, extra in (("recorded", ()), ("raw", ("--no-recorded-series",))):
            process, url = start_service(prometheus.url, 0, work / f"analytics-{mode}.log", extra)
            services.append(process)
            jobs = httpx.get(f"{url}/api/training/analytics/jobs?range=24h", timeout=60).json()["jobs"]
            same[mode] = jobs
            process.terminate()
            process.wait(timeout=10)
        if same["recorded"] != same["raw"]:
            diff = [(a, b) for a, b in zip(same["recorded"], same["raw"]) if a != b][:3]
            raise RuntimeError(f"job tables differ between recorded and raw series: {diff}")
        print(f"job table of {len(same['raw'])} jobs: identical from recorded and from raw series")
        figures = {
            "job analytics (1-hour job)": [f"/api/training/{job_id}/analytics" for job_id in long_ids],
            "summary (1,000 jobs)": ["/api/training/analytics/summary?range=24h"],
            "compare (5 jobs)": ["/api/training/analytics/compare?job_ids=" + ",".join(long_ids)],
        }
        results: dict[str, dict[str, list[float]]] = {name: {} for name in figures}
        modes = [("cold", 0, (), None), ("warm", 1024, (), None), ("raw", 0, ("--no-recorded-series",), None)]
        if args.baseline:
            modes.append(("baseline", 0, (), args.baseline.resolve()))
        clients = {}
        for mode, cache_entries, extra, source in modes:
            process, url = start_service(prometheus.url, cache_entries, work / f"analytics-{mode}.log", extra, source)
            services.append(process)
            clients[mode] = httpx.Client(base_url=url, timeout=30)
        # Modes take turns call by call, so a burst of other load on the machine hits them alike.
        for name, paths in figures.items():
            measured = [mode for mode in clients if mode != "raw" or name.startswith("summary")]
            for mode in measured:
                measure(clients[mode], paths, len(paths))          # connections and, when on, the cache
                results[name][mode] = []
            for i in range(args.calls):
                # Each mode first in turn: the first to ask Prometheus about a job (its chunks then hot in memory
                # and CPU caches for the modes after it) was always `cold`, the baseline always after it.
                turn = i % len(measured)
                for mode in measured[turn:] + measured[:turn]:
                    results[name][mode] += measure(clients[mode], [paths[i % len(paths)]], 1)
        for client in clients.values():
            client.close()
        print(f"{'figure':28} {'mode':8} {'p50 ms':>8} {'p95 ms':>8}   goal (p95, cold)   original system")
        for name in figures:
            for mode in ("cold", "warm", "raw", "baseline"):
                if mode not in results[name]:
                    continue
                timings = results[name][mode]
                p95 = percentile(timings, 0.95)
                verdict = ("met" if p95 <= GOALS_MS[name] else "MISSED") if mode == "cold" else ""
                print(f"{name:28} {mode:8} {statistics.median(timings):8.1f} {p95:8.1f}   "
                      f"<= {GOALS_MS[name]:3d} ms {verdict:6}   {ORIGINAL[name] if mode == 'cold' else ''}")
        print(f"({args.calls} calls per figure and mode, modes taking turns; cold: --cache-entries 0; warm: the "
              f"default cache, "
              f"after one call per path; raw: cold with --no-recorded-series, i.e. without the recording rules; "
              f"baseline: cold, the service from --baseline)")
    finally:
        for process in services:
            if process.poll() is None:
                process.kill()
                process.wait()
        prometheus.stop()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
