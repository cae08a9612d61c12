"""The files a training job leaves for the job server: its checkpoints (by name) and its result.

The result is one JSON object written atomically when the job process ends, next to its log: the job server
learns a job's outcome from it (never from the log). Strict JSON: a non-finite number is written as null.
"""

import errno
import fcntl
import json
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainmetrics.contract import STOP_SIGNALS

# checkpoint_name's names: nine digits, zero-padded, and more without a leading zero past step 999,999,999 (those
# were neither pruned nor resumed from). ([0-9]: \d takes every script's digits.) Matched whole (fullmatch): `$` also
# matches before a final newline, so `step-000000999.pt\n` was listed, resumed from, and refused for download.
CHECKPOINT_PATTERN = re.compile(r"step-([0-9]{9}|[1-9][0-9]{9,17})\.pt")
FINAL_MODEL_NAME = "model.pt"
RESULT_FILE_NAME = "result.json"
LOG_NAME = "train.log"
# A stop request for a job run that no signal can reach (ranks on other hosts): "paused" or "cancelled",
# written by the job server, read by the run's launcher.
CONTROL_FILE_NAME = "control"
# A request for every rank's thread stacks that no signal can reach: a number the job server raises, read by
# the run's launcher, which passes SIGUSR2 on to every rank.
STACKS_REQUEST_NAME = "stacks.request"
# What a run waits for before any rank starts (Ray to place its ranks), written by its launcher while it waits past
# a few seconds, removed once it stops waiting: the job server shows the job queued meanwhile, and why.
PLACEMENT_WAIT_NAME = "placement.wait"
# The GPUs the job server gave a local job's run (CUDA_VISIBLE_DEVICES), in the job's directory: a restarted server
# gives them to no other job while it adopts the run.
GPUS_FILE_NAME = "gpus"
# A result is a few hundred bytes; anything far larger is not ours.
MAX_RESULT_BYTES = 1 << 20
# The result's fields read as text (a job's error, and why it stopped): read_result drops one of another type.
RESULT_TEXT_FIELDS = ("error", "error_type", "reason")
# The entries of a job's checkpoint directory (any name) the job server reads at most to list or count its
# checkpoints. It reads them on its one state thread, where every owner's requests wait, and a job's process can
# fill the directory: 300,000 files planted there took 4 s a listing. A job keeps a few checkpoints
# (keep_checkpoints, 3 by default), far within the bound.
MAX_LISTED_ENTRIES = 10_000


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file, the step it was taken at, and its size and change time as it was listed."""

    path: Path
    step: int
    size_bytes: int = 0
    modified: float = 0.0


def stacks_path(directory: Path, rank: int) -> Path:
    """Where a rank writes its thread stacks (SIGUSR2, or its hang watchdog)."""
    return Path(directory) / f"stacks.rank{rank}.txt"


def checkpoint_name(step: int) -> str:
    """The file name for a checkpoint at `step` (zero-padded so names sort by step)."""
    return f"step-{step:09d}.pt"


def list_checkpoints(directory: Path | int) -> list[Checkpoint]:
    """Checkpoints in the directory (a path, or a descriptor open on it: each path is then its name alone),
    oldest first, every entry of it read: the trainer's choice of the newest, in the job's own process. Temp
    files, other names and anything but a regular file are left out, stated without following a symlink (one
    swapped in would show its target's size); a file pruned while listed is left out too."""
    return scan_checkpoints(directory)[0]


def scan_checkpoints(directory: Path | int, max_entries: int | None = None) -> tuple[list[Checkpoint], bool]:
    """list_checkpoints reading at most `max_entries` entries of the directory (any name), and whether it stopped
    before the end: then any checkpoint may be left out, the newest included (directory order is arbitrary)."""
    if not isinstance(directory, int) and not Path(directory).is_dir():
        return [], False
    found = []
    with os.scandir(directory) as entries:
        for read, entry in enumerate(entries):
            if max_entries is not None and read >= max_entries:
                return sorted(found, key=lambda checkpoint: checkpoint.step), True
            if (checkpoint := _checkpoint_of(entry)) is not None:
                found.append(checkpoint)
    return sorted(found, key=lambda checkpoint: checkpoint.step), False


def may_hold_checkpoints(directory: Path | int) -> bool:
    """Whether the job server takes the directory to hold a checkpoint: one found within MAX_LISTED_ENTRIES, or
    more entries than that (unknown: the job's run, resumed, reads them all itself and trains afresh without
    one). Answering no there would leave a failed job whose checkpoints lie past the bound unresumable."""
    checkpoints, truncated = scan_checkpoints(directory, MAX_LISTED_ENTRIES)
    return bool(checkpoints) or truncated


def _checkpoint_of(entry: os.DirEntry) -> Checkpoint | None:
    """The checkpoint a directory entry is: a regular file of a checkpoint's name, stated without following a
    symlink; None for anything else, or one gone since it was read."""
    match = CHECKPOINT_PATTERN.fullmatch(entry.name)
    if not match:
        return None
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return Checkpoint(Path(entry.path), int(match.group(1)), info.st_size, info.st_mtime)


def finite_or_none(value):
    """`value` with every non-finite float inside it replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def strict_json(value) -> str:
    """JSON that strict parsers accept: non-finite numbers become null."""
    return json.dumps(finite_or_none(value), allow_nan=False)


def open_regular(path: Path, flags: int, mode: int = 0o644, dir_fd: int | None = None,
                 one_name: bool = False, follow_symlinks: bool = False) -> int:
    """A descriptor for `path` (relative to `dir_fd` when given) opened with `flags`, only if it is a regular
    file (and, `one_name`, one with no other name); OSError otherwise (errno EINVAL: not a regular file).

    The directories these files live in may be shared, and anyone who can write there may have planted
    something at the name: never follow a symlink (O_NOFOLLOW), never wait on a FIFO or a device
    (O_NONBLOCK: a FIFO without a reader fails at once, one with a reader opens and is refused below),
    never leak the descriptor into a child (O_CLOEXEC). A hard link is a file of another name, which O_NOFOLLOW
    does not see: where what is read is served or what is written appended (a rank's stacks), `one_name`. A file
    an administrator names (`follow_symlinks`: a Kubernetes secret's is a symlink) is followed, never waited on."""
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    fd = os.open(path, flags | nofollow | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if one_name and info.st_nlink != 1:
            raise OSError(errno.EMLINK, "a hard link to another file", str(path))
        os.set_blocking(fd, True)       # a regular file's reads and writes never wait: keep the usual semantics
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_named_file(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of a file an administrator names by a flag or in a config (symlinks followed: a Kubernetes
    secret's file is one); OSError for anything but a regular file (errno EINVAL: a FIFO held the program's start
    until something wrote to it, /dev/zero was read without end) and for one larger than `max_bytes` (errno
    EFBIG: a path mistyped to a log file)."""
    with open(open_regular(Path(path), os.O_RDONLY, follow_symlinks=True), "rb") as handle:
        content = handle.read(max_bytes + 1)
    if len(content) > max_bytes:
        raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", str(path))
    return content


def open_directory(base: Path, *names: str) -> int:
    """A descriptor for the directory `base/names[0]/names[1]/...`, each of `names` opened without following a
    symlink; OSError when one is a symlink, or anything but a directory. O_NOFOLLOW at the last name only
    guards that name: a symlink planted at a directory above it (a job's `checkpoints`, its directory) leads
    every path through it elsewhere, another job's files included."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names:
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


# The descriptors of the claims this process holds. A forked child (a DataLoader worker) shares each one's open
# file, and with it the lock: a job killed -9 stayed claimed until its workers noticed (up to 5 s), and its restart
# was refused as bad input, failed for good. The child closes its copies at the fork, so the lock is the holder's.
_HELD_CLAIMS: set[int] = set()


def _drop_claims_in_child() -> None:
    """In a forked child: let go of the parent's claims (closing a copy leaves the parent's lock as it is)."""
    for fd in _HELD_CLAIMS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_CLAIMS.clear()


os.register_at_fork(after_in_child=_drop_claims_in_child)


class ClaimedElsewhere(ValueError):
    """Another live process holds the claim: the same job id and rank run twice."""


def claim(directory: Path, name: str, what: str) -> int | None:
    """Hold `<directory>/.<name>.lock` (an exclusive flock) for as long as the returned descriptor stays open.

    One live process per job process file (`name`: its file stem) in a shared targets or job directory: a second
    one overwrote the first's target and mapping, and whichever ended first removed them, leaving the other
    unscraped and unattributed. ClaimedElsewhere (naming `what` and the holder's pid) when another process holds
    it; the kernel frees a dead holder's claim, kill -9 included, so a restart is never refused by a stale one.
    None on a filesystem that has no locks (the job runs unclaimed there).
    The name starts with '.' and does not end in .json: neither file_sd's *.json nor the exporter reads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".{name}.lock"
    while True:
        fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise ClaimedElsewhere(f"{what} is already running: pid {holder} announces it in {directory}") from None
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            unclaim(directory, name, None)      # a filesystem without locks: the job runs unclaimed, as before
            return None
        except BaseException:
            os.close(fd)
            raise
        # The holder before may have removed the file (unclaim) between our open and our lock: a lock on a file
        # no one else can open holds nothing. Start again on whatever is at the path now.
        try:
            now = os.stat(path, follow_symlinks=False)
            ours = os.fstat(fd)
            current = (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            except BaseException:       # (a full disk: the claim is not held, nor its descriptor left open)
                os.close(fd)
                raise
            _HELD_CLAIMS.add(fd)
            return fd
        os.close(fd)


def unclaim(directory: Path, name: str, fd: int | None) -> None:
    """Give a claim up: the file removed while still locked (a waiter that opened it sees it gone), then closed."""
    try:
        os.unlink(Path(directory) / f".{name}.lock")
    except OSError:
        pass    # gone, or its filesystem went read-only: a lock file left holds nothing once its descriptor closes
    if fd is not None:
        _HELD_CLAIMS.discard(fd)
        os.close(fd)


def replace_atomically(path: Path, text: str, *, mode: int = 0o600, durable: bool = False) -> None:
    """Write `text` to `path` atomically: a temp file in the same directory, then a rename over `path`.

    The temp file's name is unpredictable and it is created exclusively (mkstemp), so nothing planted in a
    shared directory (a FIFO that would block the writer, a symlink to a file of the writer's) can take its
    place; the rename replaces whatever sits at `path` itself, never what a symlink there points to. A
    directory at `path` still fails (IsADirectoryError), as any other real error does, and leaves no temp
    file behind. `durable`: as rename_durably (a power cut then leaves the old file or the new one, whole)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
        (rename_durably if durable else os.replace)(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def rename_durably(source: str | Path, path: Path) -> None:
    """Move the written file `source` over `path` (in the same directory) so that a power cut or a kernel crash
    after the return leaves the new file, whole: its data synced, the rename, then the directory synced (the
    file's fsync saves its data, not the name the rename gave it: without the directory's, a crash could still
    leave the old file, or none). `source` is reopened with open_regular: nothing planted at its name since the
    write (a symlink, a FIFO) is followed or waited on."""
    fd = open_regular(Path(source), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(source, path)
    sync_directory(Path(path).parent)


def sync_directory(directory: Path) -> None:
    """fsync a directory: the names renamed or created in it survive a crash from then on."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_result(path: Path, result: dict) -> None:
    """Write the job's result atomically and durably (temp file in the same dir, fsync, rename, fsync the dir):
    a result lost to a crash after the job ended failed the job ("ended without a result")."""
    replace_atomically(path, strict_json(result), durable=True)


def rank_result_path(path: Path, rank: int) -> Path:
    """Where rank `rank` (> 0) of a multi-rank job writes its own result, beside rank 0's (which speaks for the
    job): read only to say which rank failed first, and how."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def read_small(path: Path, limit: int) -> bytes | None:
    """A small file's bytes (a file of a shared job directory), or None: missing, not a regular file (a FIFO
    would block the reader, a symlink lead it elsewhere), unreadable or over `limit` bytes."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None


def read_small_text(path: Path, limit: int = 4096) -> str | None:
    """A small file's text (a control or request file), or None as read_small says."""
    data = read_small(path, limit)
    return data.decode("utf-8", "replace") if data is not None else None


def control_request(job_dir: Path) -> str | None:
    """The stop the job server asked for in the job's control file ("paused", "cancelled"), if any: read by a Ray
    launcher, and by a job server adopting a run whose workers had not started when the stop came."""
    text = (read_small_text(job_dir / CONTROL_FILE_NAME) or "").strip()
    return text if text in STOP_SIGNALS else None


def read_result(path: Path) -> dict | None:
    """The job's result, or None when there is none (not written yet, unreadable, not one of ours). A field its
    readers take as text, or the exit code, of another type reads as absent, as a field the result does not have;
    a lone surrogate in such a text is escaped (storable_text)."""
    data = read_small(path, MAX_RESULT_BYTES)
    if data is None:
        return None
    try:
        result = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(result, dict) or not isinstance(result.get("state"), str):
        return None
    # An edited result, or one not a trainer's (a dict for the error, 1e30 for the exit code), raised where the job
    # server recorded the run's end, at every tick: the job stayed `running` and no queued job started.
    odd = [name for name in RESULT_TEXT_FIELDS if name in result and not isinstance(result[name], (str, type(None)))]
    code = result.get("exit_code")
    if "exit_code" in result and (not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255):
        odd.append("exit_code")
    return {name: storable_text(value) if name in RESULT_TEXT_FIELDS and value is not None else value
            for name, value in result.items() if name not in odd}


def storable_text(text: str) -> str:
    """`text` with each lone surrogate escaped (`\\udcff`): JSON carries one (`"\\udcff"`: a trainer's error
    naming a path whose bytes are not UTF-8, as os.fsdecode gives it, strict_json escapes so), and SQLite refuses
    to store it: the run's end raised at every tick (the job stayed `running` and no queued job started), and at a
    restart the server did not start."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
