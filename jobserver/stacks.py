"""`GET /api/training/jobs/{job_id}/stacks`: every rank's Python thread stacks, now.

Each rank of a running job writes its stacks to `<job dir>/stacks.rank<N>.txt` when it gets SIGUSR2
(trainer/watchdog.py; faulthandler writes from the signal handler, so a rank stuck in C, a collective or a
sleep answers too). The job server notes how long each file is, asks every rank through its executor, and
returns what each file gained once its dump has ended (`complete`: its last line seen, DUMP_END). A job that
is not running answers with the end of each file, every dump its runs wrote there, oldest first: its hang
watchdog's under a header, those taken on request without one (faulthandler writes them from the signal
handler, which can add none) (`fresh: false`).
"""

import asyncio
import os
import re
import stat
import time
from pathlib import Path

from trainmetrics.jobfiles import open_directory, open_regular, stacks_path

# How long the ranks get to answer.
ANSWER_SECONDS = 5.0
POLL_SECONDS = 0.05
# A whole dump ends with the main thread's outermost frame: faulthandler writes the threads newest first, so the
# main thread last, and every rank is a `python -m` program (`trainmetrics train`, alone, under torchrun or on
# Ray), whose outermost frame is runpy's. A file that stopped growing is no sign: faulthandler writes a dump in
# hundreds of small writes from the signal handler, and a rank on a loaded machine can be descheduled (or its
# write blocked) for longer than any pause between two of them.
DUMP_END = re.compile(rb" in _run_module_as_main\n\Z")
# The end of the first dump in what a file gained: a dump appended after it before the answer was read (the rank's
# own hang watchdog, a request after this one's ANSWER_SECONDS while another rank never answered) is another's.
FIRST_DUMP_END = re.compile(rb" in _run_module_as_main\n")
# How a dump begins: faulthandler's first thread line, or the hang watchdog's header. What a file gained that begins
# otherwise is the rest of a dump that was being written when the ranks were asked (a rank slow to answer the
# request before, or its own watchdog's): its end is not this request's.
DUMP_START = re.compile(rb"\n?(=== |Thread 0x|Current thread 0x|Stack \(most recent call first\))")
# The hang watchdog's dump, written whole in one append (its header, then every thread): one that lands inside a
# dump being written from the signal handler (a stacks request at the moment of the hang, as TrainerHang's is) is
# no part of it, and its end is not that dump's. Not its note after a faulthandler timer's dump (a header line
# alone, "the stacks above (after 'Timeout')"): one that landed between two of a request's threads read as a dump,
# and the request's last threads were cut with it.
WATCHDOG_DUMP = re.compile(rb"\n=== \S+ (?!the stacks above \(after 'Timeout'\))[^\n]*\n(Current thread|Thread) 0x")
ANY_DUMP_START = re.compile(rb"(Current thread|Thread) 0x|Stack \(most recent call first\)|Timeout \(")
# A dump that ends otherwise (a main thread deeper than faulthandler's 100 frames ends with "  ...") is taken as
# it is once its file has not grown for this long, marked incomplete.
QUIET_SECONDS = 2.0
# A watchdog dumps once a hang: more than this many inside one dump are a file its job's process wrote, and cutting
# each out copied all that the file gained (a 256 KiB file of tiny fake dumps held the event loop 0.16 s a poll).
MAX_CUT_DUMPS = 4
# At most this much of each rank's stacks is returned (a dump of a few hundred threads is far less).
MAX_STACK_BYTES = 256 * 1024
# What a rank's text may take of the answer's JSON: twice what was read, what the read's ASCII text takes at most
# (a quote, a backslash, a newline or a tab escaped in two bytes). Bounded at MAX_STACK_BYTES, a real dump read
# whole (faulthandler's ASCII, its lines' newlines and file names' quotes escaped: a few percent more) was cut.
MAX_STACK_JSON_BYTES = 2 * MAX_STACK_BYTES
# A rank's stacks file holding more than this is emptied before its rank is asked again: every request appends a
# dump (2.3 KB for a CPU trainer's threads, more with many), and a client asking every 5 s (the most that asks the
# ranks anew) added ~40 MB a day to each rank's file, without end. The rank writes with O_APPEND: its next dump
# starts the emptied file.
MAX_FILE_BYTES = 16 * 1024 * 1024


def stacks_file(job_path: Path, rank: int) -> Path:
    """Where a rank of the job writes its stacks (the trainer's --diagnostics-dir is the job's directory)."""
    return stacks_path(job_path, rank)


