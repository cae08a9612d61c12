"""The goodput ledger and stored reports end to end: `trainmetrics server` (job server and analytics) runs real
jobs, a real Prometheus scrapes them, and each phase of the ledger is checked against what the test itself
saw happen: how long a job waited in the queue, was paused, was down after a kill -9, and what that kill
threw away. Then Prometheus loses everything, and the jobs' analytics answer from the stored reports."""

import json
import shutil
import signal
import time

import httpx
import psutil
import pytest

from trainmetrics.contract import STEP_PHASES
from trainmetrics.prometheus_process import PrometheusServer, free_port

from .server_process import Server, wait_job

STEP_SECONDS = 0.02           # each step of the ledger job sleeps this long (slow_compute): steps are countable
CHECKPOINT_EVERY = 50
FAULTS = {"slow_compute": {"job": "gp-ledger", "seconds": STEP_SECONDS}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("goodput")
    port = free_port()
    prometheus = PrometheusServer(tmp / "prometheus", static_targets={"server": [f"127.0.0.1:{port}"]},
                                  job_server=f"http://127.0.0.1:{port}", extra_args=["--web.enable-admin-api"])
    # TRAINMETRICS_TARGETS_DIR set where the server runs (as for CLI jobs on that host): its jobs inherit it,
    # and must still be announced once (through the server's discovery), not also through file_sd.
    server = Server(tmp / "data", extra=("--prometheus-url", prometheus.url),
                    env={"TRAINMETRICS_FAULTS": json.dumps(FAULTS),
                         "TRAINMETRICS_TARGETS_DIR": str(prometheus.targets_dir)})
    server.data_dir.mkdir()
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    prometheus.start()
    try:
        server.start()
        yield server, prometheus
    finally:
        server.stop()
        prometheus.stop()


def state_seen(client, job_id: str, states: tuple[str, ...], timeout: float = 60) -> float:
    """Wait until the job is in one of the states; the time it was first seen so."""
    wait_job(client, job_id, lambda job: job["state"] in states, timeout=timeout)
    return time.time()


def steps(prometheus, job_id: str) -> float:
    found = prometheus.query(f'max(trainer_steps_total{{job_id="{job_id}"}})')
    return float(found[0]["value"][1]) if found else 0.0


def trainer_pid(server, job_id: str) -> int:
    """The job's trainer process: this server's (its arguments name this server's data directory), not one of
    another test run's on the same machine with the same job id."""
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if job_id in command and "train" in command and any(str(server.data_dir) in part for part in command):
            return process.pid
    raise AssertionError(f"no process of {job_id}")


@pytest.fixture(scope="module")
def ledger_run(stack):
    """A job that waits in the queue behind another, is paused for 5 s, is killed with -9 some steps after a
    checkpoint and resumed, then completes; with the times the test saw each of those happen."""
    server, prometheus = stack
    client = server.client()
    seen = {}
    first = client.post("/api/training/jobs", json={"job_id": "gp-first", "dataset": "blobs", "epochs": 2}).json()
    ledger = client.post("/api/training/jobs", json={"job_id": "gp-ledger", "dataset": "blobs", "epochs": 4,
                                                     "log_every": 10, "checkpoint_every": CHECKPOINT_EVERY})
    assert ledger.json()["state"] == "queued", ledger.text
    seen["created"], seen["first_created"] = ledger.json()["created"], first["created"]
    # A third job, cancelled while it waits: no process of its own ever publishes anything.
    waits = client.post("/api/training/jobs", json={"job_id": "gp-waits", "dataset": "blobs", "epochs": 1}).json()
    time.sleep(1)
    cancelled = client.post("/api/training/jobs/gp-waits/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
    seen["waits"] = (waits["created"], cancelled.json()["ended"])
    seen["running1"] = state_seen(client, "gp-ledger", ("running",))

    # Paused for 5 s.
    prometheus.wait_for('trainer_steps_total{job_id="gp-ledger"} >= 20', timeout=60)
    scraped_as = prometheus.query('count by (job) (trainer_steps_total{job_id="gp-ledger"})')
    assert [series["metric"]["job"] for series in scraped_as] == ["trainer-jobs"]     # one scrape job
    seen["pause_sent"] = time.time()
    assert client.post("/api/training/jobs/gp-ledger/pause").status_code == 202
    seen["paused"] = state_seen(client, "gp-ledger", ("paused",))
    time.sleep(5)
    seen["resume_sent"] = time.time()
    assert client.post("/api/training/jobs/gp-ledger/resume").status_code == 200
    seen["running2"] = state_seen(client, "gp-ledger", ("running",))

    # Killed 20 steps after the checkpoint at step 50, long before the next (at 100).
    prometheus.wait_for(f'trainer_steps_total{{job_id="gp-ledger"}} >= {CHECKPOINT_EVERY + 20}', timeout=60)
    checkpoint = max(c["step"] for c in client.get("/api/training/jobs/gp-ledger/checkpoints").json()["checkpoints"])
    assert checkpoint == CHECKPOINT_EVERY
    psutil.Process(trainer_pid(server, "gp-ledger")).send_signal(signal.SIGKILL)
    seen["killed"] = time.time()
    seen["failed"] = state_seen(client, "gp-ledger", ("failed",))
    # The server publishes the end the killed process could not: the analytics say failed, as the job API does
    # (they said `vanished`, Prometheus' last state of the job being the dead process's `running`).
    seen["analytics_after_kill"] = analytics_status(client, "gp-ledger", until="failed")
    try:        # and the deployable rules' TrainerJobFailed fires for it (TargetDown's "vanished" arm did)
        prometheus.wait_for('ALERTS{alertname="TrainerJobFailed",alertstate="firing",job_id="gp-ledger"}', timeout=15)
        seen["failed_alert"] = True
    except TimeoutError:
        seen["failed_alert"] = False
    seen["resume2_sent"] = time.time()
    assert client.post("/api/training/jobs/gp-ledger/resume").status_code == 200
    seen["running3"] = state_seen(client, "gp-ledger", ("running",))
    seen["checkpoint"] = checkpoint
    state_seen(client, "gp-ledger", ("completed",), timeout=120)
    for job_id in ("gp-first", "gp-ledger", "gp-waits"):
        wait_job(client, job_id, lambda job: job["report_stored"], timeout=60)
    return client, seen


def analytics_status(client, job_id: str, until: str, timeout: float = 20) -> str:
    """The job's status in its analytics once it is `until` (or the last one seen when `timeout` passed)."""
    deadline, status = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        answer = client.get(f"/api/training/{job_id}/analytics")
        status = answer.json().get("status") if answer.status_code == 200 else answer.status_code
        if status == until:
            break
        time.sleep(0.5)
    return status


def analytics(client, job_id: str) -> dict:
    answer = client.get(f"/api/training/{job_id}/analytics")
    assert answer.status_code == 200, answer.text
    return answer.json()


def killed_run(prometheus, job_id: str, checkpoint: int) -> dict[str, float]:
    """What the killed process did after the checkpoint it was resumed from, from its raw samples (the killed
    run is the process whose count stopped past the checkpoint short of the job's end): its steps at its last
    scrape, its mean step time from its last scrape at or before the checkpoint's step to its last (and its
    longest step there, to its histogram bucket), and its
    evaluation seconds (it ran from the pause, within the first epoch, to the kill, within the second: its only
    evaluation is the first epoch's, right after the checkpoint at its end, which the resumed run did again)."""
    def raw(metric: str, labels: str = "") -> dict[str, dict[float, float]]:
        found = prometheus.query(f'{metric}{{job_id="{job_id}"{labels}}}[10m]')
        return {s["metric"]["instance"]: {float(t): float(v) for t, v in s["values"]} for s in found}

    steps, sums = raw("trainer_steps_total"), raw("trainer_step_duration_seconds_sum")
    counts = raw("trainer_step_duration_seconds_count")
    evals = raw("trainer_phase_seconds_total", ',phase="eval"')
    killed = next(instance for instance, samples in steps.items() if checkpoint < max(samples.values()) < 200)
    scraped = [t for t in steps[killed] if t in sums[killed] and t in evals[killed]]
    at_checkpoint = max(t for t in scraped if steps[killed][t] <= checkpoint)
    last = max(scraped)
    took = sums[killed][last] - sums[killed][at_checkpoint]
    # The longest of those steps, to its histogram bucket: the smallest bound that holds all of them.
    done = counts[killed][last] - counts[killed][at_checkpoint]
    holding = []
    for series in prometheus.query(f'trainer_step_duration_seconds_bucket{{job_id="{job_id}",instance="{killed}"}}'
                                   "[10m]"):
        values = {float(t): float(v) for t, v in series["values"]}
        if values.get(last, 0.0) - values.get(at_checkpoint, 0.0) >= done:
            holding.append(float(series["metric"]["le"]))
    longest = min(holding)
    return {"steps": steps[killed][last], "step_time": took / done, "longest_step": longest,
            "eval": evals[killed][last] - evals[killed][min(scraped)]}


def phases_thrown_away(prometheus, job_id: str, checkpoint: int) -> dict[str, float]:
    """Per ledger phase (the step's parts as `step`), what the killed process did that the run resumed from its
    checkpoint took over without: its values at its last scrape less the resumed process's at its first (a
    resumed process is first scraped before its first step)."""
    found = prometheus.query(f'trainer_phase_seconds_total{{job_id="{job_id}",rank=~"0|"}}[10m]')
    steps = {s["metric"]["instance"]: [float(v) for _, v in s["values"]]
             for s in prometheus.query(f'trainer_steps_total{{job_id="{job_id}"}}[10m]')}
    killed = next(instance for instance, counts in steps.items() if checkpoint < max(counts) < 200)
    resumed = next(instance for instance, counts in steps.items() if counts[0] == checkpoint and max(counts) == 200)
    thrown: dict[str, float] = {}
    for series in found:
        phase, instance = series["metric"]["phase"], series["metric"]["instance"]
        name = "step" if phase in STEP_PHASES else phase
        if name in ("step", "data_wait", "eval", "checkpoint") and instance in (killed, resumed):
            value = float(series["values"][-1 if instance == killed else 0][1])
            thrown[name] = thrown.get(name, 0.0) + (value if instance == killed else -value)
    return thrown


def test_a_single_runs_phases_add_up_to_its_wall_clock_within_1_percent(ledger_run):
    client, seen = ledger_run
    report = analytics(client, "gp-first")
    goodput = report["goodput"]
    wall = report["end_time"] - seen["first_created"]        # the job server's submission, the trainer's end
    assert sum(goodput["seconds"].values()) == pytest.approx(wall, rel=0.01)
    assert goodput["wall_clock_seconds"] == pytest.approx(wall, rel=0.01)
    assert 0 < goodput["goodput_ratio"] < 1 and goodput["seconds"]["step"] > 0
    assert goodput["seconds"]["paused"] == goodput["seconds"]["lost"] == 0


def test_a_job_cancelled_while_queued_ends_there_all_queued(ledger_run):
    """No process published its end: the job server does. It stayed `queued` to the analytics for good, with
    no ledger, and the fleet's queued time grew with the clock."""
    client, seen = ledger_run
    created, cancelled = seen["waits"]
    report = analytics(client, "gp-waits")
    assert report["status"] == "cancelled" and report["end_time"] == pytest.approx(cancelled, abs=1e-3)
    goodput = report["goodput"]
    assert goodput["wall_clock_seconds"] == pytest.approx(cancelled - created, abs=1e-3) and cancelled - created > 0.9
    assert goodput["seconds"]["queued"] == goodput["wall_clock_seconds"] and goodput["goodput_ratio"] == 0
    listed = client.get("/api/training/analytics/jobs").json()["jobs"]
    assert {job["job_id"]: job["status"] for job in listed}.get("gp-waits") == "cancelled"


def test_queued_paused_and_lost_time_are_what_happened(ledger_run, stack):
    client, seen = ledger_run
    _, prometheus = stack
    first, report = analytics(client, "gp-first"), analytics(client, "gp-ledger")
    seconds = report["goodput"]["seconds"]
    # Queued: it could not start before the first job ended, and it had started when seen running. (Its end is
    # the process's start, read to the kernel's clock ticks: its start tick and the uptime's, 10 ms each. It
    # once read 6 ms past the moment the job server was seen saying `running`.)
    assert first["end_time"] - seen["created"] <= seconds["queued"] <= seen["running1"] - seen["created"] + 0.02
    # Paused: the pause (not running from when it was seen paused until the resume was sent, at most from the
    # pause request until it was seen running again), and the time it was down after the kill.
    pause_low, pause_high = seen["resume_sent"] - seen["paused"], seen["running2"] - seen["pause_sent"]
    down_low, down_high = seen["resume2_sent"] - seen["killed"], seen["running3"] - seen["killed"] + 0.5
    assert pause_low + down_low <= seconds["paused"] <= pause_high + down_high
    assert pause_low >= 5
    # Lost: the steps the killed process took after the checkpoint, each STEP_SECONDS and a little more, and
    # the step it was in at its last scrape. The steps are timed as the killed process's own step-time sums
    # say they went from its last scrape at or before the checkpoint on: a loaded host slows some stretches
    # of a run, so the run's mean step would misjudge these ones.
    killed = killed_run(prometheus, "gp-ledger", seen["checkpoint"])
    thrown_away = (killed["steps"] - seen["checkpoint"]) * killed["step_time"]
    assert thrown_away > 15 * STEP_SECONDS and killed["eval"] > 0
    # (Within one step: the longest after the checkpoint, to its bucket; on a loaded host a step, the one in
    # flight at the last scrape too, can take several times the mean.)
    assert seconds["lost"] == pytest.approx(thrown_away + killed["eval"], abs=killed["longest_step"] + 0.02)
    assert report["performance"]["total_steps"] == 200 and report["status"] == "completed"
    # Between the kill and the resume the job was failed in its analytics as in the job API.
    assert seen["analytics_after_kill"] == "failed" and seen["failed_alert"]


def test_the_fleet_summary_adds_up_the_jobs_phases(ledger_run, stack):
    client, seen = ledger_run
    _, prometheus = stack
    jobs = [analytics(client, job_id)["goodput"]["seconds"] for job_id in ("gp-first", "gp-ledger", "gp-waits")]
    answer = client.get("/api/training/analytics/summary", params={"range": "10m"})
    assert answer.status_code == 200, answer.text
    fleet = answer.json()["goodput"]["seconds"]
    # Each process counts from its first scrape (a job's steps all come after it), and the fleet counts what a
    # kill threw away in its phases (a job's ledger calls it lost): each phase as the killed process had it at
    # its last scrape, less what the resumed one took over at its first. (Taken as an evaluation and the rest
    # steps, the thrown-away data wait, seconds on a loaded host, was missing from the step phase.)
    thrown_away = phases_thrown_away(prometheus, "gp-ledger", seen["checkpoint"])
    # (lost as the ledger has it: the killed run's total less what the next took over, its own life from its
    # start and end timestamps: within a few hundredths of the phases' own figures. Less the killed run's last
    # checkpoint write, which the ledger counts as checkpoint time (the snapshot resumed from was taken before
    # it): 4 ms on a quiet host, 56 ms on a loaded one, where the test had allowed 50.)
    thrown_away_after_write = sum(seconds for phase, seconds in thrown_away.items() if phase != "checkpoint")
    assert thrown_away_after_write == pytest.approx(jobs[1]["lost"], abs=0.03), (thrown_away, jobs[1])
    for phase in ("step", "data_wait", "eval", "checkpoint"):
        # (That last write is checkpoint time in the job's ledger as in the fleet's: counted once, in the jobs'.)
        expected = sum(job[phase] for job in jobs) + (thrown_away.get(phase, 0.0) if phase != "checkpoint" else 0.0)
        assert fleet[phase] == pytest.approx(expected, abs=0.05), (phase, fleet, jobs, thrown_away)
    for phase in ("queued", "paused"):             # exact as the jobs' own ledgers
        assert fleet[phase] == pytest.approx(sum(job[phase] for job in jobs), abs=0.01), (phase, fleet, jobs)
    assert 0 < answer.json()["goodput"]["goodput_ratio"] < 1


def test_a_summary_whose_range_starts_in_a_pause_counts_the_rest_of_it_as_paused(ledger_run):
    """The range starts 2.5 s into gp-ledger's 5 s pause: the wait before its next run in the range was counted
    as queued (a job paused for a day showed a day's queue in a 24-hour summary)."""
    client, seen = ledger_run

    def fleet(since: float) -> tuple[dict, float]:
        """The summary's goodput seconds over the range from `since`, and how long the request took (the range
        is a duration: it starts from the server's now, up to that much later than `since`)."""
        sent = time.time()
        answer = client.get("/api/training/analytics/summary", params={"range": f"{sent - since:.3f}"})
        assert answer.status_code == 200, answer.text
        return answer.json()["goodput"]["seconds"], time.time() - sent

    (whole, _), cut = fleet(seen["created"] - 30), seen["paused"] + 2.5
    in_range, took = fleet(cut)
    assert in_range["queued"] == 0, in_range
    # What the range leaves out of the pause: from the paused process's end (between the pause request and the
    # job API saying paused) to the cut, which the server took up to `took` later (30 ms on a loaded host).
    left_out = whole["paused"] - in_range["paused"]
    assert cut - seen["paused"] - 0.01 <= left_out <= cut - seen["pause_sent"] + took + 0.01


def test_reports_outlive_prometheus_and_a_comparison_names_the_best_goodput(ledger_run, stack):
    client, _ = ledger_run
    _, prometheus = stack
    before = {job_id: analytics(client, job_id) for job_id in ("gp-first", "gp-ledger", "gp-waits")}
    assert {report["source"] for report in before.values()} == {"prometheus"}
    # Retention removes the oldest data first: gp-ledger's first run is gone, and Prometheus still holds the job,
    # less of it than its stored report (its start, pause and queue went with that run): the report answers.
    starts = prometheus.query('trainer_process_start_timestamp_seconds{job_id="gp-ledger"}[1h]')
    first = min(starts, key=lambda series: float(series["values"][0][1]))["metric"]["instance"]
    deleted = httpx.post(f"{prometheus.url}/api/v1/admin/tsdb/delete_series",
                         params={"match[]": f'{{job_id="gp-ledger",instance="{first}"}}'})
    assert deleted.status_code == 204, deleted.text
    partial = analytics(client, "gp-ledger")
    assert partial["source"] == "stored"
    assert {**partial, "source": None, "evaluated_at": None} == {**before["gp-ledger"], "source": None,
                                                                 "evaluated_at": None}
    prometheus.stop()
    # Prometheus down (answered 503 before): the ended jobs answer from their stored reports.
    for job_id, earlier in before.items():
        stored = analytics(client, job_id)
        assert stored["source"] == "stored"
        assert {**stored, "source": None, "evaluated_at": None} == {**earlier, "source": None, "evaluated_at": None}
    assert client.get("/api/training/never-ran/analytics").status_code == 503     # no report: Prometheus' error
    shutil.rmtree(prometheus.data_dir)
    prometheus.start()
    prometheus.wait_for('up{job="server"} == 1', timeout=30)
    for job_id, earlier in before.items():
        stored = analytics(client, job_id)
        # The cancelled job's end is still published by the job server (for a while): read again, the same.
        assert stored["source"] == "stored" or job_id == "gp-waits"
        assert {**stored, "source": None, "evaluated_at": None} == {**earlier, "source": None, "evaluated_at": None}
    compared = client.get("/api/training/analytics/compare", params={"job_ids": "gp-first,gp-ledger,gp-waits"})
    assert compared.status_code == 200, compared.text
    ratios = {row["job_id"]: row["goodput_ratio"] for row in compared.json()["jobs"]}
    assert compared.json()["winner"]["best_goodput"] == max(ratios, key=ratios.get)
    assert client.get("/api/training/never-ran/analytics").status_code == 404
