"""Names every component shares: the job-id rule and default ports. Imports nothing heavy."""

import re

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

DEFAULT_ANALYTICS_PORT = 8000
DEFAULT_EXPORTER_PORT = 9105
DEFAULT_PROMETHEUS_PORT = 9090
# Where jobs announce themselves (file_sd) and where they write job-mapping files for the exporter,
# as deploy/prometheus/prometheus.yml and the exporter expect them by default.
DEFAULT_TARGETS_DIR = "/var/lib/trainmetrics/targets"
DEFAULT_JOB_DIR = "/var/lib/trainmetrics/jobs"


def validate_job_id(job_id: str) -> str:
    """Return job_id unchanged, or raise ValueError naming the rule it breaks."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(
            f"invalid job id {job_id!r}: must match {JOB_ID_PATTERN.pattern} "
            "(letters, digits, '.', '_', '-'; first a letter or digit; at most 64 characters)"
        )
    return job_id


def parse_listen(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse 'HOST:PORT', ':PORT' or 'PORT' into (host, port); raise ValueError on anything else."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "", value
    host = host.strip("[]") or default_host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid listen address {value!r}: expected HOST:PORT with PORT in 0..65535")
    return host, int(port_text)
