"""The job list and summary against each job's own analytics, on backfilled history (promtool) read raw: the same
owner scoping, the same metadata and final loss, on Prometheus and VictoriaMetrics alike."""

import time

import pytest

from trainmetrics.analytics.app import Settings

from .conftest import as_openmetrics, backfilled_backend, backfilled_prometheus, running, serve

pytestmark = pytest.mark.slow

STATES = ("queued", "running", "paused", "completed", "failed", "cancelled")


def process(job_id, instance, start, end, final, info, rank="0", samples_from=0, checkpoints_from=0, loss=True,
            diverged=False):
    base = f'job_id="{job_id}",instance="{instance}",job="trainer",rank="{rank}"'
    labels = ",".join(f'{k}="{v}"' for k, v in info.items())
    times = [start + i * 10.0 for i in range(int((end - start) / 10) + 1)]
    lines = []
    for t in times:
        progress = t - start
        last = final is not None and t == times[-1]
        lines += [f"trainer_job_info{{{base},{labels}}} 1 {t:.3f}",
                  f"trainer_process_start_timestamp_seconds{{{base}}} {start - 5:.3f} {t:.3f}",
                  f"trainer_job_start_timestamp_seconds{{{base}}} {start:.3f} {t:.3f}",
                  f"trainer_samples_total{{{base}}} {samples_from + int(50 * progress)} {t:.3f}",
                  f"trainer_checkpoints_total{{{base}}} {checkpoints_from} {t:.3f}",
                  f"trainer_heartbeat_timestamp_seconds{{{base}}} {t:.3f} {t:.3f}"]
        if loss:
            lines.append(f"trainer_loss{{{base}}} {2.0 / (1 + progress / 60):.9f} {t:.3f}")
            lines.append(f"trainer_loss_finite{{{base}}} {int(not (diverged and last))} {t:.3f}")
        lines += [f'trainer_job_state{{{base},state="{s}"}} {int(s == (final if last else "running"))} {t:.3f}'
                  for s in STATES]
        if last:
            lines.append(f"trainer_job_end_timestamp_seconds{{{base}}} {end:.3f} {t:.3f}")
    return lines


def failed_in_restore(job_id: str, instance: str, began: float, info: dict) -> list[str]:
    """A resumed process that failed in its restore: its info, its process start, heartbeats and state (queued)
    for a minute from `began`, then failed with its end; no start of training, no loss."""
    died = f'job_id="{job_id}",instance="{instance}",job="trainer",rank="0"'
    labels = ",".join(f'{k}="{v}"' for k, v in info.items())
    lines = []
    for index, t in enumerate(began + i * 10.0 for i in range(7)):
        lines += [f"trainer_job_info{{{died},{labels}}} 1 {t:.3f}",
                  f"trainer_process_start_timestamp_seconds{{{died}}} {began - 5:.3f} {t:.3f}",
                  f"trainer_heartbeat_timestamp_seconds{{{died}}} {t:.3f} {t:.3f}"]
        lines += [f'trainer_job_state{{{died},state="{s}"}} {int(s == ("failed" if index == 6 else "queued"))} {t:.3f}'
                  for s in STATES]
        if index == 6:
            lines.append(f"trainer_job_end_timestamp_seconds{{{died}}} {t:.3f} {t:.3f}")
    return lines


