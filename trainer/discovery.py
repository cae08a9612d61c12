"""Announcing a job to Prometheus: one file_sd target file per job process, removed at exit."""

import json
import os
from pathlib import Path


def write_target_file(targets_dir: Path, file_stem: str, address: str, scheme: str = "http") -> Path:
    """Write `<targets_dir>/<file_stem>.json` atomically; the temp name does not match `*.json`."""
    targets_dir = Path(targets_dir)
    targets_dir.mkdir(parents=True, exist_ok=True)
    path = targets_dir / f"{file_stem}.json"
    tmp = targets_dir / f".{file_stem}.json.tmp"
    # No job_id target label: the series carry job_id themselves, and a target label of the same name
    # would turn theirs into exported_job_id.
    labels = {"__scheme__": scheme} if scheme != "http" else {}     # TLS: Prometheus scrapes over https
    tmp.write_text(json.dumps([{"targets": [address], "labels": labels}]))
    os.replace(tmp, path)
    return path


def remove_quietly(path: Path | None) -> None:
    """Remove a file we wrote; it may already be gone."""
    if path is not None:
        try:
            Path(path).unlink()
        except FileNotFoundError:
            pass
