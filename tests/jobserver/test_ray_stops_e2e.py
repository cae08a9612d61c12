"""Stops of a job on a real Ray cluster that do not come through the job API's happy path: Ray's own stop of the
submission, a stop while Ray cannot place the ranks, and a rank killed by a signal."""

import signal
import time

import psutil
import pytest

from .server_process import Server, wait_job


@pytest.fixture
def ray_server(tmp_path, ray_cluster):
    server = Server(tmp_path, extra=("--executor", "ray", "--ray-address", ray_cluster.dashboard)).start()
    yield server, ray_cluster
    server.stop()


def submit(server: Server, job_id: str, **spec) -> None:
    body = {"job_id": job_id, "dataset": "digits", "epochs": 5000, "log_every": 10, **spec}
    response = server.client().post("/api/training/jobs", json=body)
    assert response.status_code == 201, response.text


def wait_training(server: Server, job_id: str, timeout: float = 120) -> None:
    log = server.data_dir / "jobs" / job_id / "train.log"
    deadline = time.monotonic() + timeout
    while not (log.exists() and "step=" in log.read_text()):
        assert time.monotonic() < deadline, f"{job_id} did not train within {timeout} s"
        time.sleep(0.2)


def test_rays_own_stop_of_the_submission_cancels_the_job_after_a_checkpoint(ray_server):
    """`ray job stop` killed the launcher (ray.init had put its handler over ours): the job failed, its ranks
    killed without a checkpoint."""
    from ray.job_submission import JobSubmissionClient

    server, cluster = ray_server
    submit(server, "raystop-1")
    wait_training(server, "raystop-1")
    ray = JobSubmissionClient(cluster.dashboard)
    job_dir = str(server.data_dir / "jobs" / "raystop-1")
    [submission] = [job.submission_id for job in ray.list_jobs() if job_dir in job.entrypoint]
    ray.stop_job(submission)
    ended = wait_job(server.client(), "raystop-1", lambda job: job["state"] != "running", timeout=60)
    assert (ended["state"], ended["exit_code"]) == ("cancelled", 3), ended
    assert "cancel requested, checkpointing and stopping" in (server.data_dir / "jobs" / "raystop-1" /
                                                                "train.log").read_text()


def test_a_job_ray_cannot_place_says_so_and_stops_at_once_when_cancelled(ray_server):
    """Three ranks on a two-CPU cluster: `running` with nothing behind it (the job API said nothing of the wait,
    Prometheus had no state of the job), a pause never carried out, a cancel that waited out the 60 s grace and
    its kill."""
    server, _ = ray_server
    submit(server, "unplaced-1", nproc=3)
    client = server.client()
    log = server.data_dir / "jobs" / "unplaced-1" / "train.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and "waiting for Ray to place 3 rank(s)" in log.read_text()):
        assert time.monotonic() < deadline, "the launcher never said it waits for a placement"
        time.sleep(0.2)
    assert "fewer than the job needs" in log.read_text()
    job = client.get("/api/training/jobs/unplaced-1").json()
    assert job["state"] == "running", job
    assert job["waiting_for"] == ("Ray to place 3 rank(s), one CPU and one GPU each: the cluster has 2 CPU(s) and "
                                  "2 GPU(s) in all, fewer than the job needs"), job
    # No process publishes the job's state: the server does, queued (as the goodput ledger counts the wait).
    wait_for_text(client, 'trainer_job_state{job_id="unplaced-1",state="queued"} 1.0')
    asked = time.monotonic()
    assert client.post("/api/training/jobs/unplaced-1/cancel").status_code == 202
    ended = wait_job(client, "unplaced-1", lambda job: job["state"] != "running", timeout=50)
    assert (ended["state"], ended["exit_code"], ended["waiting_for"]) == ("cancelled", 3, None), ended
    assert time.monotonic() - asked < 30          # not the grace's kill
    assert not (server.data_dir / "jobs" / "unplaced-1" / "placement.wait").exists()
    wait_for_text(client, 'trainer_job_state{job_id="unplaced-1",state="cancelled"} 1.0')


def test_the_stacks_of_a_job_ray_has_not_placed_are_answered_at_once(ray_server):
    """A running job with no rank yet (Ray placing its ranks) had the stacks request sent to no process: the
    route waited out its 5 s for ranks that do not exist and said every rank `missing` from a `fresh` dump. It
    answers at once what earlier runs wrote, as for a local job whose processes have not started."""
    server, _ = ray_server
    submit(server, "unplaced-stacks", nproc=3)
    client = server.client()
    wait_job(client, "unplaced-stacks", lambda job: job["waiting_for"] is not None, timeout=60)
    asked = time.monotonic()
    answer = client.get("/api/training/jobs/unplaced-stacks/stacks")
    took = time.monotonic() - asked
    assert client.post("/api/training/jobs/unplaced-stacks/cancel").status_code == 202
    assert answer.status_code == 200, answer.text
    stacks = answer.json()
    assert (stacks["state"], stacks["fresh"], stacks["ranks"]) == ("running", False, []), stacks
    assert stacks["missing_ranks"] == [0, 1, 2], stacks
    assert took < 2, f"answered in {took:.1f} s"
    wait_job(client, "unplaced-stacks", lambda job: job["state"] != "running", timeout=50)


