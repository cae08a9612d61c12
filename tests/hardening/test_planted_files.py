"""What another user can plant in the shared directories a job writes to (--job-dir, --targets-dir,
--diagnostics-dir): a FIFO must block no writer or reader, a symlink must have nothing written through it or
served from it, a directory must break nothing. Direct calls of the writers and readers, each under a
deadline: a writer that blocks on a FIFO fails the test instead of hanging the suite."""

import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import sys

import pytest

from trainmetrics.jobmap import JobMapping, write_job_mapping
from trainmetrics.jobserver import stacks
from trainmetrics.trainer.checkpoint import ensure_writable_dir
from trainmetrics.trainer.discovery import write_target_file
from trainmetrics.trainer.watchdog import open_stacks_file

DEADLINE_SECONDS = 3
VICTIM_TEXT = "the victim's own file\n"


class Blocked(Exception):
    """A call still blocked at its deadline. No OSError (TimeoutError is one): code that takes a failed open for
    a file to pass over caught it, and a call that blocked passed its test."""


@contextlib.contextmanager
def deadline(seconds: float = DEADLINE_SECONDS):
    """Raise Blocked in the block after `seconds` (a blocked open is interrupted and not retried)."""
    def expire(signum, frame):
        raise Blocked(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def victim(tmp_path):
    """A file of the job's user outside the shared directory, which nothing may write to."""
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


def write_mapping(directory):
    return write_job_mapping(directory, JobMapping(job_id="vic", pid=os.getpid(), rank=0))


def write_target(directory):
    return write_target_file(directory, "vic.rank0", "127.0.0.1:9100")


# The job's two announcement files, and the temp name each was written through before (predictable).
WRITERS = {"mapping": (write_mapping, ".vic.rank0.json.tmp"), "target": (write_target, ".vic.rank0.json.tmp")}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_fifo_at_the_old_temp_name_blocks_no_announcement(tmp_path, writer):
    write, old_temp = WRITERS[writer]
    shared = tmp_path / "shared"
    shared.mkdir()
    os.mkfifo(shared / old_temp)
    with deadline():
        path = write(shared)
    assert json.loads(path.read_text())
    assert stat.S_ISFIFO(os.lstat(shared / old_temp).st_mode)      # someone else's: left alone


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("at", ["old temp name", "final name"])
def test_a_symlink_in_the_shared_directory_has_nothing_written_through_it(tmp_path, victim, writer, at):
    write, old_temp = WRITERS[writer]
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / (old_temp if at == "old temp name" else "vic.rank0.json")).symlink_to(victim)
    with deadline():
        path = write(shared)
    assert victim.read_text() == VICTIM_TEXT
    assert stat.S_ISREG(os.lstat(path).st_mode) and json.loads(path.read_text())


@pytest.mark.parametrize("writer", WRITERS)
def test_a_fifo_at_the_final_name_is_replaced_and_a_directory_there_is_still_an_error(tmp_path, writer):
    write, _ = WRITERS[writer]
    fifo_dir, dir_dir = tmp_path / "fifo", tmp_path / "dir"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "vic.rank0.json")
    (dir_dir / "vic.rank0.json").mkdir(parents=True)
    with deadline():
        assert json.loads(write(fifo_dir).read_text())
        with pytest.raises(IsADirectoryError):       # the callers' OSError: the job reports it and ends
            write(dir_dir)
    assert os.listdir(dir_dir) == ["vic.rank0.json"]     # no temp file left behind


@pytest.mark.parametrize("writer", WRITERS)
def test_announcements_stay_readable_by_the_exporter_and_prometheus(tmp_path, writer):
    write, _ = WRITERS[writer]
    assert stat.S_IMODE(os.stat(write(tmp_path)).st_mode) == 0o644


def plant(path, kind, victim):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(victim)
    elif kind == "directory":
        path.mkdir()
    elif kind == "hard link":        # O_NOFOLLOW does not see one: it is the victim under another name
        os.link(victim, path)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "hard link"])
def test_a_planted_stacks_file_sends_the_stacks_to_stderr_without_blocking_the_job(tmp_path, victim, kind, caplog):
    plant(tmp_path / "stacks.rank0.txt", kind, victim)
    with deadline(), caplog.at_level(logging.WARNING, logger="trainmetrics.trainer"):
        file, name, owned = open_stacks_file(tmp_path, 0)
    assert (file, name, owned) == (sys.stderr, "stderr", False)
    assert "stacks.rank0.txt" in caplog.text
    assert victim.read_text() == VICTIM_TEXT


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "hard link"])
@pytest.mark.parametrize("temp_name", [".step-000000010.pt.0123456789abcdef.tmp", ".model.pt.0123456789abcdef.tmp"])
def test_a_file_planted_at_a_checkpoints_temp_name_neither_blocks_nor_fails_the_jobs_start(tmp_path, victim, kind,
                                                                                           temp_name):
    """A job's start removes the temp files a writer killed mid-checkpoint left: it opened whatever was at such a
    name to see whether a live writer locked it, so a FIFO there blocked the start for good (before the job served
    its metrics or wrote a result), and a directory failed every start as bad input (`--checkpoint-dir: ... is not
    writable: Is a directory`). Only a regular file is one of ours; the killed writer's own is still removed."""
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    plant(checkpoints / temp_name, kind, victim)
    killed_writers = checkpoints / ".step-000000020.pt.fedcba9876543210.tmp"
    killed_writers.write_bytes(b"half a checkpoint")
    with deadline():
        ensure_writable_dir(checkpoints)
    assert not killed_writers.exists()
    assert victim.read_text() == VICTIM_TEXT
    if kind != "hard link":         # (the victim under a temp name: its name may go, the victim stays)
        assert os.path.lexists(checkpoints / temp_name)


