"""Do short spikes survive a 250 ms scrape? Our peak series against our mean/plain gauges and node_exporter.

Injects 200 ms CPU bursts (every core busy) and short memory spikes (256 MiB made resident in
~0.15 s, held 200 ms, freed)
at random moments, one at a time with random 2.5-4 s gaps, while a real Prometheus scrapes our exporter (sampling
every 100 ms, 1 s peak window) and Debian's prometheus-node-exporter every 250 ms. Then reads the raw
samples back from Prometheus and counts, per series, the events whose height it shows (at least 75 % of
the injected height above the level before the event), within 1.5 s after the event ended. Level and
height are read from /proc by the injecting process itself: for a CPU burst the busy share over the
0.75 s before it and the headroom from there to 100 %; for a memory spike "used" just before it and the
rise /proc/meminfo reported during the hold.

CPU height seen: ours peak = system_cpu_utilization_peak_ratio, ours mean = system_cpu_utilization_ratio,
node_exporter = busy share between consecutive scrapes of node_cpu_seconds_total (what irate() shows).
Memory height seen: ours peak = system_memory_used_peak_bytes, ours plain = system_memory_usage_bytes
{state="used"}, node_exporter = MemTotal - MemFree - Buffers - Cached - SReclaimable.

    .venv/bin/python bench/peak_capture.py --seconds 60
"""

import argparse
import mmap
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cleanup import require_binary, stop_on_signals  # noqa: E402
from bench.exporter_vs_node_exporter import NODE_EXPORTER, wait_ready  # noqa: E402
from trainmetrics.prometheus_process import PrometheusServer, free_port  # noqa: E402

BURST_SECONDS = 0.2
SPIKE_BYTES = 256 << 20
VISIBLE_SHARE = 0.75
AFTER_EVENT = 1.5  # seconds after an event in which a scrape must show it
GAP = (2.5, 4.0)  # seconds between events: longer than AFTER_EVENT + BEFORE_EVENT
BEFORE_EVENT = 0.75  # the level before an event: past the previous event's peak window (1 s + a scrape)


def burn_worker(commands) -> None:
    """Spin until each received deadline (time.time()); None ends the worker."""
    while (deadline := commands.recv()) is not None:
        while time.time() < deadline:
            pass


def used_bytes() -> int:
    """MemTotal - MemFree - Buffers - Cached - SReclaimable, read from /proc/meminfo now."""
    fields = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, rest = line.partition(":")
            fields[name] = int(rest.split()[0]) * 1024
    return (fields["MemTotal"] - fields["MemFree"] - fields["Buffers"] - fields["Cached"]
            - fields["SReclaimable"])


