"""A two-rank job one rank of which went unscraped minutes before the job's end (frozen, its node lost: the other
rank waits in the collective until it times out), on backfilled history (promtool) in a real Prometheus: every
rank's own figures count, as the trainer counted them, and every host's energy as its node exporter counted it."""

import time

import pytest

from trainmetrics.analytics.app import Settings
from trainmetrics.analytics.job import NO_GPU_ENERGY

from .conftest import (as_openmetrics, backfilled_backend, backfilled_prometheus, running, scraped_job,
                       serve)

pytestmark = pytest.mark.slow

STATES = ("queued", "running", "paused", "completed", "failed", "cancelled")
RATE = 16           # samples per second and rank while both step
FROZEN_AFTER = 300.0
WAITED = 600.0      # rank 0 in the collective until it timed out
HOLD = 60.0         # a node exporter publishes a job's energy this long after it last attributed it
CPU_WATTS = 3       # each host's share of its packages' energy for the job (process_energy_joules_total)


def history(start: float) -> tuple[str, dict]:
    frozen, end = start + FROZEN_AFTER, start + FROZEN_AFTER + WAITED
    lines = []
    for rank in ("0", "1"):
        base = f'job_id="ranks-1",instance="h:{rank}",job="trainer",rank="{rank}"'
        last = end if rank == "0" else frozen
        scrapes = [start + 10.0 * i for i in range(int((last - start) // 10) + 1)]
        if rank == "0":
            scrapes.append(end + 0.25)          # its final scrape
        for t in scrapes:
            stepped = min(t, frozen) - start
            lines += [f"trainer_heartbeat_timestamp_seconds{{{base}}} {t:.3f} {t:.3f}",
                      f"trainer_samples_total{{{base}}} {int(RATE * stepped)} {t:.3f}",
                      f"trainer_steps_total{{{base}}} {int(RATE * stepped) // 8} {t:.3f}",
                      f"trainer_step_duration_seconds_sum{{{base}}} {stepped * (1 + int(rank)) / 2:.3f} {t:.3f}",
                      f"trainer_step_duration_seconds_count{{{base}}} {int(RATE * stepped) // 8} {t:.3f}"]
            if rank != "0":
                continue
            final = t > end
            lines += [f'trainer_job_info{{{base},job_name="r",model="mlp",dataset="blobs",owner="a",device="cpu",'
                      f'world_size="2"}} 1 {t:.3f}',
                      f"trainer_process_start_timestamp_seconds{{{base}}} {start - 5:.3f} {t:.3f}",
                      f"trainer_job_start_timestamp_seconds{{{base}}} {start:.3f} {t:.3f}",
                      f"trainer_loss{{{base}}} 0.5 {t:.3f}", f"trainer_loss_finite{{{base}}} 1 {t:.3f}"]
            lines += [f'trainer_job_state{{{base},state="{s}"}} {int(s == ("failed" if final else "running"))} {t:.3f}'
                      for s in STATES]
            if final:
                lines.append(f"trainer_job_end_timestamp_seconds{{{base}}} {end:.3f} {t:.3f}")
    energy = {}
    for rank in ("0", "1"):
        # Each rank's host's node exporter: the job's CPU time while its process runs there (rank 1's ended with
        # its freeze), its energy for the hold after.
        base = f'job_id="ranks-1",instance="n{rank}:9101",job="exporter"'
        last = end if rank == "0" else frozen
        energy[rank] = CPU_WATTS * (last - start)
        for t in (start + 10.0 * i for i in range(int((last + HOLD - start) // 10) + 1)):
            ran = min(t, last) - start
            lines.append(f"process_energy_joules_total{{{base},source=\"cpu\"}} {CPU_WATTS * ran:.3f} {t:.3f}")
            if t <= last:
                lines.append(f"process_cpu_time_seconds_total{{{base}}} {ran:.3f} {t:.3f}")
    samples = int(RATE * FROZEN_AFTER)
    return as_openmetrics(lines), {"total_samples": 2 * samples, "total_steps": samples // 8,
                                   "average_step_seconds": FROZEN_AFTER * 1.5 / (2 * (samples // 8)),
                                   "cpu_joules": energy["0"] + energy["1"]}


def test_a_rank_unscraped_long_before_the_end_counts_its_samples(tmp_path):
    text, trainer = history(time.time() - 3600)
    with running(backfilled_prometheus(tmp_path, text)) as prometheus, \
            serve(Settings(prometheus_url=prometheus.url, recorded_series=False)) as client:
        response = client.get("/api/training/ranks-1/analytics")
        assert response.status_code == 200, response.text
        body = response.json()
        listed = client.get("/api/training/analytics/jobs", params={"range": "2h"}).json()["jobs"]
    row = next(row for row in listed if row["job_id"] == "ranks-1")
    performance = body["performance"]
    assert body["status"] == "failed"
    assert performance["total_samples"] == trainer["total_samples"] == row["total_samples"]
    assert performance["total_steps"] == trainer["total_steps"]
    assert performance["average_step_seconds"] == pytest.approx(trainer["average_step_seconds"], rel=1e-6)


@pytest.mark.parametrize("kind", ["prometheus", "victoria"])
def test_a_host_whose_rank_ended_long_before_the_end_counts_its_energy(tmp_path, kind):
    """Energy was read in the minute before rank 0's end alone: rank 1's host had stopped publishing the job's
    energy (the exporter holds it a minute after the job leaves it) ten minutes before, so its 900 J were left
    out, and the job read as one whose other host had no readable RAPL. (Both backends: that host's read names its
    instance in a regular expression, which each parses itself.)"""
    text, trainer = history(time.time() - 3600)
    with backfilled_backend(kind, tmp_path, text) as backend, \
            serve(Settings(prometheus_url=backend.url, recorded_series=False)) as client:
        response = client.get("/api/training/ranks-1/analytics")
    assert response.status_code == 200, response.text
    energy = response.json()["energy"]
    assert (energy["cpu_joules"], energy["unavailable_reason"]) == (trainer["cpu_joules"], NO_GPU_ENERGY)


def running_jobs(written: float) -> str:
    """Two one-process jobs training now, each on a host of its own whose node exporter attributes it (its CPU
    time): `rapl-1`'s exporter counts its energy, `cpuonly-1`'s has no energy source (no RAPL readable, no GPU: a
    cloud VM's, a container's) and so publishes no energy count at all."""
    start, lines = written - 600.0, []
    for job_id, host, energy in (("rapl-1", "n0:9101", True), ("cpuonly-1", "n1:9101", False)):
        base = f'job_id="{job_id}",instance="h:{host}",job="trainer",rank="0"'
        exporter = f'job_id="{job_id}",instance="{host}",job="exporter"'
        for t in (start + 10.0 * i for i in range(61)):
            lines += scraped_job(base, 'job_name="r",model="mlp",dataset="blobs",owner="a",device="cpu"',
                                 start, written + 3600, t)
            lines.append(f"process_cpu_time_seconds_total{{{exporter}}} {t - start:.3f} {t:.3f}")
            if energy:
                lines.append(f'process_energy_joules_total{{{exporter},source="cpu"}} {CPU_WATTS * (t - start):.3f} '
                             f"{t:.3f}")
    return as_openmetrics(lines)


def prometheus_requests(client) -> float:
    """The requests the analytics made to their backend so far (their own counter)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith("analytics_prometheus_requests_total{"))


@pytest.mark.parametrize("kind", ["prometheus", "victoria"])
def test_a_running_job_on_a_host_without_an_energy_source_costs_no_extra_read(tmp_path, kind):
    """A host that attributes the job now and shows no energy count has no energy source: its exporter publishes
    the job's energy beside its CPU time as long as it counts any. Read again over the whole run, as a host whose
    processes ended first is, every analytics request of a running job on such a host (a cloud VM's, a
    container's: no readable RAPL) made one more round of requests to the backend after the first, for nothing."""
    with backfilled_backend(kind, tmp_path, running_jobs(time.time())) as backend, \
            serve(Settings(prometheus_url=backend.url, recorded_series=False)) as client:
        made = {}
        for job_id in ("rapl-1", "cpuonly-1"):
            before = prometheus_requests(client)
            response = client.get(f"/api/training/{job_id}/analytics")
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "running"
            made[job_id] = prometheus_requests(client) - before
    assert made["cpuonly-1"] == made["rapl-1"], made
