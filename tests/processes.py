"""Finishing a test's subprocess whose pipes it has read part of through their file objects."""

import concurrent.futures
import subprocess


def finish_reading(process: subprocess.Popen, timeout: float | None = None) -> tuple[str | bytes | None, ...]:
    """Wait for process and return (stdout, stderr) as communicate() does (None for a stream not piped), read
    through the pipes' file objects: communicate() reads their descriptors, and what readline() or a `for line
    in process.stdout` had read ahead into a file object's buffer (every line in the pipe at the time) is lost.
    stdin is closed first, as communicate() does; the pipes are closed and let go, so a later communicate() (a
    fixture's teardown) only waits. Past `timeout` the process is killed (the reads end at its exit) and
    TimeoutExpired carries what it printed."""
    if process.stdin is not None:
        try:
            process.stdin.close()
        except BrokenPipeError:             # (it had exited)
            pass
    pipes = [process.stdout, process.stderr]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            reads = [pool.submit(pipe.read) if pipe is not None else None for pipe in pipes]
            try:
                concurrent.futures.wait([read for read in reads if read is not None], timeout=timeout)
                printed = tuple(read.result(timeout=0) if read is not None else None for read in reads)
            except concurrent.futures.TimeoutError:
                process.kill()          # the reads end at its exit
                printed = tuple(read.result() if read is not None else None for read in reads)
                process.wait()
                raise subprocess.TimeoutExpired(process.args, timeout, *printed) from None
    finally:
        for pipe in pipes:
            if pipe is not None:
                pipe.close()
        process.stdout = process.stderr = None
    process.wait(timeout=timeout)
    return printed