def wait_for_text(client, line: str, timeout: float = 10) -> None:
    """Wait until the server's /metrics holds `line` (it lists the jobs without a process once a tick)."""
    deadline = time.monotonic() + timeout
    while line not in client.get("/metrics").text.splitlines():
        assert time.monotonic() < deadline, f"not in the server's /metrics: {line}"
        time.sleep(0.2)


def rank0_process(server, job_id: str) -> psutil.Process:
    """The job's rank 0 trainer process (not its Ray launcher)."""
    job_dir = str(server.data_dir / "jobs" / job_id)
    [rank0] = [p for p in psutil.process_iter(["cmdline"]) if "train" in (p.info["cmdline"] or [])
               and job_dir in " ".join(p.info["cmdline"] or []) and "ray_launch" not in " ".join(p.info["cmdline"])]
    return rank0


def test_a_rank_killed_by_a_signal_is_said_as_that_signal(ray_server):
    """The launcher exited with sys.exit(-9): "exit code 247 without a result"."""
    server, _ = ray_server
    submit(server, "killed-1")
    wait_training(server, "killed-1")
    rank0 = rank0_process(server, "killed-1")
    rank0.send_signal(signal.SIGKILL)
    ended = wait_job(server.client(), "killed-1", lambda job: job["state"] != "running", timeout=60)
    assert (ended["state"], ended["exit_code"], ended["error"]) == ("failed", -9, "killed by SIGKILL without a result")


def rank_environments(job_dir: str, ranks: int, timeout: float = 60) -> list[dict]:
    """The environments of a running job's `trainmetrics train` processes (found by the job's directory)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in psutil.process_iter(["cmdline"]) if "train" in (p.info["cmdline"] or [])
                 and job_dir in " ".join(p.info["cmdline"] or []) and "ray_launch" not in " ".join(p.info["cmdline"])]
        if len(found) == ranks:
            return [p.environ() for p in found]
        assert time.monotonic() < deadline, f"{len(found)} rank processes, not {ranks}"
        time.sleep(0.2)


@pytest.mark.parametrize("device,gpus", [("auto", True), ("cpu", False)])
def test_each_rank_asks_ray_for_a_gpu_unless_the_job_is_on_the_cpu(ray_server, device, gpus):
    """The ranks asked Ray for a CPU only: on a GPU cluster Ray gave them no GPU (a `--device cuda` job failed,
    an `auto` one trained on the CPU). The test cluster counts one GPU per node (there is no CUDA here)."""
    server, _ = ray_server
    job_id = f"gpu-{device}"
    submit(server, job_id, nproc=2, device=device)
    wait_training(server, job_id)
    environments = rank_environments(str(server.data_dir / "jobs" / job_id), 2)
    log = (server.data_dir / "jobs" / job_id / "train.log").read_text()
    assert server.client().post(f"/api/training/jobs/{job_id}/cancel").status_code == 202
    wait_job(server.client(), job_id, lambda job: job["state"] != "running", timeout=60)
    if gpus:     # one GPU each, seen alone as cuda:0
        assert sorted(env.get("CUDA_VISIBLE_DEVICES", "unset") for env in environments) == ["0", "0"]
        assert [env["LOCAL_RANK"] for env in environments] == ["0", "0"]
        assert log.count(", GPU [") == 2, log[:2000]
    else:
        assert ", GPU [" not in log


def test_a_submission_no_server_recorded_is_stopped_before_its_job_starts(ray_cluster, tmp_path):
    """A server killed between submitting a run to Ray and recording it left the job queued: the next server
    submitted it again, and both trained it (the first unsupervised, unscraped). The job's submissions Ray still
    runs, found by the job's directory in their entrypoint, are stopped first, and awaited: stopped while
    training, the stray writes a checkpoint, and a new run submitted beside it without --resume refused the
    directory (the job failed)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from trainmetrics.jobserver.ray_executor import RayExecutor
    from trainmetrics.jobserver.store import JobRecord, JobStore
    from trainmetrics.jobserver.supervisor import Supervisor

    ray, client = RayExecutor(ray_cluster.dashboard), JobSubmissionClient(ray_cluster.dashboard)
    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=1, executor=ray)
    store.add_job(JobRecord(id="twice", owner="default", name="twice", state="queued",
                            spec={"model": "mlp", "dataset": "blobs", "dataset_path": "blobs", "nproc": 1,
                                  "epochs": 1000, "log_every": 10}))
    job = store.get_job("twice")
    supervisor.job_path(job.id).mkdir(parents=True, exist_ok=True)
    supervisor.checkpoint_dir(job.id).mkdir(parents=True, exist_ok=True)
    orphan = ray.start(job.id, 1, supervisor.train_args(job), supervisor.job_path(job.id), {})
    runs = [orphan.handle]
    try:
        log = supervisor.job_path(job.id) / "train.log"
        deadline = time.monotonic() + 120
        while not (log.exists() and "step=" in log.read_text()):
            assert time.monotonic() < deadline, "the unrecorded submission did not train"
            time.sleep(0.2)
        deadline = time.monotonic() + 60
        while store.get_job("twice").state == "queued":
            assert time.monotonic() < deadline, "the job did not start again"
            supervisor.tick()
            time.sleep(0.2)
        assert client.get_job_status(orphan.handle) == JobStatus.STOPPED
        assert list(supervisor.checkpoint_dir(job.id).glob("step-*.pt")), "the stopped run wrote no checkpoint"
        runs.append(supervisor.runs["twice"].handle)
        assert runs[1] != orphan.handle and store.get_job("twice").state == "running"
        assert "--resume" in client.get_job_info(runs[1]).entrypoint.split()
    finally:
        for handle in runs:
            client.stop_job(handle)
        store.close()


