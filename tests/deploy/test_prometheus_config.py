"""The deployable Prometheus configuration, rules and alert tests pass promtool."""

import subprocess
from pathlib import Path

import pytest
import yaml

from trainmetrics.prometheus_process import find_binary

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([find_binary("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_config_is_valid():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_interval_is_250ms_with_timeouts_under_it():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "250ms"
    assert config["global"]["scrape_timeout"] == "200ms"
    assert {job["job_name"] for job in config["scrape_configs"]} >= {"trainer", "exporter"}


@pytest.mark.parametrize("rules", sorted(p.name for p in (PROMETHEUS_DIR / "rules").glob("*.yml")))
def test_rules_are_valid(rules):
    result = promtool("check", "rules", f"rules/{rules}")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("tests", sorted(p.name for p in (PROMETHEUS_DIR / "tests").glob("*_test.yml")))
def test_rule_unit_tests_pass(tests):
    result = promtool("test", "rules", f"tests/{tests}")
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "rules" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_is_complete_documented_and_tested():
    tests = "".join(path.read_text() for path in (PROMETHEUS_DIR / "tests").glob("alerts*_test.yml"))
    runbooks = (DOCS / "alerts.md").read_text()
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)) >= 16
    for rule in alert_rules():
        name = rule["alert"]
        assert "for" in rule and rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        assert rule["annotations"]["runbook_url"] == f"docs/alerts.md#{name.lower()}"
        assert f"\n## {name}\n" in runbooks, f"no runbook section for {name}"
        # fires (an expected alert) and stays silent (an empty expectation) somewhere in the tests
        assert f"alertname: {name}\n        exp_alerts: []" in tests, f"{name} has no silent case"
        assert f"alertname: {name}\n        exp_alerts:\n" in tests or \
            f"alertname: {name}\n        exp_alerts: &" in tests, f"{name} has no firing case"


def agents_target_labels(tmp_path: Path, job_name: str) -> list[dict]:
    """The labels of the one target of scrape job `job_name` in two real agents (deploy/prometheus/agent.yml for
    nodes 10.0.0.1 and 10.0.0.2; file_sd reads <tmp_path>/<node>/targets), external labels included."""
    import json
    import time
    import urllib.request

    from trainmetrics.prometheus_process import find_binary, free_port

    agents, identities = [], []
    try:
        for node in ("10.0.0.1", "10.0.0.2"):       # both at once: an agent lists its targets ~5 s after its start
            text = (PROMETHEUS_DIR / "agent.yml").read_text().replace("JOB-SERVER", "127.0.0.1") \
                .replace("CENTRAL", "127.0.0.1").replace("NODE", node) \
                .replace("/var/lib/trainmetrics/targets", str(tmp_path / node / "targets"))
            config = yaml.safe_load(text)
            config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == job_name]
            path = tmp_path / f"{node}.yml"
            path.write_text(yaml.safe_dump(config))
            port = free_port()
            agents.append((config, port, subprocess.Popen(
                [find_binary("prometheus"), "--enable-feature=agent", f"--config.file={path}",
                 f"--storage.agent.path={tmp_path / node / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                 "--log.level=error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        deadline = time.monotonic() + 30
        for config, port, _ in agents:
            targets = []
            while not targets and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2) as answer:
                        targets = json.load(answer)["data"]["activeTargets"]
                except OSError:
                    pass
                if not targets:
                    time.sleep(0.2)
            (target,) = targets
            identities.append({**target["labels"], **(config["global"].get("external_labels") or {})})
    finally:
        for _, _, agent in agents:
            agent.kill()            # nothing of it is kept: no need to wait for its shutdown
            agent.wait(timeout=10)
    return identities


def test_each_nodes_agent_gives_its_exporters_series_labels_of_their_own(tmp_path):
    """Every node's agent scrapes its own exporter on loopback and remote-writes to one store: the series must
    differ by node. They were {instance="127.0.0.1:9105", job="exporter"} on every node (no external label,
    no relabelling), so the central store merged every node's CPU, memory, filesystems and per-job CPU time
    into one series each. Two real agents say what labels their exporter target's series carry."""
    identities = agents_target_labels(tmp_path, "exporter")
    assert identities[0] != identities[1], identities


def test_each_nodes_agent_gives_its_standalone_jobs_targets_labels_of_their_own(tmp_path):
    """A standalone `trainmetrics train --targets-dir` serves /metrics on loopback (its default) and its file_sd
    target says 127.0.0.1:PORT; with a fixed --metrics-listen port (torchrun's local rank 0 on every node) every
    node's target had the same labels, so its `up` and scrape series from every node were one series in the
    central store (TargetDown's `up == 0` read whichever node wrote last). Two real agents, one such target each."""
    import json

    for node in ("10.0.0.1", "10.0.0.2"):
        (tmp_path / node / "targets").mkdir(parents=True)
        (tmp_path / node / "targets" / "llm-8.rank0.json").write_text(
            json.dumps([{"targets": ["127.0.0.1:9400"], "labels": {}}]))
    identities = agents_target_labels(tmp_path, "trainer")
    assert identities[0] != identities[1], identities
    assert identities[0]["instance"] == "10.0.0.1:9400"       # the node's address, as the exporter's: NODE:port


def test_the_job_servers_own_series_reach_the_central_store_from_one_agent(tmp_path):
    """The job server publishes queued and paused jobs, the `failed` of a job whose process was killed and
    JobServerNotStartingJobs on its own /metrics: agent.yml scraped only jobs and exporters, so in the multi-node
    topology none of them reached the central store (those alerts could never fire there). The agent on the job
    server's node scrapes it; every other node's drops it, so its series are written once. promtool says which
    targets each node's agent keeps after relabelling."""
    import json

    kept = {}
    for node in ("10.0.0.1", "10.0.0.2"):           # the job server runs on 10.0.0.1
        path = tmp_path / f"{node}.yml"
        path.write_text((PROMETHEUS_DIR / "agent.yml").read_text().replace("JOB-SERVER", "10.0.0.1")
                        .replace("CENTRAL", "127.0.0.1").replace("NODE", node))
        # A static target is there at once: the default 30 s wait for discovery results would be waited out.
        result = promtool("check", "service-discovery", "--timeout=2s", str(path), "server")
        assert result.returncode == 0, result.stdout + result.stderr
        kept[node] = [target["labels"] for target in json.loads(result.stdout) if target["labels"]]
    assert [labels["instance"] for labels in kept["10.0.0.1"]] == ["10.0.0.1:8000"], kept
    assert kept["10.0.0.2"] == [], kept


def test_the_job_servers_nodes_agent_keeps_the_local_executors_jobs_and_no_other_agent_does(tmp_path):
    """The local executor runs a job on the job server's node with its /metrics on loopback, and the job reports
    127.0.0.1:PORT to the job server's http_sd. agent.yml kept only targets at NODE:PORT, so every node's agent
    dropped such a job: in the multi-node topology a local job was never scraped (it waited out its first
    scrape and trained unseen). The job server's node's agent keeps it, named by the node's address; another
    node's (whose loopback is not that job's) drops it; a job at another node's address stays that node's.
    promtool reads what a job server's discovery answers (its shape, jobs.py's discovery()) and says which
    targets each agent keeps."""
    import json

    from tests.deploy.test_dashboards import serve_page

    answer = json.dumps([{"targets": [address], "labels": {"__scheme__": "http", "__meta_trainmetrics_job_id": job,
                                                           "__meta_trainmetrics_rank": "0"}}
                         for address, job in (("127.0.0.1:41234", "local-1"), ("10.0.0.2:41235", "ray-1"))])
    server = serve_page(answer, "application/json")
    kept = {}
    try:
        for node in ("10.0.0.1", "10.0.0.2"):           # the job server runs on 10.0.0.1
            path = tmp_path / f"{node}.yml"
            path.write_text((PROMETHEUS_DIR / "agent.yml").read_text()
                            .replace("http://JOB-SERVER:8000", f"http://127.0.0.1:{server.server_port}")
                            .replace("JOB-SERVER", "10.0.0.1").replace("CENTRAL", "127.0.0.1").replace("NODE", node))
            result = promtool("check", "service-discovery", "--timeout=3s", str(path), "trainer-jobs")
            assert result.returncode == 0, result.stdout + result.stderr
            kept[node] = sorted((target["labels"]["__address__"], target["labels"]["instance"])
                                for target in json.loads(result.stdout) if target["labels"])
    finally:
        server.shutdown()
        server.server_close()
    assert kept == {"10.0.0.1": [("127.0.0.1:41234", "10.0.0.1:41234")],
                    "10.0.0.2": [("10.0.0.2:41235", "10.0.0.2:41235")]}, kept
