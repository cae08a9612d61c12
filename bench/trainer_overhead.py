"""Instrumentation overhead of the trainer: the same CPU training job with JobMetrics on and off.

Runs many short interleaved rounds in one process (off, on, off, on, ...: one log interval of 50 steps each),
so machine noise hits both sides alike and averages out, with a scraper process reading /metrics at 4 Hz
throughout (as Prometheus at 250 ms would, from its own process over one keep-alive connection: the job pays
for serving a scrape, not for the client that asks). torch runs on one thread so that the process's CPU time
measures the work: throughput per CPU second, summed over all rounds of a side, is robust to other load on a
shared machine; wall-clock throughput is printed beside it, and each half of the run on its own, to show
how far the figure moves within one run. Goal: >= 0.99.

    .venv/bin/python bench/trainer_overhead.py [--rounds 600] [--steps 50]
"""

import argparse
import subprocess
import sys
import time

import torch
from torch import nn

from trainmetrics.trainer.metrics import JobMetrics
from trainmetrics.trainer.telemetry import Publish


# One keep-alive connection, as Prometheus keeps one per target.
SCRAPER = """
import http.client, sys, time
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
while True:
    time.sleep(0.25)
    connection.request("GET", "/metrics", headers={"X-Prometheus-Scrape-Timeout-Seconds": "0.2"})
    connection.getresponse().read()
"""


def make_job(batch_size: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch_size * 16, 64)
    y = torch.randint(0, 10, (batch_size * 16,))
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    loss_fn = nn.CrossEntropyLoss()

    def train_step(inputs, targets):
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return batches, train_step


def measured(run, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one run."""
    cpu, wall = time.process_time(), time.perf_counter()
    run(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def ratio(off: list[float], on: list[float]) -> float:
    """Throughput instrumented / uninstrumented, from the seconds each side's rounds took in all."""
    return sum(off) / sum(on)


def run_off(batches, train_step, steps: int) -> int:
    done = 0
    while done < steps:
        for inputs, targets in batches:
            train_step(inputs, targets)
            done += 1
            if done == steps:
                break
    return steps


def run_on(metrics: JobMetrics, batches, train_step, steps: int) -> int:
    done = 0
    while done < steps:
        for inputs, targets in metrics.timed(batches):
            loss = train_step(inputs, targets)
            metrics.step(loss=loss, samples=len(inputs))
            done += 1
            if done == steps:
                break
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--steps", type=int, default=50, help="steps per round and side")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    if args.rounds < 2 or args.steps < 1:
        parser.error("--rounds must be at least 2 (the run is also shown in halves) and --steps at least 1")

    torch.set_num_threads(1)
    batches, train_step = make_job(args.batch_size)
    metrics = JobMetrics("bench-overhead", publish=Publish(), log_every=50)
    metrics.start()
    # As Prometheus asks: a counting scrape (the header), so the linger and eval paths are live.
    scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, str(metrics.metrics_port)])
    run_off(batches, train_step, 200)                  # warm-up
    run_on(metrics, batches, train_step, 200)
    off_wall, off_cpu, on_wall, on_cpu = [], [], [], []
    for _ in range(args.rounds):
        wall, cpu = measured(run_off, batches, train_step, args.steps)
        off_wall.append(wall), off_cpu.append(cpu)
        wall, cpu = measured(run_on, metrics, batches, train_step, args.steps)
        on_wall.append(wall), on_cpu.append(cpu)
    scraper.terminate()
    scraper.wait()
    metrics.finish("completed")
    metrics.close()
    half = args.rounds // 2
    print(f"step time (uninstrumented, mean): {1000 * sum(off_wall) / (args.rounds * args.steps):.2f} ms")
    print(f"rounds: {args.rounds} x {args.steps} steps per side, interleaved; scraped at 4 Hz by another process")
    print(f"throughput per CPU second, instrumented / uninstrumented: {ratio(off_cpu, on_cpu):.4f}  (goal >= 0.99); "
          f"halves {ratio(off_cpu[:half], on_cpu[:half]):.4f}, {ratio(off_cpu[half:], on_cpu[half:]):.4f}")
    print(f"wall-clock throughput, instrumented / uninstrumented:     {ratio(off_wall, on_wall):.4f}")


if __name__ == "__main__":
    main()
