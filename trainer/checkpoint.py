"""Atomic, weights-only-loadable checkpoints: temp file in the same dir, fsync, rename, fsync the dir.

A crash or a full disk mid-write leaves the previous checkpoint intact and no partial file under a
checkpoint name. Files hold only tensors, numbers, strings, lists and dicts, so
``torch.load(path, weights_only=True)`` loads them.
"""

import fcntl
import logging
import os
import secrets
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from trainmetrics.jobfiles import (FINAL_MODEL_NAME, Checkpoint, checkpoint_name, list_checkpoints, open_regular,
                                   sync_directory)

__all__ = ["FINAL_MODEL_NAME", "NoReadableCheckpoint", "atomic_save", "ensure_writable_dir", "list_checkpoints",
           "load_latest", "save_checkpoint"]

log = logging.getLogger("trainmetrics.trainer")


def ensure_writable_dir(directory: Path) -> Path:
    """Create the directory if needed, prove we can write into it (OSError otherwise), and remove temp
    files a writer killed mid-checkpoint left behind."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
        pass
    # (atomic_save's temp files: a checkpoint's, and the final model's, a full copy of the weights)
    for leftover in (*directory.glob(".step-*.tmp"), *directory.glob(f".{FINAL_MODEL_NAME}.*.tmp")):
        _remove_unless_being_written(leftover)
    return directory


def _remove_unless_being_written(leftover: Path) -> None:
    """Remove an atomic_save temp file no live writer holds. Its writer locks it while writing (the kernel drops
    the lock when the writer dies): a second start of the job on the directory (refused later, its job id claimed
    by the live process) removed the running job's checkpoint as it was written, and that job failed on the rename
    (FileNotFoundError). Only a regular file is one of ours (open_regular): a FIFO planted at such a name in a
    shared directory blocked the open, and the job's start, for good; a directory failed every start as bad input
    (unlink: `Is a directory`)."""
    try:
        fd = open_regular(leftover, os.O_RDONLY)
    except OSError:         # gone already, or no file of ours (a link, a FIFO, a directory)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:     # being written
            return
        except OSError:             # a filesystem without locks (NFS without a lock manager): as before
            pass
        leftover.unlink(missing_ok=True)
    finally:
        os.close(fd)


def atomic_save(obj, path: Path) -> Path:
    """torch.save `obj` to `path` atomically and durably."""
    import torch   # here, not at import: the job server lists checkpoints without loading torch

    path = Path(path)
    # Exclusive and unpredictable, as mkstemp's, but with the mode the umask gives (torch.save's): mkstemp's 0600
    # made a team's shared checkpoint directory hold weights no one else could load.
    tmp_name = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        _lock_while_writing(fd)
        with os.fdopen(fd, "wb") as handle:
            try:
                torch.save(obj, handle)
            except RuntimeError as error:
                # A write that failed (a full disk) is torch's "[enforce fail at inline_container.cc:672] .
                # unexpected pos N vs M", the OSError saying why only its context: the job failed naming neither.
                if isinstance(error.__context__, OSError):
                    raise error.__context__ from None
                raise
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp_name, path)      # still open, so still locked: a cleanup cannot take it before
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    sync_directory(path.parent)
    return path


def _lock_while_writing(fd: int) -> None:
    """Lock a temp file being written, so that ensure_writable_dir leaves it (the lock goes with the descriptor)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:     # no locks on this filesystem: written unlocked, as before
        pass


def save_checkpoint(directory: Path, state: dict, keep: int = 3) -> Checkpoint:
    """Write state (must hold 'step') as the newest checkpoint and prune all but the newest `keep` up to it. One
    of a later step is none of this run's line (a file that did not load, or another job's, which the resume
    skipped): it neither counts nor goes. Counted, it made each of the run's checkpoints go as it was written,
    and the next resume found none that loads."""
    step = int(state["step"])
    path = atomic_save(state, Path(directory) / checkpoint_name(step))
    if keep > 0:
        for old in [checkpoint for checkpoint in list_checkpoints(directory) if checkpoint.step <= step][:-keep]:
            old.path.unlink(missing_ok=True)
    return Checkpoint(path, step)


def _misnamed(state: dict, step: int) -> str | None:
    """Why a checkpoint's contents are not the step its name says, or None. Names order checkpoints: a file copied or
    renamed to a later step's name (`step-999999999999999999.pt` holding step 10) was resumed from as the newest on
    every resume, the run's own later checkpoints passed over, and was never pruned (none of the run's line)."""
    if "step" not in state:
        return None     # foreign() says what it lacks
    written = state["step"]
    if isinstance(written, int) and not isinstance(written, bool) and written == step:
        return None
    return f"it holds step {str(written)[:40]}, not the {step} its name says"


def _compressed_entry(path: Path) -> str | None:
    """The name of an entry of the checkpoint's zip archive that is compressed, if one is. torch.save stores every
    entry as it is, and torch.load inflates what it finds: a file planted in a checkpoint directory, 290 KB of one
    deflated tensor, took 300 MB of the resuming process's memory (the OOM killer's, for a larger one, at every
    resume). Not a zip archive (truncated, another format): torch.load says what it is. So for whatever else
    zipfile refuses in a damaged file: a "version needed to extract" past its own raised NotImplementedError out
    of load_latest, the resume failed whole where torch.load (miniz, which ignores that field) loaded the file,
    and any failure of it only sends the resume to the checkpoint before."""
    try:
        with zipfile.ZipFile(path) as archive:
            return next((entry.filename[:80] for entry in archive.infolist()
                         if entry.compress_type != zipfile.ZIP_STORED), None)
    except Exception:       # (BadZipFile, OSError, ValueError: a negative offset, NotImplementedError, EOFError...)
        return None


class NoReadableCheckpoint(RuntimeError):
    """Checkpoints are there and none of them loads: resuming would silently train again from step 0."""


def load_latest(directory: Path, map_location="cpu", foreign: Callable[[dict], str | None] = lambda state: None
                ) -> dict | None:
    """The newest checkpoint that loads and is the job's; a corrupt newest file, one holding another step than its
    name says, or one `foreign` says is another job's (its reason), falls back to the one before it (said in the
    log). None when there is none; NoReadableCheckpoint when there are some and none of them loads as the job's."""
    import torch

    checkpoints = list_checkpoints(directory)
    for checkpoint in reversed(checkpoints):
        if compressed := _compressed_entry(checkpoint.path):
            log.warning("checkpoint %s holds a compressed entry (%s), which torch.save never writes: not a "
                        "checkpoint of a trainer; trying the one before it", checkpoint.path, compressed)
            continue
        try:
            state = torch.load(checkpoint.path, map_location=map_location, weights_only=True)
        except Exception as error:      # truncated or corrupt: try the previous one
            # (its first sentence: torch's goes on to suggest loading untrusted files with weights_only=False)
            reason = " ".join(str(error).split()).split(". ")[0][:200]
            log.warning("checkpoint %s cannot be loaded (%s: %s); trying the one before it", checkpoint.path,
                        type(error).__name__, reason)
            continue
        if not isinstance(state, dict):
            whose = "not a checkpoint"
        else:
            whose = _misnamed(state, checkpoint.step) or foreign(state)
        if whose is None:
            return state
        log.warning("checkpoint %s is not this job's (%s); trying the one before it", checkpoint.path, whose)
    if checkpoints:
        raise NoReadableCheckpoint(f"none of the {len(checkpoints)} checkpoints in {directory} loads as this "
                                   "job's: remove them to train afresh")
    return None
