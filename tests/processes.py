"""Tests' subprocesses: finishing one whose pipes a test has read part of through their file objects, ending those a
test left running, and a real analytics service."""

import concurrent.futures
import contextlib
import subprocess
import sys
import time


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


def kill_left(processes) -> None:
    """A test's teardown of the processes it started: those still running (an assertion failed before they ended)
    are killed, and every one is reaped, what is left in its pipes read (a second communicate() of one whose pipes
    an earlier one closed raises: that one is only waited for)."""
    for process in processes:
        if process.poll() is None:
            process.kill()
        if any(pipe is not None and not pipe.closed for pipe in (process.stdout, process.stderr)):
            process.communicate()
        else:
            process.wait()


def wait_answering(url: str, process: subprocess.Popen, seconds: float, what: str, interval: float = 0.2) -> None:
    """Return once `url` answers over HTTP, whatever its status; AssertionError once `process` (serving it) has exited
    or `seconds` have passed."""
    import httpx

    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=5) as poller:     # one for every poll: httpx.get() builds a TLS context each time
        while True:
            try:
                poller.get(url)
                return
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, f"{what} did not start"
                time.sleep(interval)


@contextlib.contextmanager
def analytics_service(*flags: str, stderr=subprocess.DEVNULL):
    """A real `trainmetrics analytics` process with these flags, answering; yields its base URL (stopped after)."""
    from trainmetrics.prometheus_process import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "trainmetrics", "analytics", "--listen", f"127.0.0.1:{port}",
                                *flags], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_answering(f"http://127.0.0.1:{port}/healthz", process, 30, "analytics")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
