"""Our exporter (`trainmetrics exporter`, 10 Hz sampling, gpu collector off: no GPU) under two scrapers at 10 Hz each for S seconds.

    .venv/bin/python bench/exporter_load.py --seconds 60

Checks: no failed scrape (transport error, non-200, or a collector reporting exporter_collector_success 0),
every counter (`*_total`, `*_seconds_total`) monotonic per series across each scraper's scrapes, and the
exporter's RSS and thread count (/proc/PID/status) flat from the first to the last second.
"""

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cleanup import stop_on_signals  # noqa: E402
from trainmetrics.prometheus_process import free_port  # noqa: E402

SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)")


def status(pid: int) -> tuple[float, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def scraper(url: str, until: float, result: dict) -> None:
    last: dict[str, float] = {}
    with httpx.Client(timeout=5) as client:
        next_at = time.monotonic()
        while time.monotonic() < until:
            began = time.perf_counter()
            try:
                response = client.get(url)
                ok = response.status_code == 200
                text = response.text if ok else ""
            except httpx.HTTPError:
                ok, text = False, ""
            result["latencies"].append(time.perf_counter() - began)
            result["scrapes"] += 1
            if not ok:
                result["failed"] += 1
            for line in text.splitlines():
                match = SAMPLE.match(line)
                if not match:
                    continue
                name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
                if name == "exporter_collector_success" and value != 1:
                    result["collector_failures"] += 1
                if name.endswith("_total"):
                    key = name + labels
                    if key in last and value < last[key]:
                        result["non_monotonic"].append((key, last[key], value))
                    last[key] = value
            next_at += 0.1
            time.sleep(max(0.0, next_at - time.monotonic()))
    result["series"] = len(last)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    if not args.seconds > 0:
        parser.error(f"--seconds must be positive, got {args.seconds:g}")
    stop_on_signals()
    port = free_port()
    exporter = subprocess.Popen([sys.executable, "-m", "trainmetrics", "exporter", "--listen", f"127.0.0.1:{port}",
                                 "--sample-interval", "0.1", "--no-collector.gpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        time.sleep(2)                                  # past start-up allocations
        until = time.monotonic() + args.seconds
        results = [{"scrapes": 0, "failed": 0, "collector_failures": 0, "non_monotonic": [], "latencies": []}
                   for _ in range(2)]
        threads = [threading.Thread(target=scraper, args=(url, until, r), daemon=True) for r in results]
        for i, thread in enumerate(threads):
            thread.start()
            time.sleep(0.05 * (i + 1))                 # the two scrapers half an interval apart
        time.sleep(1)                                  # both connections open (one server thread each)
        samples = [status(exporter.pid)]
        while time.monotonic() < until:
            time.sleep(1)
            samples.append(status(exporter.pid))
        for thread in threads:
            thread.join()
        rss = [s[0] for s in samples]
        threads_seen = sorted({s[1] for s in samples})
        latencies = sorted(l for r in results for l in r["latencies"])
        print(f"{args.seconds:.0f} s, 2 scrapers at 10 Hz, exporter sampling at 10 Hz")
        for i, r in enumerate(results):
            print(f"scraper {i + 1}: {r['scrapes']} scrapes, {r['failed']} failed, {r['collector_failures']} "
                  f"collector failures, {len(r['non_monotonic'])} counter decreases over {r.get('series', 0)} "
                  f"counter series")
        print(f"scrape latency p50 {latencies[len(latencies) // 2] * 1000:.2f} ms, "
              f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.2f} ms")
        print(f"RSS MiB first {rss[0]:.1f}, last {rss[-1]:.1f}, min {min(rss):.1f}, max {max(rss):.1f}; "
              f"threads {threads_seen}")
        bad = any(r["failed"] or r["collector_failures"] or r["non_monotonic"] for r in results)
        for r in results:
            for decrease in r["non_monotonic"][:5]:
                print("counter decreased:", decrease)
        # Flat: no growth from the first half to the second (the HTTP server's per-connection threads come and go).
        half = len(samples) // 2
        grew = max(s[1] for s in samples[half:]) > max(s[1] for s in samples[:half]) or \
            max(rss[half:]) > max(rss[:half]) + 1.0
        print("RSS and threads flat" if not grew else "RSS or threads GREW from the first half to the second")
        return 1 if bad or grew else 0
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
