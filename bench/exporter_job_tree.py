"""What a job's process tree costs the node exporter: the `jobs` collector's CPU per fast sample (every 100 ms it
reads /proc/PID/stat of every process in every job's tree) and per tree walk (every 1 s it reads the parent of
every process on the host, once for all jobs, and finds each tree's new members),
for one job of N processes against the same job alone (its root process only), side by side in one run.

    .venv/bin/python bench/exporter_job_tree.py --processes 200

Prints the ratio of the two and the cost per job process in microseconds of CPU per fast sample, and what that
adds at the exporter's 10 Hz as a share of one core.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cleanup import stop_on_signals  # noqa: E402
from trainmetrics.exporters.collectors.jobs import JobTracker  # noqa: E402
from trainmetrics.jobmap import JobMapping, write_job_mapping  # noqa: E402

FAST_HZ = 10


def measure(root_pid: int, samples: int, walks: int) -> tuple[float, float, int]:
    """(CPU seconds per fast sample, per tree walk, processes seen) for the job rooted at root_pid."""
    with tempfile.TemporaryDirectory() as job_dir:
        write_job_mapping(Path(job_dir), JobMapping(job_id="bench", pid=root_pid))
        tracker = JobTracker(job_dir)
        tracker.update(0.0)
        tracker.refresh_trees(0.0)
        tracker.update(0.05)
        seen = tracker.snapshot.usage["bench"].processes
        began = time.thread_time()
        for index in range(samples):
            tracker.update(1.0 + index)
        per_sample = (time.thread_time() - began) / samples
        began = time.thread_time()
        for index in range(walks):
            tracker.descendants._read = None       # a fresh reading of the host's processes, as once a second
            tracker.refresh_trees(10_000.0 + index)
        per_walk = (time.thread_time() - began) / walks
    return per_sample, per_walk, seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=200, help="processes in the big job's tree")
    parser.add_argument("--samples", type=int, default=200, help="fast samples timed per job")
    args = parser.parse_args()
    if args.processes < 1 or args.samples < 1:
        parser.error("--processes and --samples must be at least 1")
    stop_on_signals()
    # The big job: a root (a sleeping python) with N - 1 sleeping children; the small one: a root alone.
    script = f"import subprocess, time; [subprocess.Popen(['sleep', '1000']) for _ in range({args.processes - 1})]; " \
             "time.sleep(1000)"
    big = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)     # its own group: ended whole
    small = subprocess.Popen(["sleep", "1000"])
    try:
        time.sleep(3)       # its children started
        alone, alone_walk, _ = measure(small.pid, args.samples, 20)
        tree, tree_walk, seen = measure(big.pid, args.samples, 20)
    finally:
        os.killpg(big.pid, signal.SIGKILL)
        small.kill()
        big.wait()
        small.wait()
    per_process = (tree - alone) / max(1, seen - 1)
    print(f"job of {seen} processes: {tree * 1e3:.2f} ms CPU per fast sample, {tree_walk * 1e3:.2f} ms per tree walk")
    print(f"job of 1 process:   {alone * 1e3:.3f} ms CPU per fast sample, {alone_walk * 1e3:.2f} ms per tree walk")
    print(f"ratio {tree / alone:.0f}x; {per_process * 1e6:.1f} us per job process per fast sample: "
          f"{per_process * FAST_HZ * 100:.2f} % of a core per process at {FAST_HZ} Hz "
          f"({(tree * FAST_HZ + tree_walk) * 100:.1f} % for this job, tree walks included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