def test_a_rank_whose_ray_actor_dies_is_said_killed(ray_server):
    """A rank's actor killed (Ray's memory monitor, a lost node) takes the rank's process with it: the launcher
    died of the RayActorError (a traceback in the log) and the job said "exit code 1 without a result"."""
    server, _ = ray_server
    submit(server, "actor-1")
    wait_training(server, "actor-1")
    rank0 = rank0_process(server, "actor-1")
    rank0.parent().send_signal(signal.SIGKILL)          # the Rank actor's worker process
    ended = wait_job(server.client(), "actor-1", lambda job: job["state"] != "running", timeout=60)
    assert (ended["state"], ended["exit_code"], ended["error"]) == ("failed", -9, "killed by SIGKILL without a result")
    assert "rank 0: its Ray actor died" in (server.data_dir / "jobs" / "actor-1" / "train.log").read_text()


def test_a_rank_that_fails_before_joining_the_others_does_not_hold_them_for_the_rendezvous_timeout(ray_server):
    """Rank 1 failed at its start, before the rendezvous (as on a node without the job's data: torchrun stops the
    other workers then): rank 0 waited in init_process_group for its 30-minute timeout, the job `running`."""
    server, _ = ray_server
    submitted = time.monotonic()
    submit(server, "failstart-1", nproc=2, device="cpu")        # conftest.RAY_FAULTS fails its rank 1
    ended = wait_job(server.client(), "failstart-1", lambda job: job["state"] != "running", timeout=120)
    assert ended["state"] == "failed", ended
    assert time.monotonic() - submitted < 100
    assert "rank 1: RuntimeError: fault injected: failing before joining the other ranks" in ended["error"], ended
    log = (server.data_dir / "jobs" / "failstart-1" / "train.log").read_text()
    assert "still running 10 s after rank 1 failed (exit code 1" in log, log[-3000:]


@pytest.mark.ray_own_cluster
def test_a_rank_whose_node_is_lost_silently_does_not_hold_the_others_for_gloos_timeout(tmp_path):
    """A node gone without a word (power, network) leaves its rank's peers blocked in a collective: no connection
    closes. Ray said the rank's actor died, and the launcher waited on for the other rank, which held the job
    `running` for gloo's 30-minute timeout. The node here: the second one frozen (its Ray processes and its
    rank's), on a cluster that takes a node for dead after ~5-10 s of unanswered health checks."""
    pytest.importorskip("ray")
    from .ray_cluster import RayCluster

    # (not quicker: a live node must answer them on a loaded 2-core host)
    cluster = RayCluster(env={"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                              "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "5"})
    cluster.start()
    server, frozen = None, []
    try:
        server = Server(tmp_path, extra=("--executor", "ray", "--ray-address", cluster.dashboard)).start()
        submit(server, "lost-node", nproc=2, device="cpu")
        wait_training(server, "lost-node")
        node = psutil.Process(cluster.nodes[1].pid)
        frozen = [node, *node.children(recursive=True)]
        assert any("train" in process.cmdline() for process in frozen), "no rank on the second node"
        for process in frozen:
            process.suspend()
        lost = time.monotonic()
        ended = wait_job(server.client(), "lost-node", lambda job: job["state"] != "running", timeout=90)
        assert ended["state"] == "failed", ended
        assert time.monotonic() - lost < 60
        log = (server.data_dir / "jobs" / "lost-node" / "train.log").read_text()
        assert "its Ray actor died" in log, log[-3000:]
    finally:
        for process in frozen:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        if server is not None:
            server.stop()
        cluster.stop()
