"""The stacks route's reading of the ranks' dumps: a dump is served whole, however its writer is paced."""

import asyncio
import io
import os
import subprocess
import sys
import threading
import time

from trainmetrics.jobserver import stacks

# A program run as `python -m`, as every rank is, dumping all its threads as the signal handler does.
DUMPER = """
import faulthandler, sys, threading, time
threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
"""


def real_dump(tmp_path) -> bytes:
    (tmp_path / "dumper.py").write_text(DUMPER)
    return subprocess.run([sys.executable, "-m", "dumper"], cwd=tmp_path, capture_output=True, check=True).stdout


def write_in_pieces(path, pieces, pause):
    def write():
        with open(path, "ab") as file:
            for piece in pieces:
                file.write(piece)
                file.flush()
                time.sleep(pause)
    writer = threading.Thread(target=write)
    writer.start()
    return writer


def test_a_dump_whose_writer_pauses_mid_line_is_served_whole(tmp_path):
    """A rank descheduled mid-dump for longer than 0.2 s was taken as done: the answer cut its stacks
    mid-line (`File `), and the main thread, the one that shows where it was, was never served."""
    dump = real_dump(tmp_path)
    assert dump.count(b"(most recent call first)") == 2 and stacks.DUMP_END.search(dump)
    (tmp_path / "stacks.rank0.txt").write_bytes(b"an earlier dump\n")
    before = stacks.sizes(tmp_path, 1)
    middle = dump.index(b"  File ") + len(b"  File ")
    writer = write_in_pieces(tmp_path / "stacks.rank0.txt", [dump[:middle], dump[middle:]], pause=0.8)
    answer = asyncio.run(stacks.collect(tmp_path, before))
    writer.join()
    assert answer["missing_ranks"] == []
    assert answer["ranks"] == [{"rank": 0, "stacks": dump.decode(), "complete": True}]


def test_a_dump_that_never_reaches_its_end_is_served_marked_incomplete(tmp_path, monkeypatch):
    monkeypatch.setattr(stacks, "QUIET_SECONDS", 0.3)
    dump = real_dump(tmp_path)
    cut = dump[:dump.rindex(b"  File ")]
    before = stacks.sizes(tmp_path, 1)
    write_in_pieces(tmp_path / "stacks.rank0.txt", [cut], pause=0).join()
    answer = asyncio.run(stacks.collect(tmp_path, before))
    assert answer["ranks"] == [{"rank": 0, "stacks": cut.decode(), "complete": False}]


def test_a_stopped_jobs_stacks_say_whether_their_last_dump_is_whole(tmp_path):
    dump = real_dump(tmp_path)
    (tmp_path / "stacks.rank0.txt").write_bytes(dump)
    (tmp_path / "stacks.rank1.txt").write_bytes(dump[:-20])
    answer = stacks.earlier(tmp_path, 2)
    assert [(rank["rank"], rank["complete"]) for rank in answer["ranks"]] == [(0, True), (1, False)]


def test_a_job_directory_replaced_by_a_symlink_shows_no_other_jobs_stacks(tmp_path):
    """A job's own process can replace its job directory with a symlink to another owner's job's: its stacks
    endpoint then served that job's stacks (file names, code, arguments), only the file's own name guarded."""
    other, planted = tmp_path / "jobs" / "bob-j1", tmp_path / "jobs" / "alice-j1"
    other.mkdir(parents=True)
    (other / "stacks.rank0.txt").write_bytes(real_dump(tmp_path))
    planted.symlink_to(other.name)
    answer = stacks.earlier(planted, 1)
    assert answer["ranks"] == [] and answer["missing_ranks"] == [0], answer
    assert stacks.earlier(other, 1)["ranks"], "the job's own directory is read"


