"""Instrumentation overhead of the trainer: the same CPU training job with JobMetrics on and off.

Runs interleaved rounds in one process (off, on, off, on, ...), so machine noise hits both sides
alike, with a scraper process reading /metrics at 4 Hz throughout (as Prometheus at 250 ms would, from its
own process: the job pays for serving a scrape, not for the client that asks). torch runs on one thread so that the process's CPU time measures the work: throughput per CPU
second is robust to other load on a shared machine, wall-clock throughput is printed beside it.
Prints the median per-round ratio on ÷ off. Goal: ≥ 0.99.

    .venv/bin/python bench/trainer_overhead.py [--rounds 30] [--steps 300]
"""

import argparse
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from trainmetrics.trainer.metrics import JobMetrics
from trainmetrics.trainer.telemetry import Publish


SCRAPER = """
import sys, time, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"X-Prometheus-Scrape-Timeout-Seconds": "0.2"})
while True:
    time.sleep(0.25)
    urllib.request.urlopen(request).read()
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
    """(steps per wall second, steps per CPU second of this process) of one run."""
    cpu, wall = time.process_time(), time.perf_counter()
    steps = run(*args)
    return steps / (time.perf_counter() - wall), steps / (time.process_time() - cpu)


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
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300, help="steps per round and side")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    torch.set_num_threads(1)
    batches, train_step = make_job(args.batch_size)
    metrics = JobMetrics("bench-overhead", publish=Publish(), log_every=50)
    metrics.start()
    # As Prometheus asks: a counting scrape (the header), so the linger and eval paths are live.
    scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, f"http://127.0.0.1:{metrics.metrics_port}/metrics"])
    run_off(batches, train_step, 100)                  # warm-up
    run_on(metrics, batches, train_step, 100)
    wall_ratios, cpu_ratios, step_ms = [], [], []
    for _ in range(args.rounds):
        off_wall, off_cpu = measured(run_off, batches, train_step, args.steps)
        on_wall, on_cpu = measured(run_on, metrics, batches, train_step, args.steps)
        wall_ratios.append(on_wall / off_wall)
        cpu_ratios.append(on_cpu / off_cpu)
        step_ms.append(1000 / off_wall)
    scraper.terminate()
    scraper.wait()
    metrics.finish("completed")
    metrics.close()
    print(f"step time (uninstrumented, median): {statistics.median(step_ms):.2f} ms")
    print(f"rounds: {args.rounds} x {args.steps} steps per side; scraped at 4 Hz by another process")
    print(f"throughput per CPU second, instrumented / uninstrumented (median): "
          f"{statistics.median(cpu_ratios):.4f}  (goal >= 0.99)")
    print(f"wall-clock throughput, instrumented / uninstrumented (median):     "
          f"{statistics.median(wall_ratios):.4f}")

if __name__ == "__main__":
    main()
