"""The fleet summary's figures over its range, on backfilled history (promtool) read raw: the training time counts
only what is inside the range, as the goodput beside it does, and an owner's job trends count the jobs that the
owner's rows count, no other."""

import time

import pytest

from trainmetrics.analytics.app import Settings

from .conftest import as_openmetrics, backfilled_prometheus, running, serve
from .test_fleet_agrees import STATES, process

pytestmark = pytest.mark.slow

INFO = dict(job_name="x", model="mlp", dataset="blobs", device="cpu")


def history(written: float) -> str:
    lines = []
    # carol's: one that began 10 minutes before the (1-hour) range and ran 10 minutes into it; one inside it.
    lines += process("straddled-1", "h:1", written - 4200, written - 3000, "completed", {**INFO, "owner": "carol"})
    lines += process("inside-1", "h:2", written - 2000, written - 1400, "completed", {**INFO, "owner": "carol"})
    # Run by alice, paused, resumed by bob: the job is neither's alone (neither owner's rows count it).
    lines += process("shared-2", "h:3", written - 3000, written - 2400, "paused", {**INFO, "owner": "alice"})
    lines += process("shared-2", "h:4", written - 2000, written - 1400, "completed", {**INFO, "owner": "bob"},
                     samples_from=30000)
    # alice's own job: 50 samples/s for 10 minutes.
    lines += process("alice-own", "h:5", written - 1200, written - 600, "completed", {**INFO, "owner": "alice"})
    # erin's, paused 80 minutes ago and resumed within the range: its first run counts nowhere in the range.
    lines += process("resumed-3", "h:6", written - 6000, written - 4800, "paused", {**INFO, "owner": "erin"})
    lines += process("resumed-3", "h:7", written - 1000, written - 700, "completed", {**INFO, "owner": "erin"},
                     samples_from=60000, checkpoints_from=2)
    # dave's two jobs that never ran: one still in the job server's queue, one cancelled there 25 minutes ago.
    lines += never_ran("waiting-1", written - 1200, written, None)
    lines += never_ran("dropped-1", written - 1800, written - 1200, written - 1500)
    return as_openmetrics(lines)


def never_ran(job_id: str, first: float, last: float, cancelled: float | None) -> list[str]:
    """The job server's series of a job in its queue from `first`, scraped to `last`: its state (queued, cancelled
    from `cancelled` on, with its end), submission, name and owner (jobserver/app.py WaitingJobsCollector)."""
    server = f'job_id="{job_id}",instance="server:8000",job="server"'
    lines = []
    for t in (first + i * 10.0 for i in range(int((last - first) / 10) + 1)):
        current = "cancelled" if cancelled is not None and t >= cancelled else "queued"
        lines += [f'trainer_job_state{{{server},state="{s}"}} {int(s == current)} {t:.3f}' for s in STATES]
        lines.append(f'trainer_job_info{{{server},job_name="{job_id}",owner="dave"}} 1 {t:.3f}')
        lines.append(f"trainer_job_submitted_timestamp_seconds{{{server}}} {first:.3f} {t:.3f}")
        if current == "cancelled":
            lines.append(f"trainer_job_end_timestamp_seconds{{{server}}} {cancelled:.3f} {t:.3f}")
    return lines


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    written = time.time()
    with running(backfilled_prometheus(tmp_path_factory.mktemp("fleet-range"), history(written))) as prometheus:
        yield prometheus, written


def summary_of(backend, owner: str | None, **params) -> dict:
    settings = Settings(prometheus_url=backend.url, recorded_series=False, owner_scope=lambda request: owner)
    with serve(settings) as client:
        response = client.get("/api/training/analytics/summary", params={"range": "1h", **params})
        assert response.status_code == 200, response.text
        return response.json()


