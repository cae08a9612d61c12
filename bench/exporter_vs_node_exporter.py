"""Our exporter (sampling at 10 Hz) against Debian's prometheus-node-exporter, both scraped at 4 Hz.

Both run side by side for --seconds; each is scraped every 250 ms (the two half an interval apart, as
Prometheus staggers targets) over a keep-alive connection with the headers Prometheus sends (gzip
accepted), by a minimal client in its own process. Prints each one's CPU seconds per wall second (utime + stime of
the process, all threads, from /proc/PID/stat), scrape latency p50/p99 as the scraper sees it, the series
count, and the CPU ratio ours / node_exporter.

    .venv/bin/python bench/exporter_vs_node_exporter.py --seconds 60
"""

import argparse
import gzip
import http.client
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import socket
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cleanup import require_binary, stop_on_signals  # noqa: E402
from trainmetrics.prometheus_process import free_port  # noqa: E402

NODE_EXPORTER = os.environ.get("NODE_EXPORTER_BIN", "/usr/bin/prometheus-node-exporter")
PROMETHEUS_HEADERS = {  # what Prometheus 2.42 sends on a scrape
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
              "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.42.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "0.2",
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread) from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_ready(port: int, timeout: float = 20.0) -> None:
    """Until GET /metrics answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/metrics")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port}")


def http_get(sock: socket.socket, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 exchange on a keep-alive socket: a minimal client, so its own cost barely shows."""
    sock.sendall(request)
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in header_lines)}

    def read_more() -> bytes:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        return chunk

    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        while len(rest) < length:
            rest += read_more()
        body = rest[:length]
    else:  # chunked: size line, data, CRLF ... until a zero-size chunk
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += read_more()
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += read_more()
            body, rest = body + rest[:size], rest[size + 2:]
            if size == 0:
                break
    return int(status_line.split()[1]), headers, body


def scrape_loop(port: int, interval: float, offset: float, warmup: float, seconds: float, results) -> None:
    """Runs in its own process: scrape every interval, send back latencies, last body, failures."""
    request = (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               + b"".join(f"{name}: {value}\r\n".encode() for name, value in PROMETHEUS_HEADERS.items()) + b"\r\n")
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies, body, failures = [], b"", 0
    started = time.monotonic()
    measure_from, stop_at = started + warmup, started + warmup + seconds
    next_at = started + offset
    while time.monotonic() < stop_at:
        begin = time.perf_counter()
        try:
            status, headers, raw = http_get(sock, request)
            elapsed = time.perf_counter() - begin
            if status != 200:
                raise OSError(f"status {status}")
            if time.monotonic() >= measure_from:
                latencies.append(elapsed)
            body = gzip.decompress(raw) if headers.get(b"content-encoding") == b"gzip" else raw
        except OSError:
            failures += 1
            sock.close()
            sock = socket.create_connection(("127.0.0.1", port))
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    results.send((latencies, body, failures))


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def series_count(body: bytes) -> int:
    """Sample lines in an exposition text."""
    return sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured duration")
    parser.add_argument("--scrape-interval", type=float, default=0.25)
    parser.add_argument("--sample-interval", default="0.1", help="our exporter's --sample-interval")
    parser.add_argument("--warmup", type=float, default=3.0)
    options = parser.parse_args()
    try:
        sample_interval = float(options.sample_interval)
    except ValueError:
        sample_interval = math.nan
    if not (0 < options.seconds < math.inf and 0 < options.scrape_interval < math.inf and options.warmup >= 0
            and 0 < sample_interval < math.inf):
        parser.error("--seconds, --scrape-interval and --sample-interval must be positive, --warmup 0 or more")
    require_binary(NODE_EXPORTER, "NODE_EXPORTER_BIN")
    stop_on_signals()

    ours_port, node_port = free_port(), free_port()
    job_dir = tempfile.mkdtemp(prefix="bench-jobs-")
    ours = subprocess.Popen([sys.executable, "-m", "exporters", f"--listen=127.0.0.1:{ours_port}",
                             f"--sample-interval={options.sample_interval}", f"--job-dir={job_dir}",
                             "--log-level=warning"], cwd=REPO, stdin=subprocess.DEVNULL)
    node = subprocess.Popen([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{node_port}", "--log.level=warn"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(ours_port)
        wait_ready(node_port)
        pids = {"ours": ours.pid, "node_exporter": node.pid}
        pipes, scrapers = {}, []
        # Half an interval apart, as Prometheus spreads its targets' scrapes over the interval: neither
        # exporter's scrape then competes with the other's for the CPUs.
        for name, port, offset in (("ours", ours_port, 0.0), ("node_exporter", node_port, options.scrape_interval / 2)):
            receiver, sender = multiprocessing.Pipe(duplex=False)
            scraper = multiprocessing.Process(target=scrape_loop, daemon=True,
                                              args=(port, options.scrape_interval, offset, options.warmup,
                                                    options.seconds, sender))
            scraper.start()
            pipes[name] = receiver
            scrapers.append(scraper)
        time.sleep(options.warmup)
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.monotonic()
        results = {name: pipe.recv() for name, pipe in pipes.items()}  # arrives when the scrapers stop
        wall = time.monotonic() - started
        cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        for scraper in scrapers:
            scraper.join()
    finally:
        for process in (ours, node):
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(job_dir, ignore_errors=True)

    print(f"{wall:.1f} s, scraped every {options.scrape_interval * 1000:.0f} ms; ours samples every "
          f"{float(options.sample_interval) * 1000:.0f} ms; {os.cpu_count()} CPUs")
    print(f"{'exporter':<15}{'CPU s/s':>10}{'scrape p50':>13}{'scrape p99':>13}{'series':>9}{'scrapes':>9}"
          f"{'failed':>8}")
    rate = {}
    for name, (latencies, body, failures) in results.items():
        rate[name] = (cpu_after[name] - cpu_before[name]) / wall
        print(f"{name:<15}{rate[name]:>10.4f}{percentile(latencies, 0.5) * 1000:>10.2f} ms"
              f"{percentile(latencies, 0.99) * 1000:>10.2f} ms{series_count(body):>9}"
              f"{len(latencies):>9}{failures:>8}")
    ratio = rate["ours"] / rate["node_exporter"] if rate["node_exporter"] else float("inf")
    print(f"CPU ratio ours / node_exporter: {ratio:.2f} (goal <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