def history(now):
    lines = []
    info = dict(job_name="x", model="mlp", dataset="blobs", device="cpu")
    # Paused by alice, resumed (same id) by a process that says owner bob.
    lines += process("shared-1", "h:1", now - 3000, now - 2400, "paused", {**info, "owner": "alice"})
    lines += process("shared-1", "h:2", now - 2000, now - 1400, "completed", {**info, "owner": "bob"},
                     samples_from=30000)
    # Resumed under a new name: the newest process (h:1) says "new-name", the older one (h:9) "old-name".
    lines += process("renamed-1", "h:9", now - 3000, now - 2400, "paused", {**info, "job_name": "old-name",
                                                                          "owner": "carol"})
    lines += process("renamed-1", "h:1", now - 2000, now - 1400, "completed", {**info, "job_name": "new-name",
                                                                             "owner": "carol"}, samples_from=30000)
    # Paused, then resumed by a process that failed in its restore (its info, state and end; no start, no loss):
    # the paused run's loss is the job's last.
    lines += process("restore-died", "h:3", now - 3000, now - 2400, "paused", {**info, "owner": "erin"})
    lines += failed_in_restore("restore-died", "h:4", now - 2300, {**info, "owner": "erin"})
    # Renamed when resumed, paused again, then cancelled while paused: the job server's entry (no metadata) is its
    # newest; its newest process's name is the job's, in both views ("a-old" came first in answers).
    lines += process("renamed-2", "h:10", now - 3000, now - 2800, "paused", {**info, "job_name": "a-old",
                                                                           "owner": "erin"})
    lines += process("renamed-2", "h:11", now - 2700, now - 2500, "paused", {**info, "job_name": "b-new",
                                                                           "owner": "erin"}, samples_from=10000)
    server = 'job_id="renamed-2",instance="server:8000",job="server"'
    for t in (now - 2490 + i * 10.0 for i in range(60)):
        current = "cancelled" if t >= now - 2000 else "paused"
        lines += [f'trainer_job_state{{{server},state="{s}"}} {int(s == current)} {t:.3f}' for s in STATES]
        # (The job server's metadata of the job, its name and owner: a trainer's, where there is one, speak for it.)
        lines.append(f'trainer_job_info{{{server},job_name="c-server",owner="erin"}} 1 {t:.3f}')
        if current == "cancelled":
            lines.append(f"trainer_job_end_timestamp_seconds{{{server}}} {now - 2000:.3f} {t:.3f}")
    # Resumed after a pause, its last logged loss NaN: the job's final loss is none, not the paused run's.
    lines += process("diverged-1", "h:6", now - 3000, now - 2400, "paused", {**info, "owner": "erin"})
    lines += process("diverged-1", "h:7", now - 2000, now - 1400, "failed", {**info, "owner": "erin"},
                     samples_from=30000, diverged=True)
    # The job server's own series for alice's job waiting in its queue (jobserver/app.py WaitingJobsCollector:
    # its state, submission, name and owner).
    server = 'job_id="alice-q",instance="server:8000",job="server"'
    for t in (now - 1200 + i * 10.0 for i in range(121)):
        lines += [f'trainer_job_state{{{server},state="{s}"}} {int(s == "queued")} {t:.3f}' for s in STATES]
        lines.append(f'trainer_job_info{{{server},job_name="alice-q",owner="alice"}} 1 {t:.3f}')
        lines.append(f"trainer_job_submitted_timestamp_seconds{{{server}}} {now - 1200:.3f} {t:.3f}")
    # Paused (its trainer's process ended "paused"), then cancelled while paused: the job server publishes the
    # job's state (paused, then cancelled) and, once cancelled, the end no process published.
    lines += process("pc-1", "h:5", now - 3000, now - 2400, "paused", {**info, "owner": "dave"})
    server = 'job_id="pc-1",instance="server:8000",job="server"'
    for t in (now - 2390 + i * 10.0 for i in range(60)):
        current = "cancelled" if t >= now - 1900 else "paused"
        lines += [f'trainer_job_state{{{server},state="{s}"}} {int(s == current)} {t:.3f}' for s in STATES]
        lines.append(f"trainer_job_submitted_timestamp_seconds{{{server}}} {now - 3100:.3f} {t:.3f}")
        if current == "cancelled":
            lines.append(f"trainer_job_end_timestamp_seconds{{{server}}} {now - 1900:.3f} {t:.3f}")
    # Paused long before the lists' 2-hour range (which begins about 6600 s before `now`), resumed within it: its
    # resumed process carries the first run's 60,000 samples and 3 checkpoints on.
    lines += process("a-resumed", "h:12", now - 9000, now - 7800, "paused", {**info, "owner": "erin"})
    lines += process("a-resumed", "h:13", now - 1800, now - 1200, "completed", {**info, "owner": "erin"},
                     samples_from=60000, checkpoints_from=3)
    return as_openmetrics(lines)


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    with running(backfilled_prometheus(tmp_path_factory.mktemp("fleet-agrees"), history(time.time() - 600))) as server:
        yield server


def get(client, path, **params):
    response = client.get(path, params=params)
    return response.status_code, response.json()


def served_as(backend, owner: str):
    """The analytics over `backend`, scoped to `owner`'s jobs."""
    return serve(Settings(prometheus_url=backend.url, recorded_series=False, owner_scope=lambda request: owner))


