"""Announcing a job to Prometheus: one file_sd target file per job process, removed at exit."""

import json
import logging
from pathlib import Path

from trainmetrics.jobfiles import replace_atomically

log = logging.getLogger("trainmetrics.trainer")


def write_target_file(targets_dir: Path, file_stem: str, address: str, scheme: str = "http") -> Path:
    """Write `<targets_dir>/<file_stem>.json` atomically (jobfiles.replace_atomically: the directory may be
    shared); the temp name does not match `*.json`."""
    targets_dir = Path(targets_dir)
    targets_dir.mkdir(parents=True, exist_ok=True)
    path = targets_dir / f"{file_stem}.json"
    # No job_id target label: the series carry job_id themselves, and a target label of the same name
    # would turn theirs into exported_job_id.
    labels = {"__scheme__": scheme} if scheme != "http" else {}     # TLS: Prometheus scrapes over https
    # Readable by all: Prometheus, which reads the directory, runs as another user.
    replace_atomically(path, json.dumps([{"targets": [address], "labels": labels}]), mode=0o644)
    return path


def remove_quietly(path: Path | None) -> None:
    """Remove a file we wrote; it may already be gone. One that cannot be removed (its filesystem went read-only)
    is said, not raised: raised, it stopped the rest of the job's end (its other files, its registration, the
    last OTLP push)."""
    if path is not None:
        try:
            Path(path).unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("could not remove %s: %s", path, error)
