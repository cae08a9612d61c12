"""The Ray executor's reading of Ray's errors (error mapping only: a stand-in for the Jobs API client). Ray
answering "no such submission" (404: its head restarted, the run died with it) ends a run; Ray not answering
(its head or dashboard down, the network) leaves a run running: adopted, not started twice, stoppable through
its control file, and said once a minute, not at every poll. The flows themselves run on a real Ray head in
test_server.py."""

import logging

import pytest
import requests

from trainmetrics.jobfiles import CONTROL_FILE_NAME
from trainmetrics.jobserver.executors import Run
from trainmetrics.jobserver.ray_executor import RayExecutor

GONE = RuntimeError("Request failed with status code 404: Job ray-1 does not exist.")
UNREACHABLE = requests.exceptions.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=8265): Max retries "
                                                  "exceeded with url: /api/jobs/ray-1 " + "(Connection refused) " * 20)


class Unanswering:
    """A Jobs API client whose every question raises `error`."""

    def __init__(self, error: Exception):
        self.error = error

    def get_job_status(self, submission):
        raise self.error

    def get_job_info(self, submission):
        raise self.error


def executor(error: Exception) -> RayExecutor:
    ray = RayExecutor("http://127.0.0.1:8265")
    ray._client = Unanswering(error)
    return ray


def test_a_submission_ray_no_longer_knows_has_ended(tmp_path):
    ray, run = executor(GONE), Run("job-1", "ray-1", tmp_path)
    assert ray.adopt("job-1", "ray-1", tmp_path) is None
    assert ray.poll(run) == (True, None)
    assert ray.signal(run, "cancelled") is False
    assert not (tmp_path / CONTROL_FILE_NAME).exists()


def test_a_ray_that_does_not_answer_leaves_its_runs_running_and_stoppable(tmp_path, caplog):
    ray, run = executor(UNREACHABLE), Run("job-1", "ray-1", tmp_path)
    adopted = ray.adopt("job-1", "ray-1", tmp_path)       # a server restarted in an outage: not run twice
    assert adopted is not None and adopted.handle == "ray-1"
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            ray._polled.clear()                           # as if a poll interval had passed each time
            assert ray.poll(run) == (False, None)
    said = [record.getMessage() for record in caplog.records if "did not answer" in record.getMessage()]
    assert len(said) == 2                                 # the adoption's and the first poll's; one line each
    assert all(len(line) < 400 and "\n" not in line for line in said)
    assert ray.signal(run, "paused") is True              # reaches the launcher through the shared file
    assert (tmp_path / CONTROL_FILE_NAME).read_text() == "paused"


@pytest.mark.parametrize("error", [GONE, UNREACHABLE], ids=["gone", "unreachable"])
def test_a_run_ray_reports_finished_after_an_outage_is_polled_afresh(error, tmp_path):
    ray, run = executor(error), Run("job-1", "ray-1", tmp_path)
    ray.poll(run)
    ray._polled.clear()
    ray._client = Unanswering(GONE)
    assert ray.poll(run) == (True, None)
    assert ray._polled == {} and ray._unanswered_said == {}