def test_owner_scoping_of_the_job_list_matches_the_jobs_own(backfilled):
    seen = {}
    for owner in ("alice", "bob"):
        with served_as(backfilled, owner) as client:
            code, _ = get(client, "/api/training/shared-1/analytics")
            _, listed = get(client, "/api/training/analytics/jobs", range="2h")
            _, summary = get(client, "/api/training/analytics/summary", range="2h")
            rows = [row for row in listed["jobs"] if row["job_id"] == "shared-1"]
            seen[owner] = (code, rows, summary["total_jobs"], [r["job_id"] for r in summary["top_performing_jobs"]])
            print(owner, "analytics:", code, "| job list:", rows, "| summary total_jobs:", summary["total_jobs"],
                  "top:", seen[owner][3])
    for owner, (code, rows, _, top) in seen.items():
        if code == 404:          # not the owner's job: nor in the owner's list or summary
            assert rows == [] and "shared-1" not in top, owner


def test_a_queued_job_is_its_owners_alone(backfilled):
    """The job server's entry of a queued job names its owner: the job was no one's (not in its owner's list,
    its analytics a 404 to its owner) until a process of it ran."""
    seen = {}
    for owner in ("alice", "bob"):
        with served_as(backfilled, owner) as client:
            code, body = get(client, "/api/training/alice-q/analytics")
            _, listed = get(client, "/api/training/analytics/jobs", range="2h")
            seen[owner] = (code, body.get("status"), [(r["job_id"], r["status"], r["owner"]) for r in listed["jobs"]
                                                      if r["job_id"] == "alice-q"])
    assert seen == {"alice": (200, "queued", [("alice-q", "queued", "alice")]), "bob": (404, None, [])}


def three_views(backfilled, job_id: str) -> tuple[dict, dict, dict]:
    """The job's own analytics, its job list row and its summary's top-jobs row."""
    with serve(Settings(prometheus_url=backfilled.url, recorded_series=False)) as client:
        _, body = get(client, f"/api/training/{job_id}/analytics")
        _, listed = get(client, "/api/training/analytics/jobs", range="2h")
        _, summary = get(client, "/api/training/analytics/summary", range="2h")
    return (body, next(r for r in listed["jobs"] if r["job_id"] == job_id),
            next(r for r in summary["top_performing_jobs"] if r["job_id"] == job_id))


def test_job_list_and_summary_metadata_are_the_newest_process_s(backfilled):
    body, row, top = three_views(backfilled, "renamed-1")
    print("analytics:", body["job_name"], "| job list:", row["job_name"], "| summary top:", top["job_name"])
    assert row["job_name"] == top["job_name"] == body["job_name"]
    # The job server's entry, newest (it cancelled the job while paused), names the job too: its trainer's
    # newest process speaks for it.
    body, row, top = three_views(backfilled, "renamed-2")
    print("renamed-2 analytics:", body["job_name"], "| job list:", row["job_name"], "| summary top:", top["job_name"])
    assert row["job_name"] == top["job_name"] == body["job_name"] == "b-new"


@pytest.fixture(scope="module")
def victoria(backfilled, tmp_path_factory):
    """The same history imported into a VictoriaMetrics (Prometheus text format, millisecond timestamps)."""
    history = next(backfilled.workdir.parent.glob("history.om")).read_text()
    with backfilled_backend("victoria", tmp_path_factory.mktemp("review-vm"), history) as server:
        yield server


def test_both_backends_list_the_same_jobs(backfilled, victoria):
    answers = {}
    for name, backend in (("prometheus", backfilled), ("victoria", victoria)):
        with serve(Settings(prometheus_url=backend.url, recorded_series=False)) as client:
            _, listed = get(client, "/api/training/analytics/jobs", range="2h")
            answers[name] = {row["job_id"]: row for row in listed["jobs"]}
            for job_id in answers[name]:
                code, body = get(client, f"/api/training/{job_id}/analytics")
                answers[name][job_id]["own"] = (code, body.get("job_name"), body.get("status"),
                                                (body.get("performance") or {}).get("total_samples"))
    for job_id in sorted(set(answers["prometheus"]) | set(answers["victoria"])):
        p, v = answers["prometheus"].get(job_id), answers["victoria"].get(job_id)
        print(job_id, "\n  P:", p, "\n  V:", v)
    assert answers["prometheus"] == answers["victoria"]


