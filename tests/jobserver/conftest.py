"""The job server's fixtures: the executor the flows run on (local processes, or a real Ray cluster)."""

import importlib.util
import json
import time

import pytest


# The faults the Ray nodes give their ranks (a Ray job's processes have the nodes' environment, not the job
# server's): each names the one job of the tests it is for.
RAY_FAULTS = {"fail_start": {"rank": 1, "job": "failstart-1"}}


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on loopback, for the whole session (~12 s to start), its nodes with
    RAY_FAULTS."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'trainmetrics[ray]'; make test installs it)")
    from .ray_cluster import RayCluster

    cluster = RayCluster(env={"TRAINMETRICS_FAULTS": json.dumps(RAY_FAULTS)}).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["local", "ray"])
def executor(request) -> tuple[str, ...]:
    """The `trainmetrics server` arguments of each executor; the flows run on both."""
    if request.param == "local":
        return ()
    cluster = request.getfixturevalue("ray_cluster")
    return ("--executor", "ray", "--ray-address", cluster.dashboard)


def tick_until(supervisor, job_id: str, seconds: float):
    """Tick the supervisor (as the server does, if faster) until the job is no longer running or `seconds`
    passed; the job as it then stands."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        supervisor.tick()
        job = supervisor.store.get_job(job_id)
        if job.state != "running":
            return job
        time.sleep(0.05)
    return supervisor.store.get_job(job_id)