def test_a_stacks_file_growing_while_it_is_read_is_read_to_its_bound(tmp_path, monkeypatch):
    """A job's process can append to its stacks file as fast as it likes: the read went on to the file's end as it
    grew after it was measured, past MAX_STACK_BYTES (the server's memory and the answer both unbounded: one try
    with a writer appending 1 MiB pieces read 3 GB). Here the writer appends a MiB once the read has seeked."""
    job_path = tmp_path / "jobs" / "grows"
    job_path.mkdir(parents=True)
    path = stacks.stacks_file(job_path, 0)
    path.write_bytes(b"x" * stacks.MAX_STACK_BYTES)
    real_fdopen = os.fdopen

    class AppendedAfterSeek(io.BufferedReader):
        def seek(self, *args):
            at = super().seek(*args)
            if args[1:] != (2,):          # the seek to where the read starts: the writer appends now
                with open(path, "ab") as writer:
                    writer.write(b"y" * (1 << 20))
            return at

    monkeypatch.setattr(stacks.os, "fdopen", lambda fd, mode: AppendedAfterSeek(real_fdopen(fd, "rb", buffering=0)))
    read = stacks._read(job_path, 0, 0)
    assert read is not None and len(read) == stacks.MAX_STACK_BYTES and set(read) == {"x"}


def test_a_stacks_file_over_its_bound_is_emptied_and_the_ranks_next_dump_starts_it(tmp_path, monkeypatch):
    """Every request appends a dump to each rank's file, none was ever removed: a client asking every 5 s added
    ~40 MB a day to each rank's file, without end. The rank's descriptor appends (O_APPEND), so its next dump
    starts the emptied file."""
    import faulthandler

    from trainmetrics.trainer.watchdog import open_stacks_file

    monkeypatch.setattr(stacks, "MAX_FILE_BYTES", 4096)
    file, _, _ = open_stacks_file(tmp_path, 0)
    with file:
        file.write("an old dump\n" * 400)
        file.flush()
        stacks.make_room(tmp_path, 1)
        assert stacks.sizes(tmp_path, 1) == {0: 0}
        faulthandler.dump_traceback(file=file, all_threads=False)
    written = (tmp_path / "stacks.rank0.txt").read_text()
    assert written.startswith("Stack (most recent call first):") and "an old dump" not in written
    file, _, _ = open_stacks_file(tmp_path, 0)      # under the bound: kept
    with file:
        file.write("kept\n")
    stacks.make_room(tmp_path, 1)
    assert (tmp_path / "stacks.rank0.txt").read_text().endswith("kept\n")


def test_a_planted_stacks_file_is_not_emptied(tmp_path, monkeypatch):
    """A rank's file that is a symlink (to another job's file), or a job directory that is one, is never truncated."""
    monkeypatch.setattr(stacks, "MAX_FILE_BYTES", 10)
    other = tmp_path / "other-job"
    other.mkdir()
    (other / "stacks.rank0.txt").write_text("another job's stacks\n")
    job = tmp_path / "job"
    job.mkdir()
    (job / "stacks.rank0.txt").symlink_to(other / "stacks.rank0.txt")
    (tmp_path / "linked-job").symlink_to(other)
    stacks.make_room(job, 1)
    stacks.make_room(tmp_path / "linked-job", 1)
    assert (other / "stacks.rank0.txt").read_text() == "another job's stacks\n"


def test_a_stacks_file_extended_while_its_end_is_checked_is_read_only_at_its_end(tmp_path, monkeypatch):
    """The check whether a rank's dump has ended (polled on the event loop while the file grows) read from 256
    bytes before the end it measured to the file's end as it was by then: a job's process extending its file
    (an ftruncate adds a GiB at once) had all of it read into the server's memory. Here the file gains a MiB
    once the check has seeked."""
    path = stacks.stacks_file(tmp_path, 0)
    path.write_bytes(b"x" * 4096 + b'  File "<frozen runpy>", line 198 in _run_module_as_main\n')
    real_fdopen, read = os.fdopen, []

    class ExtendedAfterSeek(io.BufferedReader):
        def seek(self, *args):
            at = super().seek(*args)
            if args[1:] != (2,):          # the seek to where the check reads: the job's process extends it now
                os.truncate(path, os.path.getsize(path) + (1 << 20))
            return at

        def read(self, *args):
            read.append(super().read(*args))
            return read[-1]

    monkeypatch.setattr(stacks.os, "fdopen", lambda fd, mode: ExtendedAfterSeek(real_fdopen(fd, "rb", buffering=0)))
    assert stacks._ends_a_dump(path)
    assert [len(data) for data in read] == [256]


