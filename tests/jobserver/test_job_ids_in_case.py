"""Job ids that differ in case alone: a job's directory is named by its id, and a case-insensitive file system
(macOS's by default, SMB, ext4's casefold) makes the two names one directory. A real store and JobService (no run
is started: the supervisor has no room)."""

import pytest

from trainmetrics.edge import ApiError
from trainmetrics.jobserver.jobs import JobService, ServerSettings
from trainmetrics.jobserver.store import JobStore
from trainmetrics.jobserver.supervisor import Supervisor


@pytest.fixture
def service(tmp_path):
    store = JobStore(tmp_path / "db.sqlite")
    yield JobService(ServerSettings(data_dir=tmp_path), store, Supervisor(store, tmp_path, None, max_concurrent=0))
    store.close()


def submit(service: JobService, job_id: str) -> dict:
    return service.submit(None, {"job_id": job_id, "dataset": "blobs"})


def test_a_job_id_differing_from_another_in_case_alone_is_refused_saying_why(service):
    """Both were accepted: on a case-insensitive file system the second job's checkpoints, result and log went
    into the first's directory."""
    assert submit(service, "run-a")["state"] == "queued"
    with pytest.raises(ApiError) as refused:
        submit(service, "Run-A")
    assert refused.value.status == 409 and "in case alone" in refused.value.message, refused.value.message
    with pytest.raises(ApiError) as again:
        submit(service, "run-a")
    assert again.value.status == 409 and again.value.message == "job_id: 'run-a' exists"
    assert [job["job_id"] for job in service.list_jobs(None, None)] == ["run-a"]
