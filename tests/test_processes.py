"""finish_reading: what readline() read ahead is not lost, as it is with communicate()."""

import subprocess
import sys

import pytest

from tests.processes import finish_reading

# Two lines in one write (one read of the pipe takes both), then an exit once stdin closes.
TWO_LINES = "import sys\nsys.stdout.write('first\\nsecond\\n'); sys.stdout.flush()\nsys.stdin.read()\n"


def started(then: str = "") -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", TWO_LINES + then], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "first\n"      # "second\n" waits in the file object's buffer
    return process


def test_communicate_loses_the_line_readline_read_ahead():
    process = started()
    assert process.communicate(timeout=30) == ("", "")     # it reads the descriptor: the pipe is empty


def test_finish_reading_returns_the_line_readline_read_ahead_and_lets_the_pipes_go():
    process = started()
    assert finish_reading(process, timeout=30) == ("second\n", "")
    assert process.returncode == 0 and process.stdout is None and process.stderr is None
    assert process.communicate() == (None, None)            # a teardown's communicate() only waits


def test_finish_reading_kills_a_process_past_its_timeout_and_keeps_what_it_printed():
    process = started(then="import time\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired) as expired:
        finish_reading(process, timeout=0.5)
    assert (expired.value.output, expired.value.stderr) == ("second\n", "")
    assert process.returncode == -9
