"""A real Alertmanager receives a firing alert from a real Prometheus running the deployable rules."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainmetrics.trainer.metrics import JobInfo, JobMetrics
from trainmetrics.trainer.telemetry import Publish
from trainmetrics.prometheus_process import AlertmanagerServer, PrometheusServer


class Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def alertmanager(tmp_path):
    webhook = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    server = AlertmanagerServer(tmp_path / "alertmanager", webhook=f"http://127.0.0.1:{webhook.server_port}/alerts")
    server.start()
    Webhook.received = []
    yield server.address
    server.stop()
    webhook.shutdown()
    webhook.server_close()


def test_failed_job_alert_reaches_alertmanager(alertmanager, tmp_path):
    prometheus = PrometheusServer(tmp_path / "prometheus", alertmanagers=[alertmanager]).start()
    try:
        metrics = JobMetrics("am-failing-job", JobInfo(owner="team-a"),
                             publish=Publish(targets_dir=prometheus.targets_dir, linger_timeout=20))
        metrics.start()
        metrics.finish("failed", MemoryError())
        metrics.close()                          # returns once Prometheus has scraped the failed state
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not Webhook.received:
            time.sleep(0.5)
    finally:
        prometheus.stop()
    assert Webhook.received, "no notification reached the webhook"
    alerts = [alert for message in Webhook.received for alert in message["alerts"]]
    fired = [a for a in alerts if a["labels"]["alertname"] == "TrainerJobFailed"]
    assert fired and fired[0]["status"] == "firing"
    assert fired[0]["labels"]["job_id"] == "am-failing-job"
    assert fired[0]["labels"]["owner"] == "team-a"      # from trainer_job_info: an owner's own route can take it
    assert fired[0]["annotations"]["summary"] == "Training job am-failing-job failed"


def test_an_alert_of_a_job_id_two_owners_share_reaches_neither_owners_route(alertmanager, tmp_path):
    """Owners apart: a job id is no owner's own (a standalone `trainmetrics train --job-id X --owner B` may take
    another's, as may a second job server), and the alert's `owner` was the first of the job id's owners in
    trainer_job_info: one owner's alert, or one summing both jobs, went to the other owner's receiver. An alert
    whose job id has two owners goes to neither's route (the default receiver); a job of one owner to its."""
    import urllib.request

    import yaml

    config_path = next((tmp_path / "alertmanager").glob("*.yml"))      # the config the fixture started it with
    config = yaml.safe_load(config_path.read_text())
    webhook = config["receivers"][0]["webhook_configs"][0]["url"]
    for owner in ("alice", "bob"):       # a route per owner, as deploy/alertmanager/alertmanager.yml shows
        config["route"]["routes"].insert(0, {"matchers": [f'owner="{owner}"'], "receiver": owner})
        config["receivers"].append({"name": owner, "webhook_configs": [{"url": webhook}]})
    config_path.write_text(yaml.safe_dump(config))
    urllib.request.urlopen(urllib.request.Request(f"http://{alertmanager}/-/reload", method="POST"), timeout=10)

    other_dir = tmp_path / "other-targets"           # another host's (or user's) targets: the same job id there
    prometheus = PrometheusServer(tmp_path / "prometheus", alertmanagers=[alertmanager],
                                  extra_target_dirs=[other_dir]).start()
    try:
        jobs = [JobMetrics(job_id, JobInfo(owner=owner), publish=Publish(targets_dir=targets, linger_timeout=20))
                for job_id, owner, targets in (("shared-job", "alice", prometheus.targets_dir),
                                               ("shared-job", "bob", other_dir),
                                               ("alice-job", "alice", prometheus.targets_dir))]
        for metrics in jobs:
            metrics.start()                          # returns once Prometheus scraped it: both owners are known
        for metrics in jobs:
            metrics.finish("failed", MemoryError())
        for metrics in jobs:
            metrics.close()

        def receivers() -> dict[str, set[str]]:
            found: dict[str, set[str]] = {}
            for message in Webhook.received:
                for alert in message["alerts"]:
                    if alert["labels"]["alertname"] == "TrainerJobFailed":
                        found.setdefault(alert["labels"]["job_id"], set()).add(message["receiver"])
            return found

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and set(receivers()) != {"shared-job", "alice-job"}:
            time.sleep(0.5)
        time.sleep(2)                                # any other notification of them, had there been one
    finally:
        prometheus.stop()
    assert receivers() == {"alice-job": {"alice"}, "shared-job": {"default"}}