def cpu_ticks() -> tuple[int, int]:
    """(total, idle + iowait) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:9]]
    return sum(ticks), ticks[3] + ticks[4]


def busy_share_over(seconds: float) -> float:
    """Host busy share measured over the next `seconds` (sleeps that long)."""
    total0, idle0 = cpu_ticks()
    time.sleep(seconds)
    total1, idle1 = cpu_ticks()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def memory_worker(commands, replies) -> None:
    """On each command: map SPIKE_BYTES resident (MAP_POPULATE: the kernel faults it in at once, ~0.15 s
    here), hold it BURST_SECONDS, unmap; reply (start, end, level, height): "used" just before, and its
    rise the kernel reported during the hold. The kernel's accounting does not move by exactly SPIKE_BYTES (pages
    freed by the previous spike may still sit on per-CPU lists), so each event is judged by its own height."""
    while commands.recv() is not None:
        before = used_bytes()
        start = time.time()
        block = mmap.mmap(-1, SPIKE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        during = used_bytes()
        time.sleep(BURST_SECONDS)
        block.close()
        replies.send((start, time.time(), before, during - before))


def inject(seconds: float, rng: random.Random) -> list[tuple[str, float, float, float, float]]:
    """Alternate CPU bursts and memory spikes with random gaps for `seconds`; returns
    (kind, start, end, level, height): the true level just before the event as the injector read it from
    /proc, and the height it added (CPU: the headroom up to every core busy; memory: bytes)."""
    cpu_pipes, workers = [], []
    for _ in range(os.cpu_count() or 1):
        receiver, sender = multiprocessing.Pipe(duplex=False)
        worker = multiprocessing.Process(target=burn_worker, args=(receiver,), daemon=True)
        worker.start()
        cpu_pipes.append(sender)
        workers.append(worker)
    memory_commands_in, memory_commands = multiprocessing.Pipe(duplex=False)
    memory_replies, memory_replies_out = multiprocessing.Pipe(duplex=False)
    memory = multiprocessing.Process(target=memory_worker, args=(memory_commands_in, memory_replies_out), daemon=True)
    memory.start()
    events = []
    stop_at = time.monotonic() + seconds
    kind = "cpu"
    time.sleep(rng.uniform(*GAP))
    while time.monotonic() < stop_at - 2.0:
        if kind == "cpu":
            level = busy_share_over(BEFORE_EVENT)
            start = time.time()
            for pipe in cpu_pipes:
                pipe.send(start + BURST_SECONDS)
            time.sleep(BURST_SECONDS)
            events.append(("cpu", start, start + BURST_SECONDS, level, 1.0 - level))
        else:
            memory_commands.send(True)
            events.append(("memory", *memory_replies.recv()))
        kind = "memory" if kind == "cpu" else "cpu"
        time.sleep(rng.uniform(*GAP))  # the previous event has left every window before the next one
    for pipe in cpu_pipes:
        pipe.send(None)
    memory_commands.send(None)
    for worker in (*workers, memory):
        worker.join(timeout=10)
    return events


def raw_samples(prometheus: PrometheusServer, selector: str, at: float, seconds: float) -> dict[str, list]:
    """{instance: [(timestamp, value), ...]} for every series of the selector (raw samples, no resampling).

    Series of one instance are summed per timestamp (all of a scrape's samples share its timestamp).
    """
    result = prometheus.query(f"{selector}[{int(seconds)}s]", time_=at)
    by_instance: dict[str, dict[float, float]] = {}
    for series in result:
        points = by_instance.setdefault(series["metric"]["instance"], {})
        for timestamp, value in series["values"]:
            points[timestamp] = points.get(timestamp, 0.0) + float(value)
    return {instance: sorted(points.items()) for instance, points in by_instance.items()}


def node_memory_used(prometheus: PrometheusServer, instance: str, at: float, seconds: float) -> list:
    """MemTotal - MemFree - Buffers - Cached - SReclaimable per node_exporter scrape (our "used" formula)."""
    fields = {}
    for name in ("MemTotal", "MemFree", "Buffers", "Cached", "SReclaimable"):
        fields[name] = dict(raw_samples(prometheus, f'node_memory_{name}_bytes{{instance="{instance}"}}',
                                        at, seconds)[instance])
    return [(timestamp, total - fields["MemFree"][timestamp] - fields["Buffers"][timestamp]
             - fields["Cached"][timestamp] - fields["SReclaimable"][timestamp])
            for timestamp, total in sorted(fields["MemTotal"].items())]


def busy_between_scrapes(idle_seconds: list[tuple[float, float]], cpus: int) -> list[tuple[float, float]]:
    """Busy share over each interval between consecutive scrapes of the summed idle+iowait counters."""
    busy = []
    for (t0, idle0), (t1, idle1) in zip(idle_seconds, idle_seconds[1:]):
        if t1 > t0:
            busy.append((t1, 1.0 - (idle1 - idle0) / ((t1 - t0) * cpus)))
    return busy


def measurable(events):
    """Events that added something to see: a CPU burst on an already saturated host adds nothing."""
    return [event for event in events if event[4] > 0.1 * (1.0 if event[0] == "cpu" else SPIKE_BYTES)]


def share_visible(events, points) -> tuple[float, float]:
    """(share of events shown at >= VISIBLE_SHARE of their height, mean shown height / injected height).

    Every series is judged against the same truth: the level the injector read from /proc just before
    the event and the height the event added (a series' own level before would favour a plain gauge over
    a peak series, whose level is itself a max over noise).
    """
    shown = []
    for _kind, start, end, level, height in measurable(events):
        during = [value for timestamp, value in points if start <= timestamp <= end + AFTER_EVENT]
        shown.append((max(during) - level) / height if during else 0.0)
    if not shown:
        return float("nan"), float("nan")
    visible = sum(1 for value in shown if value >= VISIBLE_SHARE)
    return visible / len(shown), statistics.mean(shown)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to inject events")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    options = parser.parse_args()
    if not 10 <= options.seconds < 1e6:
        parser.error(f"--seconds must be at least 10 (events come {GAP[0]}-{GAP[1]} s apart), got {options.seconds:g}")
    require_binary(NODE_EXPORTER, "NODE_EXPORTER_BIN")
    stop_on_signals()
    seed = options.seed if options.seed is not None else random.randrange(1 << 30)
    cpus = os.cpu_count() or 1

    ours_port, node_port = free_port(), free_port()
    ours_address, node_address = f"127.0.0.1:{ours_port}", f"127.0.0.1:{node_port}"
    workdir = Path(tempfile.mkdtemp(prefix="bench-peaks-"))
    ours = subprocess.Popen([sys.executable, "-m", "exporters", f"--listen={ours_address}", "--sample-interval=0.1",
                             "--peak-window=1s", f"--job-dir={workdir / 'jobs'}", "--log-level=warning"],
                            cwd=REPO, stdin=subprocess.DEVNULL)
    node = subprocess.Popen([NODE_EXPORTER, f"--web.listen-address={node_address}", "--log.level=warn"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prometheus = PrometheusServer(workdir / "prometheus", static_targets={"exporter": [ours_address, node_address]})
    try:
        wait_ready(ours_port)
        wait_ready(node_port)
        prometheus.start()
        prometheus.wait_for('count(up{job="exporter"} == 1) == 2', timeout=30)
        time.sleep(2.0)
        load_before = Path("/proc/loadavg").read_text().split()[0]
        started = time.time()
        events = inject(options.seconds, random.Random(seed))
        load_after = Path("/proc/loadavg").read_text().split()[0]
        time.sleep(AFTER_EVENT + 1.0)
        at = time.time()
        span = at - started + 5
        cpu_events = [event for event in events if event[0] == "cpu"]
        memory_events = [event for event in events if event[0] == "memory"]
        rows = []
        ours_peak = raw_samples(prometheus, "system_cpu_utilization_peak_ratio", at, span)[ours_address]
        ours_mean = raw_samples(prometheus, "system_cpu_utilization_ratio", at, span)[ours_address]
        node_idle = raw_samples(prometheus, 'node_cpu_seconds_total{mode=~"idle|iowait"}', at, span)[node_address]
        node_busy = busy_between_scrapes(node_idle, cpus)
        rows.append(("CPU 200 ms bursts", len(cpu_events), ours_peak, ours_mean, node_busy))
        ours_used_peak = raw_samples(prometheus, "system_memory_used_peak_bytes", at, span)[ours_address]
        ours_used = raw_samples(prometheus, 'system_memory_usage_bytes{state="used"}', at, span)[ours_address]
        node_used = node_memory_used(prometheus, node_address, at, span)
        rows.append(("memory 256 MiB spikes", len(memory_events), ours_used_peak, ours_used, node_used))
    finally:
        prometheus.stop()
        for process in (ours, node):
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)     # its Prometheus data, left behind by every run

    print(f"{options.seconds:.0f} s of injection, seed {seed}, {cpus} CPUs; Prometheus scrapes both every 250 ms; "
          f"ours samples every 100 ms with a 1 s peak window")
    print(f"1-min load average {load_before} before, {load_after} after injecting (a busy host leaves CPU bursts "
          f"little headroom: run it on a quiet one)")
    print(f"visible = a scrape within {AFTER_EVENT} s shows >= {VISIBLE_SHARE:.0%} of the injected height; "
          f"height = mean shown height / injected height")
    print(f"{'events (measurable/all)':<24}{'n':>6}{'ours peak':>22}{'ours mean/plain':>22}{'node_exporter':>22}")
    kinds = {"CPU 200 ms bursts": cpu_events, "memory 256 MiB spikes": memory_events}
    for label, _count, peak, plain, node_points in rows:
        cells = []
        for points in (peak, plain, node_points):
            visible, shown = share_visible(kinds[label], points)
            cells.append(f"{visible:>7.0%} (height {shown:4.2f})")
        count = f"{len(measurable(kinds[label]))}/{len(kinds[label])}"
        print(f"{label:<24}{count:>6}" + "".join(f"{cell:>22}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