def _size(path: Path) -> int:
    """The stacks file's length; 0 (none written) for anything but a regular file of one name. The job's directory
    may hold what anyone put there: a symlink (to /etc/passwd), a hard link, a directory or a FIFO is no rank's
    stacks."""
    try:
        info = os.lstat(path)
    except OSError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 else 0


def _open_stacks_file(job_path: Path, rank: int, flags: int) -> int:
    """A descriptor for the rank's stacks file, only a regular file of no other name (a hard link a job's process
    planted there, to the server's database, was served, its last 256 KiB, and emptied when large) in a job
    directory that is no symlink; OSError otherwise."""
    directory = open_directory(job_path.parent, job_path.name)
    try:
        return open_regular(stacks_file(job_path, rank).name, flags, dir_fd=directory, one_name=True)
    finally:
        os.close(directory)


def _read(job_path: Path, rank: int, start: int, first_dump: bool = False) -> str | None:
    """The rank's stacks file from byte `start`, its last MAX_STACK_BYTES at most (with `first_dump`, only the first
    dump from there when it ends within them); None when it is not a regular file (any more: it may have been
    swapped since it was measured), cannot be read, or the job's directory is a symlink (a job's process can plant
    one: another owner's job's stacks were served through it)."""
    try:
        with os.fdopen(_open_stacks_file(job_path, rank, os.O_RDONLY), "rb") as file:
            if first_dump:
                file.seek(start)
                first = _first_dump(_past_a_dump_begun_before(file.read(MAX_STACK_BYTES)))
                if first is not None:
                    return _servable(first)
            end = file.seek(0, 2)
            file.seek(max(start, end - MAX_STACK_BYTES))
            # Not to the end: a job's process may append as fast as it likes, and the read chased the file's end.
            return _servable(file.read(MAX_STACK_BYTES))
    except OSError:
        return None


# Characters JSON escapes in six bytes (\u0000): every control character but the newline and the tab.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def _json_bytes(text: str) -> int:
    """What `text` takes in the answer's JSON (UTF-8, non-ASCII as is): its UTF-8 bytes and one escaping backslash
    for each quote, backslash, newline and tab (control characters are gone: _servable)."""
    return len(text.encode()) + sum(map(text.count, ('"', "\\", "\n", "\t")))


def _servable(raw: bytes) -> str:
    """A rank's stacks as served: decoded as UTF-8, anything else and every control character but the newline and
    the tab replaced by U+FFFD, and its tail whose JSON takes MAX_STACK_JSON_BYTES at most. faulthandler writes
    ASCII alone (a file name's other characters escaped), never cut so; a job's process can write what it likes,
    and 256 KiB of NUL bytes were 1.5 MiB of JSON (\u0000 each), 96 MiB for a 64-rank job's answer."""
    text = CONTROL.sub("\ufffd", raw.decode("utf-8", "replace"))
    if _json_bytes(text) <= MAX_STACK_JSON_BYTES:
        return text
    kept, cut = 0, len(text)           # the longest tail that fits, searched for: len(text) - cut characters
    while kept < cut:
        middle = (kept + cut + 1) // 2
        kept, cut = (middle, cut) if _json_bytes(text[-middle:]) <= MAX_STACK_JSON_BYTES else (kept, middle - 1)
    return text[len(text) - kept:]


def _first_dump(gained: bytes) -> bytes | None:
    """The first whole dump in what a file gained, less any hang watchdog's dump that landed inside it; None when
    it has not ended. Served as it was, a request's dump that the watchdog's split was cut at the watchdog's end:
    the request's first threads, then the watchdog's, marked complete."""
    for _ in range(MAX_CUT_DUMPS + 1):
        if (ended := FIRST_DUMP_END.search(gained)) is None:
            return None
        begun = gained.rfind(b"\n=== ", 0, ended.start())
        if begun <= 0 or not WATCHDOG_DUMP.match(gained, begun) or not ANY_DUMP_START.search(gained, 0, begun):
            return gained[:ended.end()]
        gained = gained[:begun] + gained[ended.end():]
    return None     # (not whole: served as the file's end, once it has not grown for QUIET_SECONDS)


def _past_a_dump_begun_before(gained: bytes) -> bytes:
    """What a file gained, less the rest of a dump begun before it (DUMP_START) when a whole dump follows that."""
    if DUMP_START.match(gained):
        return gained
    ended = FIRST_DUMP_END.search(gained)
    rest = b"" if ended is None else gained[ended.end():]
    return rest if FIRST_DUMP_END.search(rest) else gained