def test_a_fifo_with_a_reader_is_refused_too(tmp_path):
    fifo = tmp_path / "stacks.rank0.txt"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)     # a writer's open now succeeds: fstat must refuse
    try:
        with deadline():
            assert open_stacks_file(tmp_path, 0)[0] is sys.stderr
    finally:
        os.close(reader)


def test_another_users_file_at_a_ranks_stacks_name_is_not_appended_to(tmp_path, monkeypatch, caplog):
    """In a shared directory (/tmp) anyone may create the file a rank's stacks go to before the job starts: the
    stacks, a job's code and arguments, were appended to that user's file, for them to read. (The job's user is
    played by another uid; the other user's file is chowned to a third, which needs root.)"""
    if os.geteuid() != 0:
        pytest.skip("planting another user's file needs root")
    (tmp_path / "stacks.rank0.txt").write_text("someone else's\n")
    os.chown(tmp_path / "stacks.rank0.txt", 54321, 54321)      # neither the job's user nor the directory's owner
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    with caplog.at_level(logging.WARNING, logger="trainmetrics.trainer"):
        file, name, owned = open_stacks_file(tmp_path, 0)
    assert (file, name, owned) == (sys.stderr, "stderr", False)
    assert "another user's file" in caplog.text


def test_a_stacks_file_the_rank_creates_is_its_own_whatever_owner_its_filesystem_reports(tmp_path, monkeypatch):
    """A filesystem may report an owner other than the writer's for a file it just created: a FUSE mount (gcsfuse,
    sshfs) shows its mount's uid, NFS its squashed one, and Ray's ranks run as Ray's worker user. The rank refused
    the file it had itself created as "another user's file": every run's stacks went to its log, none to the route.
    (The filesystem is played by another euid: these tests run as one user.)"""
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    file, name, owned = open_stacks_file(tmp_path, 0)
    try:
        assert (name, owned) == (str(tmp_path / "stacks.rank0.txt"), True)
        file.write("a dump\n")
    finally:
        if owned:
            file.close()
    assert (tmp_path / "stacks.rank0.txt").read_text() == "a dump\n"


def test_an_earlier_runs_stacks_file_owned_by_the_directorys_owner_is_appended_to(tmp_path, monkeypatch):
    """On a FUSE or squashing mount every file shows the mount's uid, the directory's too: a resumed run refused
    the file its job's earlier run had created as another user's, and its stacks went to its log. The directory's
    owner controls the names in it anyway. (The mount is played by another euid.)"""
    (tmp_path / "stacks.rank0.txt").write_text("an earlier run's dump\n")
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    file, name, owned = open_stacks_file(tmp_path, 0)
    assert owned, name
    with file:
        file.write("this run's\n")
    assert (tmp_path / "stacks.rank0.txt").read_text() == "an earlier run's dump\nthis run's\n"


def test_a_hard_link_planted_as_a_large_stacks_file_is_not_emptied(tmp_path, victim, monkeypatch):
    """A hard link at a rank's stacks name is the victim's file under another name (O_NOFOLLOW does not see it):
    the server served its end as the rank's stacks and, once it was large, emptied it."""
    monkeypatch.setattr(stacks, "MAX_FILE_BYTES", 4)
    plant(tmp_path / "stacks.rank0.txt", "hard link", victim)
    stacks.make_room(tmp_path, 1)
    stacks._empty(tmp_path, 0)
    assert victim.read_text() == VICTIM_TEXT and stacks._read(tmp_path, 0, 0) is None


def test_the_stacks_file_of_a_rank_is_appended_to(tmp_path):
    (tmp_path / "stacks.rank1.txt").write_text("earlier dump\n")
    file, name, owned = open_stacks_file(tmp_path, 1)
    with file:
        file.write("new dump\n")
    assert owned and name == str(tmp_path / "stacks.rank1.txt")
    assert (tmp_path / "stacks.rank1.txt").read_text() == "earlier dump\nnew dump\n"


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "hard link"])
def test_the_stacks_route_counts_a_planted_file_as_the_ranks_stacks_missing(tmp_path, victim, kind):
    (tmp_path / "stacks.rank0.txt").write_text("Thread 0x1 (most recent call first):\n")
    plant(tmp_path / "stacks.rank1.txt", kind, victim)
    with deadline():
        answer = stacks.earlier(tmp_path, 2)
    assert answer["missing_ranks"] == [1]
    assert [rank["rank"] for rank in answer["ranks"]] == [0]


def test_a_symlink_swapped_in_while_the_ranks_answer_is_not_served(tmp_path, victim, monkeypatch):
    monkeypatch.setattr(stacks, "ANSWER_SECONDS", 0.5)
    before = stacks.sizes(tmp_path, 1)
    (tmp_path / "stacks.rank0.txt").symlink_to(victim)
    with deadline():
        answer = asyncio.run(stacks.collect(tmp_path, before))
    assert answer["ranks"] == [] and answer["missing_ranks"] == [0]
