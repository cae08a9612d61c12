"""A job's training loop under a flood of /metrics requests, with the server's render pacing and without.

The instrumented CPU job of bench/trainer_overhead.py (torch on one thread, ~2 ms steps) runs interleaved rounds
of --steps steps in four conditions: no flood or a flood, each with the server's render pacing
(metrics_http.RenderPacer, the default) and with it off (a pacer that never holds a request back: the server
before it). The flood is another process whose --clients threads each ask for /metrics on a kept-alive
connection as fast as they are answered; it is stopped (SIGSTOP) in the rounds without a flood. Every round
starts after the same 0.5 s pause (the flood's requests in flight are answered in it), quiet or flooded first by
turns. A scrape holds
the GIL the loop needs, so the figure is the loop's wall-clock throughput: a flooded round's steps per second over
the unflooded rounds' (1.0: the flood costs the loop nothing), with pacing and without.

    .venv/bin/python bench/metrics_flood.py [--rounds 20] [--steps 200] [--clients 8] [--batch-size 256]
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cleanup import stop_on_signals  # noqa: E402
from bench.trainer_overhead import make_job, run_on  # noqa: E402
from trainmetrics.metrics_http import RenderPacer  # noqa: E402
from trainmetrics.trainer.metrics import JobMetrics  # noqa: E402
from trainmetrics.trainer.telemetry import Publish  # noqa: E402

# Before each round: the requests in flight when the flood was stopped are answered first (paced, one per
# --clients at 20 a second: 0.4 s at most).
SETTLE_SECONDS = 0.5

# Each thread: one kept-alive connection, a request as soon as the last answer is read.
FLOOD = """
import http.client, sys, threading
def flood():
    connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
    while True:
        connection.request("GET", "/metrics")
        connection.getresponse().read()
threads = [threading.Thread(target=flood) for _ in range(int(sys.argv[2]))]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


def steps_per_second(metrics: JobMetrics, batches, train_step, steps: int) -> float:
    began = time.perf_counter()
    run_on(metrics, batches, train_step, steps)
    return steps / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="rounds per condition")
    parser.add_argument("--steps", type=int, default=200, help="steps per round")
    parser.add_argument("--clients", type=int, default=8, help="the flood's connections")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1 or not 1 <= args.clients <= 32 or args.batch_size < 1:
        parser.error("--rounds, --steps and --batch-size must be at least 1, --clients 1 to 32 (the server's "
                     "connections)")
    stop_on_signals()

    torch.set_num_threads(1)
    batches, train_step = make_job(args.batch_size)
    metrics = JobMetrics("bench-flood", publish=Publish(), log_every=50)
    metrics.start()
    server = metrics._publication.server
    pacers = {"paced": server.pacer, "unpaced": RenderPacer(rate=1e12, burst=1)}
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(metrics.metrics_port), str(args.clients)])
    os.kill(flood.pid, signal.SIGSTOP)
    rates: dict[tuple[str, bool], list[float]] = {(pacing, flooded): [] for pacing in pacers
                                                  for flooded in (False, True)}
    renders, flooded_seconds = {pacing: 0 for pacing in pacers}, {pacing: 0.0 for pacing in pacers}
    render, rendered = server.render, [0]

    def counted(scrape):
        rendered[0] += 1
        return render(scrape)

    server.render = counted
    ended = "cancelled"
    try:
        run_on(metrics, batches, train_step, 200)          # warm-up
        for index in range(args.rounds):
            for pacing, pacer in pacers.items():
                server.pacer = pacer
                # Quiet or flooded first by turns, and every round after the same pause: a round begun after a
                # pause ran 4-7 % slower here than one begun straight after another (caches and the vCPU cold),
                # and only the quiet rounds had one.
                for flooded in ((False, True) if index % 2 == 0 else (True, False)):
                    time.sleep(SETTLE_SECONDS)
                    if not flooded:
                        rates[pacing, False].append(steps_per_second(metrics, batches, train_step, args.steps))
                        continue
                    os.kill(flood.pid, signal.SIGCONT)
                    before, began = rendered[0], time.perf_counter()
                    rates[pacing, True].append(steps_per_second(metrics, batches, train_step, args.steps))
                    renders[pacing] += rendered[0] - before
                    flooded_seconds[pacing] += time.perf_counter() - began
                    os.kill(flood.pid, signal.SIGSTOP)
        ended = "completed"
    finally:
        flood.kill()
        flood.wait()
        metrics.finish(ended)
        metrics.close()
    print(f"batch size {args.batch_size}; {args.rounds} rounds x {args.steps} steps per condition, interleaved; "
          f"a flood of {args.clients} kept-alive connections")
    for pacing in pacers:
        quiet, flooded = sum(rates[pacing, False]) / args.rounds, sum(rates[pacing, True]) / args.rounds
        print(f"{pacing:>8}: {quiet:7.1f} steps/s without the flood, {flooded:7.1f} with it "
              f"({renders[pacing] / flooded_seconds[pacing]:.0f} renders/s): ratio {flooded / quiet:.3f}")


if __name__ == "__main__":
    main()