@pytest.mark.parametrize("owner", ["carol", None])
def test_total_training_seconds_counts_only_the_range(backfilled, owner):
    """straddled-1 trained 20 minutes, 10 of them before the range: the summary counted all 20 (its row's
    training_seconds), where the goodput beside it counts each phase from the range's start."""
    backend, written = backfilled
    body = summary_of(backend, owner)
    start = body["evaluated_at"] - body["range_seconds"]
    straddled = (written - 3000) - start          # its training from the range's start to its end
    assert 500 < straddled < 600                  # (the range's start is within its run)
    expected = straddled + 600.0                  # inside-1
    if owner is None:
        expected += 600.0 + 600.0 + 600.0 + 300.0  # shared-2's two runs, alice-own, resumed-3's run in the range
    print(owner, "total_training_seconds:", body["total_training_seconds"], "expected:", expected)
    assert body["total_training_seconds"] == pytest.approx(expected, abs=0.01)


def test_an_owners_trends_count_the_jobs_of_the_owners_rows(backfilled):
    """shared-2 ran under alice, then was resumed under bob: in neither owner's rows, its alice run was in alice's
    trends (running from 50 to 40 minutes ago, its 30,000 samples in her throughput)."""
    backend, written = backfilled
    step = 60.0
    alice = summary_of(backend, "alice", step="60s")
    bob = summary_of(backend, "bob", step="60s")
    print("alice rows:", alice["total_jobs"], "bob rows:", bob["total_jobs"])
    assert (alice["total_jobs"], bob["total_jobs"]) == (1, 0)       # alice-own; shared-2 is neither's
    running = alice["resource_trends"]["series"]["running_jobs"]["points"]
    seen_running = [t for t, v in running if v]
    print("alice running from", min(seen_running) - written, "to", max(seen_running) - written)
    # Only alice-own's run (each point covers the step before it).
    assert all(written - 1200 <= t <= written - 600 + step for t in seen_running), seen_running
    throughput = alice["resource_trends"]["series"]["samples_per_second"]["points"]
    gridded = [(t, v) for t, v in throughput if round(t * 1000) % 60000 == 0]    # (not the point at now)
    assert sum(v * step for _, v in gridded) == pytest.approx(30000, rel=1e-3)
    for name in ("running_jobs", "samples_per_second"):
        assert bob["resource_trends"]["series"][name]["peak"] == 0, name


def listed(backend, **params) -> dict[str, str]:
    """The job list's rows over the last hour with `params`: status by job id."""
    with serve(Settings(prometheus_url=backend.url, recorded_series=False)) as client:
        response = client.get("/api/training/analytics/jobs", params={"range": "1h", **params})
        assert response.status_code == 200, response.text
        return {row["job_id"]: row["status"] for row in response.json()["jobs"]}


def test_since_and_until_keep_only_the_jobs_that_ran_between_them(backfilled):
    """A job that never ran (waiting-1 in the queue, dropped-1 cancelled there) passed `since` (its end, or now,
    was after it) and failed `until` (no start): over the same hour, `since` alone listed both, `until` alone
    neither, where the docs keep the jobs that ran between them."""
    backend, written = backfilled
    everyone = listed(backend)
    print("listed:", everyone)
    assert (everyone["waiting-1"], everyone["dropped-1"]) == ("queued", "cancelled")
    ran = {"straddled-1", "inside-1", "shared-2", "alice-own", "resumed-3"}
    since, until = written - 3600, written + 60
    assert set(listed(backend, since=f"{since:.3f}")) == ran
    assert set(listed(backend, until=f"{until:.3f}")) == ran
    assert set(listed(backend, since=f"{since:.3f}", until=f"{until:.3f}")) == ran


def test_since_and_until_leave_out_a_job_paused_throughout_them(backfilled):
    """shared-2 ran from 50 to 40 minutes ago, was paused, and ran again from 33 to 23 minutes ago: between 38 and 35
    minutes ago it ran at no time. Its first start and last end enclose that span, and the list kept it, where the
    docs keep the jobs that ran at some time between since and until. Its runs either side of the pause still
    count."""
    backend, written = backfilled
    paused = listed(backend, since=f"{written - 2300:.3f}", until=f"{written - 2100:.3f}")
    print("listed while shared-2 was paused:", paused)
    assert "shared-2" not in paused
    assert "shared-2" in listed(backend, since=f"{written - 2500:.3f}", until=f"{written - 2450:.3f}")
    assert "shared-2" in listed(backend, since=f"{written - 2100:.3f}", until=f"{written - 1900:.3f}")
