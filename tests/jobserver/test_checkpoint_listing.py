"""The job server's listing of a job's checkpoints, read on its one state thread, with real files in a real job
directory, a real store and a real JobService (no run is started: the supervisor has no room)."""

import os

import pytest

from trainmetrics.jobfiles import MAX_LISTED_ENTRIES, checkpoint_name
from trainmetrics.jobserver.jobs import JobService, ServerSettings
from trainmetrics.jobserver.store import JobRecord, JobStore
from trainmetrics.jobserver.supervisor import Supervisor


@pytest.fixture
def service(tmp_path):
    store = JobStore(tmp_path / "db.sqlite")
    yield JobService(ServerSettings(data_dir=tmp_path), store, Supervisor(store, tmp_path, None, max_concurrent=0))
    store.close()


def job_with_checkpoint_dir(service: JobService, job_id: str, state: str = "completed"):
    """A job of `state` in the store, and its (empty) checkpoint directory."""
    service.store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state=state,
                                    spec={"model": "mlp", "dataset": "blobs", "nproc": 1}, ended=1.0))
    directory = service.supervisor.checkpoint_dir(job_id)
    directory.mkdir(parents=True)
    return directory


def fill(directory, names) -> None:
    """Empty regular files of these names in the directory."""
    for name in names:
        os.close(os.open(directory / name, os.O_WRONLY | os.O_CREAT, 0o644))


def test_a_checkpoint_directory_filled_past_the_bound_is_listed_from_the_bound_and_said_truncated(service):
    """A job's process can fill its checkpoint directory: every file of it was read and stated on the server's
    state thread, for the listing and for the job's own GET (its count), and 300,000 there held every owner's
    requests 4 s each. The server reads MAX_LISTED_ENTRIES entries at most, and says the listing was cut."""
    directory = job_with_checkpoint_dir(service, "flooded")
    fill(directory, (checkpoint_name(step) for step in range(MAX_LISTED_ENTRIES + 100)))
    listing = service.checkpoints(None, "flooded")
    assert listing["truncated"] is True and len(listing["checkpoints"]) == MAX_LISTED_ENTRIES
    assert service.get(None, "flooded")["checkpoints"] == MAX_LISTED_ENTRIES      # a lower bound, as documented


def test_a_jobs_own_checkpoints_among_a_few_other_files_are_listed_whole_oldest_first(service):
    """The bound leaves a job's directory as the trainer writes it whole: its checkpoints only (no temp file,
    other name, directory or symlink), oldest first, and the listing says it is not cut (it said nothing)."""
    directory = job_with_checkpoint_dir(service, "own")
    fill(directory, [checkpoint_name(20), checkpoint_name(10), ".step-000000030.pt.0123abcd.tmp", "notes.txt"])
    (directory / checkpoint_name(40)).mkdir()
    (directory / checkpoint_name(50)).symlink_to(directory / checkpoint_name(20))
    listing = service.checkpoints(None, "own")
    assert [c["name"] for c in listing["checkpoints"]] == [checkpoint_name(10), checkpoint_name(20)]
    assert listing["truncated"] is False and service.get(None, "own")["checkpoints"] == 2


def test_a_failed_job_whose_checkpoint_directory_is_too_full_to_read_through_resumes(service):
    """Whether a failed job had a checkpoint to resume from was decided by reading its whole directory on the state
    thread (every owner waited). Read up to a bound now, the job's checkpoints may lie past it (directory order is
    arbitrary): such a directory counts as holding one (`resume` was 409 "only failed ones with a checkpoint", its
    start lacked --resume), and the job's run, resumed, reads it whole in its own process."""
    directory = job_with_checkpoint_dir(service, "too-full", state="failed")
    fill(directory, (f"junk-{index}" for index in range(MAX_LISTED_ENTRIES + 100)))
    assert service.resume(None, "too-full")["state"] == "queued"
    assert "--resume" in service.supervisor.train_args(service.store.get_job("too-full"))
    service.store.update_job("too-full", resume=False)
    assert "--resume" in service.supervisor.train_args(service.store.get_job("too-full"))      # its own count


def test_a_failed_job_with_only_other_files_in_its_checkpoint_directory_does_not_resume(service):
    """Below the bound the answer is exact: no checkpoint there, no resume of a failed job (as before)."""
    directory = job_with_checkpoint_dir(service, "none-there", state="failed")
    fill(directory, ["notes.txt", ".step-000000030.pt.0123abcd.tmp"])
    with pytest.raises(Exception, match="only paused jobs, or failed ones with a checkpoint"):
        service.resume(None, "none-there")
