"""deploy/docker-compose.yml: what can be checked without a Docker engine (none runs on our machines)."""

import tomllib
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_stack_has_every_service_on_the_host_network():
    services = compose()["services"]
    assert set(services) == {"prometheus", "alertmanager", "grafana", "exporter", "analytics"}
    assert all(service["network_mode"] == "host" for service in services.values())
    assert services["exporter"]["pid"] == "host"


def test_grafana_needs_an_admin_password_and_allows_no_anonymous_access():
    env = compose()["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_every_mounted_repo_file_exists():
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name}: {source}"


def test_services_listen_on_loopback_only():
    services = compose()["services"]
    commands = " ".join(" ".join(map(str, s.get("command", []))) for s in services.values())
    assert "0.0.0.0" not in commands
    assert services["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"


def test_the_image_installs_every_part_of_the_package_and_no_torch():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    mapping = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {path.split("/")[0] for path in mapping.values()} <= copied
    commands = [line for line in dockerfile.splitlines() if not line.startswith("#")]
    assert not any("torch" in line for line in commands if "find_spec('torch')" not in line)


def test_no_service_takes_the_job_servers_port_that_prometheus_discovers_jobs_on():
    """prometheus.yml reads the job server's /api/training/sd at 127.0.0.1:8000 (the server runs on the host,
    with torch): the compose analytics held that port, so discovery got 404 and the server could not start."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (sd_job,) = [job for job in config["scrape_configs"] if "http_sd_configs" in job]
    address = sd_job["http_sd_configs"][0]["url"].split("/")[2]
    commands = [" ".join(map(str, service.get("command", []))) for service in compose()["services"].values()]
    assert not [command for command in commands if address in command]


def test_the_exporters_energy_accounts_outlive_its_container():
    """The exporter keeps its per-job energy accounts beside its --job-dir (job_energy.state_file_for): in the
    compose stack that was the container's own layer, so a recreated container started every job's energy
    counter from 0. They are in a named volume, writable, the job directory's read-only bind inside it."""
    from trainmetrics.exporters.job_energy import state_file_for

    stack = compose()
    command = stack["services"]["exporter"]["command"]
    assert_in_a_named_writable_volume(stack, "exporter", state_file_for(Path(command[command.index("--job-dir") + 1])))


def test_alertmanagers_silences_and_notification_log_outlive_its_container():
    """Alertmanager keeps its silences and its notification log in --storage.path: the compose service named
    none (the image's default, data/ under its working directory, in an anonymous volume), so after a `docker
    compose down` and `up` every silence was gone and every firing alert was notified again. They are in a named
    volume, writable, as Prometheus' and Grafana's data are."""
    stack = compose()
    alertmanager = stack["services"]["alertmanager"]
    flags = dict(arg.split("=", 1) for arg in alertmanager["command"] if "=" in arg)
    assert "--storage.path" in flags, "no --storage.path: the image's default is in an anonymous volume"
    assert_in_a_named_writable_volume(stack, "alertmanager", Path(flags["--storage.path"]))


def assert_in_a_named_writable_volume(stack: dict, service: str, path: Path) -> None:
    """`path` of the service's container is in a named volume of the stack, mounted writable (not the container's
    own layer, or an anonymous volume, which a recreated container does not keep)."""
    mounts = [volume.split(":") for volume in stack["services"][service].get("volumes", [])]
    # The mount the path is in: the one with the longest target that holds it.
    holding = max((mount for mount in mounts if path.is_relative_to(mount[1])), key=lambda mount: len(mount[1]),
                  default=None)
    assert holding is not None, f"{path}: in no volume (the container's own layer)"
    source, target, *options = holding
    assert source in stack["volumes"], (source, target)
    assert "ro" not in ",".join(options).split(",")
