"""The alert rules as vmalert evaluates them over the central VictoriaMetrics (docs/scaling.md: the rules in
deploy/prometheus/rules run there as they are): each expression asked of a real VictoriaMetrics holding
samples written with their timestamps, as vmalert asks it at each evaluation."""

import json
import subprocess
import time
import urllib.request

import pytest

from tests.deploy.test_prometheus_config import PROMETHEUS_DIR, alert_rules
from trainmetrics.prometheus_process import VictoriaMetricsServer, free_port

MINUTE = 60


def lines(series: str, values: list[tuple[float, float]]) -> list[str]:
    return [f"{series} {value} {int(at * 1000)}" for at, value in values]


def every(start: float, stop: float, value, step: float = 5.0) -> list[tuple[float, float]]:
    """(time, value) every `step` seconds in [start, stop); value may be a function of the time."""
    points, at = [], start
    while at < stop:
        points.append((at, value(at) if callable(value) else value))
        at += step
    return points


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """VictoriaMetrics holding the last 30 minutes (to `now`) of the scenarios below."""
    now = float(int(time.time()) // 60 * 60)
    t0 = now - 30 * MINUTE
    data = []
    # The loss alerts read each process's own counts (from 0 in every process); a resumed process carries the
    # job's counts (trainer_loss_nonfinite_total, trainer_loss_spikes_total) over from its checkpoint.
    # A job whose one NaN interval (minute 5) was in its first run (paused at minute 10), resumed at minute 20
    # by a new process at a new address, which has had no NaN since.
    data += lines('trainer_process_loss_nonfinite_total{job_id="resumed",instance="p1"}',
                  every(t0, t0 + 10 * MINUTE, lambda at: 0 if at < t0 + 5 * MINUTE else 1))
    data += lines('trainer_process_loss_nonfinite_total{job_id="resumed",instance="p2"}',
                  every(t0 + 20 * MINUTE, now, 0))
    data += lines('trainer_loss_finite{job_id="resumed",instance="p2"}', every(t0 + 20 * MINUTE, now, 1))
    # A job whose loss went NaN at minute 25: the alert fires.
    data += lines('trainer_process_loss_nonfinite_total{job_id="diverged",instance="p3"}',
                  every(t0, now, lambda at: 0 if at < t0 + 25 * MINUTE else 1))
    data += lines('trainer_loss_finite{job_id="diverged",instance="p3"}', every(t0, now, 1))
    data += lines('trainer_job_info{job_id="diverged",job_name="diverged",owner="team-a",instance="p3"}',
                  every(t0, now, 1))
    # At one address: a NaN and a spike at minute 2 (the job's counts 2 -> 3), the process killed at minute 20,
    # resumed from an older checkpoint (counts 1) at 21, killed at 24, resumed from the newest (3) at 25: no new
    # one, whatever the job's counts did (3 -> 1 -> 3). The own counts drop to 0 at each resume.
    def reloaded(at):
        return 1 if t0 + 2 * MINUTE <= at < t0 + 20 * MINUTE else 0

    def reloaded_job(at):
        return 2 if at < t0 + 2 * MINUTE else 1 if t0 + 21 * MINUTE <= at < t0 + 24 * MINUTE else 3

    runs = ((t0, t0 + 20 * MINUTE), (t0 + 21 * MINUTE, t0 + 24 * MINUTE), (t0 + 25 * MINUTE, now))
    scraped = [at for start, stop in runs for at, _ in every(start, stop, 0)]
    for own, job in (("trainer_process_loss_nonfinite_total", "trainer_loss_nonfinite_total"),
                     ("trainer_process_loss_spikes_total", "trainer_loss_spikes_total")):
        data += lines(f'{own}{{job_id="reloaded",instance="p4"}}', [(at, reloaded(at)) for at in scraped])
        data += lines(f'{job}{{job_id="reloaded",instance="p4"}}', [(at, reloaded_job(at)) for at in scraped])
    # At one address: a NaN at minute 10, killed at 20, resumed at 22 from a checkpoint after it, a new NaN at 26.
    data += lines('trainer_process_loss_nonfinite_total{job_id="renewed",instance="p5"}',
                  every(t0, t0 + 20 * MINUTE, lambda at: 0 if at < t0 + 10 * MINUTE else 1)
                  + every(t0 + 22 * MINUTE, now, lambda at: 0 if at < t0 + 26 * MINUTE else 1))
    # Loss spikes: two in the first run, a process resumed at minute 27 (at a new address); another job's spike
    # at 28.
    data += lines('trainer_process_loss_spikes_total{job_id="resumed",instance="p1"}',
                  every(t0, t0 + 10 * MINUTE, lambda at: 0 if at < t0 + 3 * MINUTE else 2))
    data += lines('trainer_process_loss_spikes_total{job_id="resumed",instance="p2"}', every(t0 + 27 * MINUTE, now, 0))
    data += lines('trainer_process_loss_spikes_total{job_id="spiked",instance="p3"}',
                  every(t0, now, lambda at: 0 if at < t0 + 28 * MINUTE else 1))
    # A GPU with 3 uncorrected ECC errors since its driver loaded (days ago), its exporter restarted at minute
    # 25 (a new series); another GPU counts a new XID at minute 28.
    data += lines('hw_gpu_errors_total{instance="n1:9105",gpu="0",uuid="GPU-a",type="ecc_uncorrected"}',
                  every(t0 + 25 * MINUTE, now, 3))
    data += lines('hw_gpu_errors_total{instance="n1:9105",gpu="1",uuid="GPU-b",type="xid"}',
                  every(t0, now, lambda at: 0 if at < t0 + 28 * MINUTE else 1))
    # GPU-b runs two jobs of team-a (one of them the job above): its alert names both, and their owner.
    for job_id in ("gpu-z", "diverged"):
        data += lines(f'hw_gpu_job_info{{instance="n1:9105",gpu="1",uuid="GPU-b",job_id="{job_id}"}}',
                      every(t0, now, 1))
    data += lines('trainer_job_info{job_id="gpu-z",job_name="gpu-z",owner="team-a",instance="p6"}', every(t0, now, 1))
    victoria = VictoriaMetricsServer(tmp_path_factory.mktemp("victoria")).start()
    try:
        request = urllib.request.Request(f"{victoria.url}/api/v1/import/prometheus", data="\n".join(data).encode(),
                                         method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        urllib.request.urlopen(f"{victoria.url}/internal/force_flush", timeout=10).close()
        series = str(len({line.rsplit(" ", 2)[0] for line in data}))
        victoria.wait_for("count(last_over_time({__name__=~\"trainer_.*|hw_gpu_.*\"}[1h]))",
                          predicate=lambda result: result and result[0]["value"][1] == series)
        yield victoria, now
    finally:
        victoria.stop()


def firing(victoria: VictoriaMetricsServer, alert: str, at: float) -> list[dict]:
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == alert]
    return [sample["metric"] for sample in victoria.query(rule["expr"], at)]


def test_a_resumed_jobs_carried_nan_count_does_not_fire_again(store):
    """VictoriaMetrics' increase() takes a new series' first value for its increase when it is small: the
    resumed process's carried count (1) read as a new NaN, and TrainerLossNaN (critical) fired again for 15
    minutes after every resume of a job that ever had one. The rule reads each process's own count (0 at its
    start): resumes at a new address or at the same one (the job's count 3 -> 1 -> 3) are no new NaN, a new
    NaN after a resume at the same address is."""
    victoria, now = store
    assert sorted(firing(victoria, "TrainerLossNaN", now), key=str) == [{"job_id": "diverged"}, {"job_id": "renewed"}]


def test_a_resumed_jobs_carried_spike_count_does_not_fire_again(store):
    victoria, now = store
    assert firing(victoria, "TrainerLossSpike", now) == [{"job_id": "spiked"}]


def test_an_exporter_restart_does_not_report_a_gpus_old_errors_as_new(store):
    victoria, now = store
    assert [labels["type"] for labels in firing(victoria, "GPUErrors", now)] == ["xid"]


def test_vmalert_runs_the_rules_as_they_are_and_gives_job_alerts_their_owner(store):
    """The rule files loaded by a real vmalert over the central store: the owner label's template (a `query` of
    trainer_job_info) is vmalert's too; a job whose info names no owner has an empty one; a GPU alert names the
    GPU's jobs, sorted, and their owner. (Its notifications and recorded series go to closed ports: the store
    stays as the other tests read it.)"""
    victoria, _ = store
    port = free_port()
    vmalert = subprocess.Popen(
        ["vmalert", f"-rule={PROMETHEUS_DIR / 'rules' / 'trainmetrics.rules.yml'}",
         f"-rule={PROMETHEUS_DIR / 'rules' / 'alerts.yml'}", f"-datasource.url={victoria.url}",
         f"-notifier.url=http://127.0.0.1:{free_port()}", f"-remoteWrite.url=http://127.0.0.1:{free_port()}",
         f"-httpListenAddr=127.0.0.1:{port}", "-evaluationInterval=1s", "-loggerLevel=FATAL"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    owners, gpu = {}, []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(owners) < 2 or not gpu) and vmalert.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5) as answer:
                    # (null until its first evaluation: a TypeError that failed the test under load)
                    alerts = json.load(answer)["data"]["alerts"] or []
            except OSError:
                alerts = []
            owners = {alert["labels"]["job_id"]: alert["labels"].get("owner", "") for alert in alerts
                      if alert["labels"]["alertname"] == "TrainerLossNaN"}
            gpu = [(alert["labels"].get("owner"), alert["annotations"]["jobs"]) for alert in alerts
                   if alert["labels"]["alertname"] == "GPUErrors"]
            time.sleep(0.5)
    finally:
        vmalert.terminate()
        _, errors = vmalert.communicate(timeout=10)
    assert owners == {"diverged": "team-a", "renewed": ""}, errors[-2000:]       # (errors: the rules refused)
    assert gpu == [("team-a", "diverged, gpu-z")], errors[-2000:]