def sizes(job_path: Path, nproc: int) -> dict[int, int]:
    """Each rank's stacks file length now (0 for one not written yet)."""
    return {rank: _size(stacks_file(job_path, rank)) for rank in range(nproc)}


def make_room(job_path: Path, nproc: int) -> None:
    """Before the ranks are asked: empty each rank's stacks file that holds over MAX_FILE_BYTES."""
    for rank in range(nproc):
        if _size(stacks_file(job_path, rank)) > MAX_FILE_BYTES:
            _empty(job_path, rank)


def _empty(job_path: Path, rank: int) -> None:
    """Truncate the rank's stacks file to nothing, only a regular file in a job directory that is no symlink
    (the job's process may have planted one, pointing at another job's files)."""
    try:
        fd = _open_stacks_file(job_path, rank, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    except OSError:
        pass


async def collect(job_path: Path, before: dict[int, int], asked_at: float | None = None) -> dict:
    """What each rank's file gained since `before`, once its dump ended (or its file stopped growing for
    QUIET_SECONDS, or ANSWER_SECONDS passed); taken when the ranks were asked (`asked_at`, by default now)."""
    asked_at = time.time() if asked_at is None else asked_at
    deadline = time.monotonic() + ANSWER_SECONDS
    last = dict(before)
    grown_at: dict[int, float] = {}
    answered: set[int] = set()
    while time.monotonic() < deadline:
        now = time.monotonic()
        for rank in before:
            size = _size(stacks_file(job_path, rank))
            if size != last[rank]:
                last[rank], grown_at[rank] = size, now
        answered.update(rank for rank in before if rank not in answered and last[rank] > before[rank] and
                        _ends_a_dump(stacks_file(job_path, rank)) and _first_dump_ended(job_path, rank, before[rank]))
        waiting = [rank for rank in before if last[rank] <= before[rank] or
                   (now - grown_at[rank] < QUIET_SECONDS and rank not in answered)]
        if not waiting:
            break
        await asyncio.sleep(POLL_SECONDS)
    grown = {rank: start if last[rank] > start else None for rank, start in before.items()}
    # Off the event loop: 64 ranks' stacks at their bound are 16 MiB to read and decode (~70 ms).
    ranks, missing = await asyncio.to_thread(_answers, job_path, grown, True)
    return {"fresh": True, "taken_at": asked_at, "ranks": ranks, "missing_ranks": missing}


def _ends_a_dump(path: Path) -> bool:
    """True when the file's last line is a dump's last (DUMP_END)."""
    try:
        with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as file:
            file.seek(max(0, file.seek(0, 2) - 256))
            # 256 bytes, not to the end: read() chased a file its job's process extended after it was measured
            # (an ftruncate adds a GiB at once), all of it read into memory, on the event loop.
            return DUMP_END.search(file.read(256)) is not None
    except OSError:
        return False


def _first_dump_ended(job_path: Path, rank: int, start: int) -> bool:
    """Whether the first dump the rank's file gained from `start` has ended (read only once the file's last line
    ends a dump: that end may be a hang watchdog's dump that landed inside the request's, which goes on after it)."""
    try:
        with os.fdopen(_open_stacks_file(job_path, rank, os.O_RDONLY), "rb") as file:
            file.seek(start)
            return _first_dump(_past_a_dump_begun_before(file.read(MAX_STACK_BYTES))) is not None
    except OSError:
        return False


def earlier(job_path: Path, nproc: int) -> dict:
    """The end of each rank's stacks file, for a job with no process to ask."""
    written = {rank: 0 if _size(stacks_file(job_path, rank)) else None for rank in range(nproc)}
    ranks, missing = _answers(job_path, written)
    return {"fresh": False, "ranks": ranks, "missing_ranks": missing}


def _answers(job_path: Path, starts: dict[int, int | None], first_dump: bool = False) -> tuple[list[dict], list[int]]:
    """Each rank's stacks from its start offset (its first dump from there, with `first_dump`), and the missing
    ranks: those with nothing new (start None) and those whose file cannot be read as a regular file."""
    ranks, missing = [], []
    for rank, start in starts.items():
        stacks = None if start is None else _read(job_path, rank, start, first_dump)
        if stacks is None:
            missing.append(rank)
        else:
            ranks.append({"rank": rank, "stacks": stacks, "complete": DUMP_END.search(stacks.encode()) is not None})
    return ranks, missing
