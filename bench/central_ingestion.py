"""How many samples per second the central store (single-node VictoriaMetrics, Debian's package) takes on this
machine: synthetic 250 ms series shaped like the fleet's (a job's trainer_* series and a node exporter's
host and GPU series) pushed in Prometheus text format by a few concurrent senders, as remote writes from
many nodes would arrive, until every sample is searchable.

    .venv/bin/python bench/central_ingestion.py [--series 20000] [--seconds 30] [--senders 2]

Prints samples per second accepted and searchable (docs/scaling.md uses it).
"""

import argparse
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cleanup import stop_on_signals  # noqa: E402
from trainmetrics.prometheus_process import VictoriaMetricsServer  # noqa: E402

SCRAPE_MS = 250


def batch(series: range, start_ms: int, steps: int) -> bytes:
    """Text-format lines: each series in `series` at `steps` timestamps 250 ms apart from start_ms."""
    lines = []
    for index in series:
        name, labels = ("trainer_samples_total", f'job_id="job-{index // 60}",rank="0",instance="n{index // 600}:9"') \
            if index % 2 else ("hw_gpu_utilization_ratio", f'gpu="{index % 8}",uuid="u{index}",instance="n{index // 600}:9105"')
        for step in range(steps):
            lines.append(f"{name}{{{labels},s=\"{index}\"}} {index + step} {start_ms + step * SCRAPE_MS}")
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=20_000)
    parser.add_argument("--seconds", type=int, default=30, help="seconds of 250 ms data per series")
    parser.add_argument("--senders", type=int, default=2)
    args = parser.parse_args()
    if args.series < 1 or args.seconds < 1 or args.senders < 1:
        # (with none, nothing became searchable and the wait for it never ended)
        parser.error("--series, --seconds and --senders must be at least 1")
    stop_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="bench-vm-"))
    victoria = VictoriaMetricsServer(workdir)
    try:
        victoria.start()     # inside: a signal while it starts still stops it
        steps = args.seconds * 1000 // SCRAPE_MS
        start_ms = int(time.time() * 1000) - args.seconds * 1000
        chunk = 500                                    # series per request
        work = [range(i, min(i + chunk, args.series)) for i in range(0, args.series, chunk)]
        bodies = [batch(part, start_ms, steps) for part in work]
        total = args.series * steps
        url = f"{victoria.url}/api/v1/import/prometheus"
        lock = threading.Lock()

        def send():
            while True:
                with lock:
                    if not bodies:
                        return
                    body = bodies.pop()
                urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=120).read()

        began = time.monotonic()
        senders = [threading.Thread(target=send, daemon=True) for _ in range(args.senders)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        accepted = time.monotonic() - began
        urllib.request.urlopen(f"{victoria.url}/internal/force_flush", timeout=120).read()
        while True:
            # Searchable by the time the query that found them all was sent: timed after its answer and a 0.2 s
            # sleep, the query's own run over every sample (and up to 0.2 s) counted as ingestion time.
            asked = time.monotonic()
            found = victoria.query(f"sum(count_over_time({{s!=\"\"}}[{args.seconds + 60}s]))")
            if found and int(float(found[0]["value"][1])) >= total:
                break
            time.sleep(0.02)
        searchable = asked - began
    finally:
        victoria.stop()
        shutil.rmtree(workdir, ignore_errors=True)     # the samples sent, left behind by every run
    print(f"{args.series} series x {steps} samples (250 ms for {args.seconds} s) = {total:,} samples, "
          f"{args.senders} senders")
    print(f"  accepted:   {total / accepted:,.0f} samples/s ({accepted:.1f} s)")
    print(f"  searchable: {total / searchable:,.0f} samples/s ({searchable:.1f} s)")


if __name__ == "__main__":
    main()