def test_an_answer_holds_only_the_dump_its_request_asked_for(tmp_path, monkeypatch):
    """A rank that answered and then dumped again before the answer was read (its own hang watchdog's dump, or
    a request after this one's 5 s while another rank never answered) had both dumps served as its one answer,
    under the first one's `taken_at`."""
    monkeypatch.setattr(stacks, "ANSWER_SECONDS", 1.0)
    dump = real_dump(tmp_path)
    before = stacks.sizes(tmp_path, 2)                  # rank 1 never answers: the answer waits its whole time
    watchdogs = b"\n=== 2026-12-07T01:00:00+0000 no progress for 60 s\n" + dump
    write_in_pieces(tmp_path / "stacks.rank0.txt", [dump, watchdogs], pause=0.3).join()
    answer = asyncio.run(stacks.collect(tmp_path, before))
    assert answer["missing_ranks"] == [1]
    assert answer["ranks"] == [{"rank": 0, "stacks": dump.decode(), "complete": True}]


def test_the_rest_of_a_dump_half_written_when_the_ranks_were_asked_is_not_the_answer(tmp_path):
    """A rank still writing an earlier dump when its file was measured (slow to answer the request before, or its
    own hang watchdog's) had that dump's tail served as its answer, marked complete: the stacks of before."""
    job = tmp_path / "job"
    job.mkdir()
    earlier = b'Thread 0xEARLIER (most recent call first):\n  File "/old.py", line 1 in wait\n' \
              b'  File "<frozen runpy>", line 88 in _run_module_as_main\n'
    (job / "stacks.rank0.txt").write_bytes(earlier[:40])
    before = stacks.sizes(job, 1)
    answer = real_dump(tmp_path)
    with open(job / "stacks.rank0.txt", "ab") as file:
        file.write(earlier[40:] + answer)
    served = asyncio.run(stacks.collect(job, before))["ranks"][0]
    assert served["stacks"] == answer.decode() and served["complete"]


def test_a_hang_watchdogs_dump_landing_inside_a_requests_dump_is_left_out_of_its_answer(tmp_path):
    """The hang watchdog and TrainerHang's request dump at the same moment: the watchdog's dump (one append) lands
    mid-line inside the request's, written from the signal handler in pieces. The answer was cut at the watchdog's
    end, before the request's dump went on: its first threads, then the watchdog's, served as complete."""
    dump = real_dump(tmp_path)
    watchdogs = b"\n=== 2026-12-07T01:00:00+0000 no step completed for 60 s (phase compute)\n" + dump
    middle = dump.index(b"  File ") + len(b"  File ")
    before = stacks.sizes(tmp_path, 1)
    write_in_pieces(tmp_path / "stacks.rank0.txt", [dump[:middle], watchdogs, dump[middle:]], pause=0.3).join()
    answer = asyncio.run(stacks.collect(tmp_path, before))
    assert answer["ranks"] == [{"rank": 0, "stacks": dump.decode(), "complete": True}]


def test_the_watchdogs_note_between_two_of_a_requests_threads_is_not_taken_for_a_dump(tmp_path):
    """The watchdog's note after a faulthandler timer's dump is a header line alone: landed between two of a
    request's threads, it read as a watchdog's dump, cut out with the request's last threads; the answer ran on
    into the dump after it (the watchdog's next), served as the request's, complete."""
    dump = real_dump(tmp_path)
    note = b"\n=== 2026-12-07T01:00:00+0000 the stacks above (after 'Timeout'): no step completed for 60 s\n"
    between = dump.index(b"Thread 0x", 1) if dump.startswith(b"Current") else dump.index(b"Current thread 0x")
    request = dump[:between] + note + dump[between:]
    watchdogs = b"\n=== 2026-12-07T01:00:05+0000 no step completed for 65 s (phase compute)\n" + dump
    before = stacks.sizes(tmp_path, 1)
    write_in_pieces(tmp_path / "stacks.rank0.txt", [request + watchdogs], pause=0).join()
    answer = asyncio.run(stacks.collect(tmp_path, before))
    assert answer["ranks"] == [{"rank": 0, "stacks": request.decode(), "complete": True}]


class CountingSearches:
    """A pattern that counts its searches."""

    def __init__(self, pattern):
        self.pattern, self.searches = pattern, 0

    def search(self, *args):
        self.searches += 1
        return self.pattern.search(*args)


