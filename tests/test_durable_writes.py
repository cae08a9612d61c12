"""Nothing a component acknowledged is lost to a power cut or a kernel crash: each file it answers for is synced,
then renamed into place, then its directory synced, before the answer (or the publication).

A power cut cannot be made here, and a file written without fsync reads back whole until one: these tests spy on
os.fsync and os.replace instead (each recorded with the path it is about) and check their order against the
moment of the acknowledgement."""

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.jobserver.test_disk_full import CSV, served
from trainmetrics.exporters.job_energy import JobEnergy
from trainmetrics.jobfiles import write_result
from trainmetrics.jobserver.store import JobStore


@pytest.fixture
def disk_calls(monkeypatch) -> list[tuple[str, str]]:
    """("fsync", path of the descriptor) and ("replace", "SOURCE -> DESTINATION"), in the order they were made,
    from any thread."""
    calls = []
    fsync, replace = os.fsync, os.replace

    def spied_fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spied_replace(source, destination, **kwargs):
        calls.append(("replace", f"{source} -> {destination}"))
        replace(source, destination, **kwargs)

    monkeypatch.setattr(os, "fsync", spied_fsync)
    monkeypatch.setattr(os, "replace", spied_replace)
    return calls


def durable_steps(calls: list[tuple[str, str]], path: Path) -> list[str]:
    """The steps that made `path` durable, in order: "file" (its temp file synced), "rename", "directory"."""
    renames = [target.split(" -> ") for kind, target in calls if kind == "replace"]
    temp = next((source for source, destination in renames if destination == str(path)), None)
    steps = []
    for kind, target in calls:
        if kind == "fsync" and target == temp:
            steps.append("file")
        elif kind == "replace" and target == f"{temp} -> {path}":
            steps.append("rename")
        elif kind == "fsync" and target == str(path.parent):
            steps.append("directory")
    return steps


def test_a_job_result_is_synced_renamed_and_its_directory_synced_before_the_write_returns(tmp_path, disk_calls):
    """The result's file was synced, but not its directory after the rename: a crash after the job exited could
    leave no result.json, and the job failed "ended without a result"."""
    write_result(tmp_path / "result.json", {"status": "completed"})
    assert durable_steps(disk_calls, tmp_path / "result.json") == ["file", "rename", "directory"]


def test_an_upload_is_synced_renamed_and_its_directory_synced_before_it_is_recorded_and_answered(
        tmp_path, disk_calls, monkeypatch):
    """The upload was never synced, nor its directory: after a power cut, the dataset answered 201 (and recorded,
    SQLite syncing its row) could be empty or missing, and every job submitted on it failed."""
    add_dataset = JobStore.add_dataset

    def recording(self, record):
        disk_calls.append(("record", record.path))
        add_dataset(self, record)

    monkeypatch.setattr(JobStore, "add_dataset", recording)

    async def upload():
        async with served(tmp_path) as (client, _):
            answer = await client.post("/api/training/datasets?name=d.csv", content=CSV)
            assert answer.status_code == 201, answer.text
            disk_calls.append(("answered", ""))

    asyncio.run(upload())
    [dataset] = list((tmp_path / "datasets").iterdir())
    assert durable_steps(disk_calls, dataset) == ["file", "rename", "directory"]
    synced_directory = disk_calls.index(("fsync", str(dataset.parent)))
    assert synced_directory < disk_calls.index(("record", str(dataset))) < disk_calls.index(("answered", ""))
    assert dataset.read_bytes() == CSV


def test_the_energy_state_is_synced_renamed_and_its_directory_synced_before_the_counts_are_published(
        tmp_path, disk_calls):
    """The state file was written and renamed without a sync: after a power cut the restarted exporter read the old
    file (its counters went back: a scraper took that for a reset and counted the job's energy twice) or an empty
    one (they started from 0)."""
    state = tmp_path / "jobs.energy.json"
    energy = JobEnergy(state)
    energy.add("job-a", "gpu", 5.0)
    energy.publish()
    assert durable_steps(disk_calls, state) == ["file", "rename", "directory"]
    assert energy.published == {("job-a", "gpu"): 5.0}
    assert json.loads(state.read_text())["jobs"]["job-a"]["gpu"] == 5.0
