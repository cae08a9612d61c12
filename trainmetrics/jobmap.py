"""The job-mapping directory: how the exporter learns which processes and GPUs belong to which job.

Each running job process writes one JSON file, ``<job_id>[.rank<N>].json``, into the directory at start and
removes it at exit (the idea of dcgm-exporter's job mapping, without a scheduler)::

    {"job_id": "mnist-1", "pid": 4242, "gpus": [0], "rank": 0, "started": 1763779200.5, "start_ticks": 8630412}

`start_ticks` is when the process started, in clock ticks since boot (/proc/PID/stat field 22): with the
file's owner it proves which process the file means. Readers treat the directory as untrusted: they ignore
files that do not parse, files whose pid is dead or now another process (a job killed with -9 cannot clean
up), and files whose owner is neither root nor the process's user.
"""

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trainmetrics.contract import validate_job_id
from trainmetrics.jobfiles import replace_atomically


@dataclass(frozen=True)
class JobMapping:
    """One job process: its id, pid, the GPU indices it uses, its rank, and when it started."""

    job_id: str
    pid: int
    gpus: list[int] = field(default_factory=list)
    rank: int = 0
    started: float = 0.0
    start_ticks: int = 0    # 0: write_job_mapping reads it from /proc/PID/stat

    def file_name(self) -> str:
        """The mapping's file name: one file per job process."""
        return f"{self.job_id}.rank{self.rank}.json"


def process_start_ticks(pid: int | str = "self") -> int:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        stat = handle.read()
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    return int(stat[stat.rfind(b")") + 2:].split()[19])


def write_job_mapping(directory: Path, mapping: JobMapping) -> Path:
    """Write the mapping, with its process's start ticks, atomically (jobfiles.replace_atomically: the
    directory is shared); return its path."""
    validate_job_id(mapping.job_id)
    if not mapping.start_ticks:
        mapping = replace(mapping, start_ticks=process_start_ticks(mapping.pid))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / mapping.file_name()
    # Readable by all: the node exporter reading the directory may run as another user.
    replace_atomically(path, json.dumps(asdict(mapping)), mode=0o644)
    return path
