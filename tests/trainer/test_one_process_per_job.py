"""One live process per job id and rank in a shared targets or job directory. A second one with the same id
overwrote the first's file_sd target and job mapping, and whichever ended first removed both: the other went
unscraped and unattributed for the rest of its run."""

import errno
import json
import os
import signal
import time

import pytest

from trainmetrics import jobfiles
from trainmetrics.jobfiles import ClaimedElsewhere
from trainmetrics.trainer.metrics import JobMetrics
from trainmetrics.trainer.telemetry import Publish

from tests.trainer.conftest import run_train


def publish(tmp_path) -> Publish:
    return Publish(listen="127.0.0.1:0", targets_dir=tmp_path / "targets", job_dir=tmp_path / "jobs",
                   linger_timeout=0)


def test_a_second_live_process_with_the_same_job_id_is_refused_and_the_first_keeps_its_files(tmp_path):
    first = JobMetrics("twice-1", publish=publish(tmp_path))
    try:
        target = tmp_path / "targets" / "twice-1.rank0.json"
        before = target.read_text()
        with pytest.raises(ClaimedElsewhere, match="job twice-1 is already running: pid \\d+ announces it in"):
            JobMetrics("twice-1", publish=publish(tmp_path))
        assert target.read_text() == before                     # still the first one's port
        assert (tmp_path / "jobs" / "twice-1.rank0.json").exists()
        other = JobMetrics("twice-2", publish=publish(tmp_path))     # another job id is another claim
        other.close()
    finally:
        first.close()
    assert sorted(p.name for p in (tmp_path / "targets").iterdir()) == []     # claims go with the files
    again = JobMetrics("twice-1", publish=publish(tmp_path))    # the id is free once the first has ended
    again.close()


def test_the_claim_of_a_killed_process_is_free_at_once(tmp_path, spawn_train):
    # Announced for the claim, and nothing scrapes: no linger (a 1 s one ran out three times: the first and the
    # last run waiting for a first scrape, the last for its final state's).
    # (The first long enough to be training still when the second is refused on a loaded host: killed at the end.)
    args = ["--job-id", "dup-1", "--dataset", "blobs", "--epochs", "1000", "--log-every", "20",
            "--targets-dir", str(tmp_path / "targets"), "--job-dir", str(tmp_path / "jobs"), "--linger-timeout", "0"]
    first = spawn_train(*args)
    target = tmp_path / "targets" / "dup-1.rank0.json"
    try:
        deadline = time.monotonic() + 120
        while not target.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first never announced itself"
            time.sleep(0.05)
        announced = json.loads(target.read_text())
        second = run_train(*args)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"--job-id: job dup-1 is already running: pid {first.pid} announces" in lines[0]
        assert json.loads(target.read_text()) == announced and first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    third = run_train(*args[:5], "1", *args[6:])
    assert third.returncode == 0, third.stderr      # a stale claim (kill -9) refuses nothing


def test_a_filesystem_without_locks_runs_the_job_unclaimed(tmp_path, monkeypatch):
    """NFS without a lock manager answers ENOLCK: the job starts as it did before claims, leaving no lock file."""
    import errno

    from trainmetrics import jobfiles

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(jobfiles.fcntl, "flock", no_locks)
    metrics = JobMetrics("nolocks-1", publish=publish(tmp_path))
    try:
        assert [p.name for p in (tmp_path / "targets").iterdir()] == ["nolocks-1.rank0.json"]
    finally:
        metrics.close()


def test_a_second_job_on_a_checkpoint_dir_in_use_is_refused_and_a_killed_ones_claim_is_free(tmp_path, spawn_train):
    """Two jobs (other job ids) started on one empty checkpoint directory both ran: each overwrote the other's
    checkpoints of the same steps and pruned the rest as its own, so the job that ended first had none left to
    resume from, and model.pt was whichever job ended last."""
    ckpt = tmp_path / "ckpt"
    common = ["--dataset", "blobs", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1000000",
              "--linger-timeout", "0"]
    # Long enough to be training still when the second is refused on a loaded host (killed at the end).
    first = spawn_train("--job-id", "ckpt-a", "--epochs", "1000", "--log-every", "20", *common)
    try:
        deadline = time.monotonic() + 120
        while "step=" not in first.stderr.readline():
            assert first.poll() is None and time.monotonic() < deadline, "the first job never trained"
        second = run_train("--job-id", "ckpt-b", "--epochs", "1", *common)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and (f"--checkpoint-dir: a job writing its checkpoints to {ckpt} is already "
                                    f"running: pid {first.pid} announces it") in lines[0], lines
        assert first.poll() is None and not (ckpt / "model.pt").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    third = run_train("--job-id", "ckpt-b", "--epochs", "1", *common)
    assert third.returncode == 0, third.stderr      # a stale claim (kill -9) refuses nothing
    assert [p.name for p in ckpt.iterdir()] == ["model.pt"]     # its claim gone with it


def test_a_job_killed_while_its_dataloader_workers_live_on_leaves_its_checkpoint_dir_free(tmp_path, spawn_train):
    """A DataLoader worker, forked from rank 0, shared the claim's open file and so its lock: a job killed -9 kept
    its checkpoint dir claimed until each worker noticed its parent gone (up to 5 s; here a worker held stopped),
    and a restart in that time (the job server resuming it, torchrun restarting it) was refused as bad input."""
    import psutil

    ckpt = tmp_path / "ckpt"
    common = ["--dataset", "blobs", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1000000",
              "--linger-timeout", "0"]
    first = spawn_train("--job-id", "ckpt-w", "--epochs", "50", "--log-every", "20", "--workers", "1", *common)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while "step=" not in first.stderr.readline():
            assert first.poll() is None and time.monotonic() < deadline, "the job never trained"
        workers = psutil.Process(first.pid).children()
        assert workers, "the job forked no DataLoader worker"
        for worker in workers:
            worker.suspend()        # a worker that has not yet seen its parent die
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        restarted = run_train("--job-id", "ckpt-w", "--epochs", "1", "--resume", *common)
        assert restarted.returncode == 0, restarted.stderr
    finally:
        for worker in workers:
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass


def test_a_claim_whose_pid_cannot_be_written_holds_nothing_and_leaves_no_descriptor(tmp_path, monkeypatch):
    """A claim that failed writing its pid (a full disk) raised with its descriptor left open: the lock stayed held
    for the process's life, and the job's own retry was refused as another job."""
    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = len(os.listdir("/proc/self/fd"))
    with monkeypatch.context() as patched:
        patched.setattr(jobfiles.os, "pwrite", full_disk)
        with pytest.raises(OSError):
            jobfiles.claim(tmp_path, "checkpoints", "a job")
    assert len(os.listdir("/proc/self/fd")) == before
    fd = jobfiles.claim(tmp_path, "checkpoints", "a job")
    assert fd is not None
    jobfiles.unclaim(tmp_path, "checkpoints", fd)