def test_a_job_cancelled_while_paused_has_its_final_loss_in_the_list(backfilled):
    body, row, top = three_views(backfilled, "pc-1")
    print("analytics:", body["status"], body["losses"]["final"], "| job list:", row["status"], row["final_loss"],
          "| summary top:", top["status"], top["final_loss"])
    assert row["status"] == body["status"] == "cancelled"
    assert row["final_loss"] == top["final_loss"] == body["losses"]["final"] is not None


def test_a_resumed_job_whose_first_run_ended_before_the_range_is_told_whole(backfilled):
    """a-resumed ran 20 minutes long before the range and 10 within it: its rows took their times from the run in
    the range and its samples from the whole job (the resumed process carries them on), 150 samples/s where it
    trained at 50, and it topped the summary's ranking. Its rows give the job's own figures."""
    body, row, top = three_views(backfilled, "a-resumed")
    duration, performance = body["duration"], body["performance"]
    own = {"start_time": body["start_time"], "duration_seconds": duration["total_seconds"],
           "paused_seconds": duration["paused_seconds"], "training_seconds": duration["training_seconds"],
           "total_samples": performance["total_samples"],
           "average_samples_per_second": performance["average_samples_per_second"]}
    print("analytics:", own, "\n job list:", row, "\n summary top:", top)
    assert own["training_seconds"] == 1800.0 and own["average_samples_per_second"] == 50.0
    assert {key: row[key] for key in own} == own
    assert {key: top[key] for key in own if key != "start_time"} == {k: v for k, v in own.items() if k != "start_time"}


def test_every_row_tells_its_job_as_the_jobs_own_analytics_do(backfilled):
    """Metadata, status and final loss: a job resumed by a process that failed in its restore (no loss: the list
    had none), one whose last loss was NaN, one renamed and cancelled while paused."""
    keys = {"status": "status", "job_name": "job_name", "final_loss": None, "total_samples": None}
    with serve(Settings(prometheus_url=backfilled.url, recorded_series=False)) as client:
        _, listed = get(client, "/api/training/analytics/jobs", range="2h")
        for row in listed["jobs"]:
            code, body = get(client, f"/api/training/{row['job_id']}/analytics")
            if code != 200:
                continue
            own = {"status": body["status"], "job_name": body["job_name"], "final_loss": body["losses"]["final"],
                   "total_samples": body["performance"]["total_samples"]}
            assert {key: row[key] for key in keys} == own, row["job_id"]
    by_id = {row["job_id"]: row for row in listed["jobs"]}
    assert by_id["restore-died"]["final_loss"] is not None and by_id["diverged-1"]["final_loss"] is None
    assert by_id["renamed-2"]["job_name"] == "b-new"


def restore_died_history(now):
    """Paused, then resumed by hand under a new name by a process that failed in its restore (its info, state and
    end; no start of training, no loss): the failed process is the job's newest, a trainer's all the same."""
    info = dict(model="mlp", dataset="blobs", device="cpu", owner="frank")
    lines = process("restore-renamed", "h:20", now - 3000, now - 2400, "paused", {**info, "job_name": "first-name"})
    lines += failed_in_restore("restore-renamed", "h:21", now - 2300, {**info, "job_name": "second-name"})
    return as_openmetrics(lines)


def test_the_job_list_names_a_job_as_its_newest_process_that_failed_in_its_restore(tmp_path):
    """The job list took a process with an end and no start (one that failed in its restore) for the job
    server's entry, and let the run before it speak for the job (lookup.speakers): its old name, where the job's
    own analytics give the new one."""
    with running(backfilled_prometheus(tmp_path, restore_died_history(time.time() - 600))) as prometheus, \
            serve(Settings(prometheus_url=prometheus.url, recorded_series=False)) as client:
        _, body = get(client, "/api/training/restore-renamed/analytics")
        _, listed = get(client, "/api/training/analytics/jobs", range="2h")
    row = next(r for r in listed["jobs"] if r["job_id"] == "restore-renamed")
    assert (body["status"], row["status"]) == ("failed", "failed")
    assert body["job_name"] == row["job_name"] == "second-name", (body["job_name"], row["job_name"])