def _post_alerts(alertmanager: str, labels: list[dict[str, str]]) -> None:
    """Fire these alerts in the Alertmanager for the next 5 minutes, as Prometheus would."""
    import datetime
    import urllib.request

    now = datetime.datetime.now(datetime.timezone.utc)
    until = (now + datetime.timedelta(minutes=5)).isoformat()
    alerts = [{"labels": alert, "startsAt": now.isoformat(), "endsAt": until} for alert in labels]
    request = urllib.request.Request(f"http://{alertmanager}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10)


def test_a_hung_jobs_stalled_and_throughput_pages_are_held_back_while_its_hang_pages(alertmanager):
    """A hung job (a deadlocked collective) makes no step: TrainerHang pages at once, and 5 to 10 minutes on its
    TrainerThroughputDropped and TrainerJobStalled (critical too) fired for the same hang, each a page of its
    own, repeated. Nothing inhibited them. They are now held back while the job's TrainerHang fires; another
    job's stall still pages (and TrainerJobStalled alone, an evaluation or checkpoint that hangs, still does)."""
    _post_alerts(alertmanager, [{"alertname": alertname, "job_id": job_id, "severity": severity}
                                for alertname, job_id, severity in (("TrainerHang", "hung", "critical"),
                                                                    ("TrainerJobStalled", "hung", "critical"),
                                                                    ("TrainerThroughputDropped", "hung", "warning"),
                                                                    ("TrainerJobStalled", "other", "critical"))])

    def notified() -> set[tuple[str, str]]:
        return {(alert["labels"]["alertname"], alert["labels"]["job_id"])
                for message in Webhook.received for alert in message["alerts"]}

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not {("TrainerHang", "hung"), ("TrainerJobStalled", "other")} <= notified():
        time.sleep(0.5)
    time.sleep(2)                                    # the held-back ones' groups wait as long (group_wait 1s)
    assert notified() == {("TrainerHang", "hung"), ("TrainerJobStalled", "other")}


def test_a_killed_multi_rank_jobs_dead_targets_page_once_not_once_per_rank(alertmanager):
    """Each rank of a job announces a target of its own (host:port), and TargetDown's `up == 0` arm carries no
    job_id: grouped by `instance` too, a killed 4-rank job paged 4 times (a notification per rank's target, each
    repeated hourly) beside its vanished-job page. The dead targets are now one notification; the vanished job,
    by its job_id, its own."""
    ranks = [{"alertname": "TargetDown", "severity": "critical", "job": "trainer", "instance": f"10.0.0.{rank}:9400"}
             for rank in range(4)]
    vanished = {"alertname": "TargetDown", "severity": "critical", "job_id": "killed", "owner": "team-a"}
    _post_alerts(alertmanager, ranks + [vanished])

    def notifications() -> list[set[str]]:
        return [{alert["labels"].get("instance") or alert["labels"]["job_id"] for alert in message["alerts"]}
                for message in Webhook.received]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(set().union(*notifications())) < 5:
        time.sleep(0.5)
    time.sleep(2)                                    # any further notification of the same alerts (group_wait 1s)
    assert sorted(notifications(), key=len) == [{"killed"}, {rank["instance"] for rank in ranks}]


def test_a_hung_jobs_goodput_and_idle_gpu_alerts_are_held_back_while_its_hang_fires(alertmanager):
    """A job hung in its data wait (a stuck loader, a dead NFS mount: TrainerHang's own examples) spends none of
    its time in steps and leaves its GPUs idle: 10 and about 12 minutes into the hang TrainerGPUUnderutilized and
    TrainerGoodputLow told its owner of the same hang again, which the inhibit rule let through (it held back the
    stall and the throughput drop only). Another job's low goodput still notifies."""
    _post_alerts(alertmanager, [{"alertname": alertname, "job_id": job_id, "severity": severity}
                                for alertname, job_id, severity in (("TrainerHang", "hung", "critical"),
                                                                    ("TrainerGoodputLow", "hung", "warning"),
                                                                    ("TrainerGPUUnderutilized", "hung", "info"),
                                                                    ("TrainerGoodputLow", "other", "warning"))])

    def notified() -> set[tuple[str, str]]:
        return {(alert["labels"]["alertname"], alert["labels"]["job_id"])
                for message in Webhook.received for alert in message["alerts"]}

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not {("TrainerHang", "hung"), ("TrainerGoodputLow", "other")} <= notified():
        time.sleep(0.5)
    time.sleep(2)                                    # the held-back ones' groups wait as long (group_wait 1s)
    assert notified() == {("TrainerHang", "hung"), ("TrainerGoodputLow", "other")}
