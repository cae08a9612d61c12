"""The job-mapping directory: how the exporter learns which processes and GPUs belong to which job.

Each running job process writes one JSON file, ``<job_id>[.rank<N>].json``, into the directory at start and
removes it at exit (the idea of dcgm-exporter's job mapping, without a scheduler)::

    {"job_id": "mnist-1", "pid": 4242, "gpus": [0], "rank": 0, "started": 1763779200.5}

Readers must ignore files whose pid is dead (a job killed with -9 cannot clean up) and files they
cannot parse (a writer may be half-way through, although writes go through a rename).
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainmetrics.names import validate_job_id


@dataclass(frozen=True)
class JobMapping:
    """One job process: its id, pid, the GPU indices it uses and its rank."""

    job_id: str
    pid: int
    gpus: list[int] = field(default_factory=list)
    rank: int = 0
    started: float = 0.0

    def file_name(self) -> str:
        """The mapping's file name: one file per job process."""
        return f"{self.job_id}.rank{self.rank}.json"


def write_job_mapping(directory: Path, mapping: JobMapping) -> Path:
    """Write the mapping atomically (temp file + rename) and return its path."""
    validate_job_id(mapping.job_id)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / mapping.file_name()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(mapping)))
    os.replace(tmp, path)
    return path


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_job_mappings(directory: Path) -> list[JobMapping]:
    """All mappings in the directory whose process is alive; unparsable or stale files are skipped."""
    mappings = []
    try:
        entries = sorted(Path(directory).glob("*.json"))
    except OSError:
        return []
    for path in entries:
        try:
            raw = json.loads(path.read_text())
            mapping = JobMapping(
                job_id=validate_job_id(raw["job_id"]),
                pid=int(raw["pid"]),
                gpus=[int(g) for g in raw.get("gpus", [])],
                rank=int(raw.get("rank", 0)),
                started=float(raw.get("started", 0.0)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid_alive(mapping.pid):
            mappings.append(mapping)
    return mappings