def test_a_file_of_many_tiny_watchdog_dumps_is_not_cut_one_by_one(tmp_path, monkeypatch):
    """A job's process can write what it likes to its stacks file: 256 KiB of tiny fake watchdog dumps inside one
    dump were cut out one at a time, each cut copying all the file gained (thousands of times, every poll, on the
    server's event loop)."""
    fake = b"\n=== 2026-12-07T01:00:00+0000 x\nThread 0x1 in _run_module_as_main\n"
    (tmp_path / "stacks.rank0.txt").write_bytes(b"Thread 0x2\n" + fake * (200 * 1024 // len(fake)))
    ends = CountingSearches(stacks.FIRST_DUMP_END)
    monkeypatch.setattr(stacks, "FIRST_DUMP_END", ends)
    stacks._read(tmp_path, 0, 0, first_dump=True)
    assert ends.searches < 20


def test_a_stacks_file_of_control_bytes_and_no_utf_8_is_served_within_its_bound_as_json(tmp_path):
    """A job's process can fill its stacks files with what it likes: 256 KiB of NUL bytes were 1.5 MiB of the
    answer's JSON (`\\u0000` each), and bytes that are no UTF-8 3 bytes each (U+FFFD): 96 MiB for a 64-rank job.
    The answer as the route sends it (Starlette's JSONResponse) holds MAX_STACK_JSON_BYTES of each rank at most
    (twice the read: the read's ASCII text, escaped, fits), its tail, newlines, tabs and a real dump's text kept."""
    from starlette.responses import JSONResponse

    dump = real_dump(tmp_path)
    hostile = {0: b"\0" * stacks.MAX_STACK_BYTES, 1: b"\xff" * stacks.MAX_STACK_BYTES,
               2: b'"\\\n\t' * (stacks.MAX_STACK_BYTES // 4), 3: b"\0\x1b\x7f" * 1000 + dump}
    for rank, content in hostile.items():
        (tmp_path / f"stacks.rank{rank}.txt").write_bytes(content)
    answer = stacks.earlier(tmp_path, len(hostile))
    for rank in answer["ranks"]:
        served = len(JSONResponse(rank["stacks"]).body)
        assert served <= stacks.MAX_STACK_JSON_BYTES + 2, (rank["rank"], served)      # (+2: the string's quotes)
    texts = {rank["rank"]: rank["stacks"] for rank in answer["ranks"]}
    assert set(texts[0]) == set(texts[1]) == {"\ufffd"} and len(texts[1]) == stacks.MAX_STACK_JSON_BYTES // 3
    assert texts[2].endswith('"\\\n\t') and len(texts[2]) == stacks.MAX_STACK_BYTES      # all escaped: it fits
    assert texts[3] == "\ufffd" * 3000 + dump.decode()                  # fits: cut nowhere, the dump as it is


# A program run as `python -m`, its threads each deep in a recursion (past faulthandler's 100 frames), dumping
# them all as a rank's signal handler does; its size: the number of threads.
DEEP_DUMPER = """
import faulthandler, sys, threading

threads = int(sys.argv[1])
ready, done = threading.Barrier(threads + 1), threading.Event()

def down(depth):
    if depth:
        return down(depth - 1)
    ready.wait()
    done.wait()

for _ in range(threads):
    threading.Thread(target=down, args=(120,), daemon=True).start()
ready.wait()
faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
"""


def deep_dump(tmp_path, threads: int) -> bytes:
    (tmp_path / "deep_dumper.py").write_text(DEEP_DUMPER)
    return subprocess.run([sys.executable, "-m", "deep_dumper", str(threads)], cwd=tmp_path, capture_output=True,
                          check=True).stdout


def test_a_real_dump_that_fits_the_read_is_served_whole(tmp_path):
    """A dump of many deep threads within the MAX_STACK_BYTES read (faulthandler's ASCII) takes a few percent more
    in JSON (each line's newline and its file name's quotes escaped): bounded at MAX_STACK_BYTES of JSON, such a
    real dump, whole in the read, was served cut mid-line at its head, its first threads gone, and still marked
    complete."""
    one, two = len(deep_dump(tmp_path, 1)), len(deep_dump(tmp_path, 2))
    dump = deep_dump(tmp_path, 1 + (stacks.MAX_STACK_BYTES - one) // (two - one))
    assert len(dump) <= stacks.MAX_STACK_BYTES < stacks._json_bytes(dump.decode())       # the case in question
    before = stacks.sizes(tmp_path, 1)
    (tmp_path / "stacks.rank0.txt").write_bytes(dump)
    answer = asyncio.run(stacks.collect(tmp_path, before))
    assert answer["ranks"] == [{"rank": 0, "stacks": dump.decode(), "complete": True}]
