"""A 2-rank CPU job under torchrun (gloo, DistributedDataParallel) end to end through a real Prometheus."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from trainmetrics.jobfiles import list_checkpoints, read_result
from trainmetrics.prometheus_process import PrometheusServer, free_port

from .conftest import parse_summary

JOB_ID = "ddp-e2e-1"
# Rank 1 of the shared job starts this much later than rank 0.
SLOW_START_SECONDS = 4.0


def run_two_ranks(*train_args: str, timeout: float, env: dict | None = None) -> tuple[subprocess.CompletedProcess,
                                                                                     list[dict]]:
    """`trainmetrics train ARGS` as 2 ranks under torchrun, and the ranks' summaries, in rank order."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "trainmetrics", "train", *train_args], capture_output=True, text=True, timeout=timeout, env=env)
    summaries = sorted((parse_summary(line) for line in result.stdout.splitlines() if line.startswith("summary ")),
                       key=lambda s: s["rank"])
    return result, summaries


@pytest.fixture(scope="module")
def finished_ddp_job(tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    prometheus = PrometheusServer(work / "prometheus").start()
    env = {**os.environ, "TRAINMETRICS_FAULTS": json.dumps({"slow_start": {"rank": 1, "seconds": SLOW_START_SECONDS}})}
    try:
        result, summaries = run_two_ranks(
            "--job-id", JOB_ID, "--dataset", "blobs", "--epochs", "3", "--batch-size", "32", "--log-every", "10",
            "--checkpoint-dir", str(work / "ckpt"), "--targets-dir", str(prometheus.targets_dir), timeout=300,
            env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # The ranks share one log (the job server's train.log): each line says whose it is.
        assert all(f"trainmetrics.trainer rank {rank}: job {JOB_ID}: step=" in result.stderr for rank in (0, 1))
        (work / "ranks.log").write_text(result.stderr)
        yield prometheus, summaries, work
    finally:
        prometheus.stop()


def scalar(prometheus, expr: str) -> float:
    result = prometheus.query(expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def test_both_ranks_publish_and_the_job_completes_once(finished_ddp_job):
    prometheus, summaries, work = finished_ddp_job
    assert [s["rank"] for s in summaries] == [0, 1] and all(s["state"] == "completed" for s in summaries)
    selector = f'job_id="{JOB_ID}"'
    ranks = prometheus.query(f"count by (rank) (last_over_time(trainer_steps_total{{{selector}}}[5m]))")
    assert sorted(r["metric"]["rank"] for r in ranks) == ["0", "1"]
    # Each rank takes half of every epoch: 3200 samples / 2 ranks / 32 per batch = 50 steps per epoch.
    assert all(s["steps"] == 150 and s["samples"] == 4800 for s in summaries)
    total = scalar(prometheus, f"sum(last_over_time(trainer_samples_total{{{selector}}}[5m]))")
    assert total == sum(s["samples"] for s in summaries) == 9600
    states = prometheus.query(f"last_over_time(trainer_job_state{{{selector}}}[5m]) == 1")
    assert [s["metric"]["state"] for s in states] == ["completed"]          # one job state, rank 0's
    info = prometheus.query(f"last_over_time(trainer_job_info{{{selector}}}[5m])")
    assert len(info) == 1 and info[0]["metric"]["world_size"] == "2"
    # Rank 0 alone checkpoints and evaluates.
    assert summaries[0]["checkpoints"] == 3 and summaries[1]["checkpoints"] == 0
    assert summaries[0]["eval_accuracy"] > 0.8 and summaries[1]["eval_accuracy"] is None
    assert (work / "ckpt" / "model.pt").exists()


def test_the_ranks_log_no_warning_of_torchs(finished_ddp_job):
    """torch 2.13 deprecates DDP's broadcast_buffers=False: every multi-rank job's log began with a FutureWarning of
    five lines telling the user to change our code."""
    _, _, work = finished_ddp_job
    log = (work / "ranks.log").read_text()
    assert "Warning" not in log, log[log.index("Warning") - 200:][:1000]


def test_a_rank_waits_for_a_late_one_before_training_and_that_wait_is_init(finished_ddp_job):
    """Rank 1 starts late (the fault): rank 0 waits for it at start, in init, not in its first step's
    all-reduce (collective, which the goodput ledger counts as step time)."""
    prometheus, _, _ = finished_ddp_job

    def seconds(phase: str, rank: int) -> float:
        return scalar(prometheus, f'last_over_time(trainer_phase_seconds_total{{job_id="{JOB_ID}",rank="{rank}",'
                                  f'phase="{phase}"}}[5m])')

    # The ranks started training together: each one's init runs from its start (the same moment) to then.
    assert seconds("init", 0) == pytest.approx(seconds("init", 1), abs=SLOW_START_SECONDS / 4)
    assert seconds("collective", 0) < SLOW_START_SECONDS / 2


def test_recorded_throughput_is_the_sum_of_the_ranks(finished_ddp_job):
    prometheus, summaries, _ = finished_ddp_job
    start, end = summaries[0]["start_time"], summaries[0]["end_time"] + 3
    recorded = prometheus.query_range(f'job_id:trainer_samples:rate10s{{job_id="{JOB_ID}"}}', start, end, 1)
    per_rank = prometheus.query_range(f'rate(trainer_samples_total{{job_id="{JOB_ID}"}}[10s])', start, end, 1)
    assert len(recorded) == 1 and len(per_rank) == 2
    recorded_peak = max(float(v) for _, v in recorded[0]["values"])
    rank_peaks = [max(float(v) for _, v in series["values"]) for series in per_rank]
    # The ranks step in lockstep: the summed throughput peaks at about twice one rank's peak.
    assert recorded_peak == pytest.approx(sum(rank_peaks), rel=0.2)


def test_analytics_treat_the_ranks_as_one_job(finished_ddp_job, analytics_get):
    prometheus, summaries, _ = finished_ddp_job
    response = analytics_get(prometheus.url, f"/api/training/{JOB_ID}/analytics")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "completed"
    assert body["performance"]["total_samples"] == 9600


@pytest.mark.parametrize("spiking_rank,step,log_every,checkpoint_every,kept",
                         [(0, 81, 5, 10, 80), (1, 100, 7, 0, 50), (1, 81, 5, 0, 50)])
def test_a_loss_spike_on_one_rank_pauses_every_rank_without_a_checkpoint_after_it(tmp_path, spiking_rank, step,
                                                                                   log_every, checkpoint_every, kept):
    """The rank that sees the spike keeps the last checkpoint; the others must agree, or rank 0 would write one
    holding the spike's weights (rank 1 spiking) or wait forever in the checkpoint's gather (rank 0 spiking).
    Checkpoints every 10 steps; the batch of step 81 is corrupted, its interval (81..85) flags the spike, and
    the ranks agree at step 90, before the checkpoint due then. With checkpoints at each epoch's end (50
    steps) and intervals of 7 (57, 64 ... 99), rank 1's spike at step 100 is found when the epoch's
    checkpoint ends its interval (100..100): that checkpoint was written after it (the ranks did not agree
    before it). Rank 1's spike at step 81 (interval 81..85) is agreed on at the regular stop check of step 90:
    rank 0, which writes the job's result, stopped for it without taking the stop as its own, and the job's
    reason was null."""
    env = {**os.environ, "TRAINMETRICS_FAULTS": json.dumps(
        {"corrupt_batch": {"rank": spiking_rank, "step": step, "scale": 1000}})}
    result, summaries = run_two_ranks(
        "--job-id", f"ddp-spike-{spiking_rank}", "--dataset", "blobs", "--epochs", "3", "--batch-size", "32",
        "--log-every", str(log_every), "--checkpoint-every", str(checkpoint_every), "--on-loss-spike", "pause",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--result-file", str(tmp_path / "result.json"),
        timeout=120, env=env)
    # Every rank ended paused (torchrun itself exits 1 when a rank does not exit 0, and stops the others).
    assert [(s["rank"], s["state"]) for s in summaries] == [(0, "paused"), (1, "paused")], \
        result.stdout[-3000:] + result.stderr[-3000:]
    outcome = read_result(tmp_path / "result.json")
    assert outcome["state"] == "paused"
    # Rank 1 writes its own beside it (the job server reads it to name a rank that failed or died).
    assert read_result(tmp_path / "result.rank1.json")["rank"] == 1
    assert outcome["reason"] == ("loss spike at step 85" if spiking_rank == 0 else "loss spike on rank 1")
    assert max(c.step for c in list_checkpoints(tmp_path / "ckpt")) == kept


def test_when_rank_0s_checkpoint_write_fails_every_rank_fails_with_its_cause(tmp_path):
    """Rank 1 passed the checkpoint's barrier whatever rank 0's write did, went on to the next step's all-reduce and
    failed there once rank 0 had exited (after its final linger), with gloo's "Connection closed by peer" for its
    error: the job's cause was rank 0's alone. (A directory at the checkpoint's name: the write fails.)"""
    (tmp_path / "ckpt" / "step-000000005.pt").mkdir(parents=True)
    result, summaries = run_two_ranks(
        "--job-id", "ddp-write-fails", "--dataset", "blobs", "--epochs", "1", "--batch-size", "32",
        "--checkpoint-every", "5", "--checkpoint-dir", str(tmp_path / "ckpt"), "--linger-timeout", "0",
        "--result-file", str(tmp_path / "result.json"), timeout=120)
    assert [(s["rank"], s["state"]) for s in summaries] == [(0, "failed"), (1, "failed")], \
        result.stdout[-3000:] + result.stderr[-3000:]
    assert read_result(tmp_path / "result.json")["error"].startswith("IsADirectoryError")
    said = read_result(tmp_path / "result.rank1.json")
    assert said["error"].startswith("RankZeroFailed: rank 0's checkpoint failed: IsADirectoryError"), said


BACKWARD_PHASES = """
import sys, torch, torch.distributed as dist
from torch import nn
from trainmetrics.trainer import distributed
from trainmetrics.trainer.metrics import JobMetrics
from trainmetrics.trainer.phases import OPTIMIZER

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
metrics = JobMetrics("ddp-phases")
seen = []

class Watch(torch.autograd.Function):       # backward through the first layer: the last gradients computed
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        seen.append(metrics.phases.phase)
        return grad

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.rest = nn.Linear(512, 512), nn.Sequential(*[nn.Linear(512, 512) for _ in range(3)])

    def forward(self, x):                   # 1 MiB a layer: several buckets
        return self.rest(Watch.apply(self.first(x)))

model = nn.parallel.DistributedDataParallel(Net())
distributed.mark_collectives(model, metrics.phases)
metrics.start()
for x in metrics.timed([torch.randn(8, 512) for _ in range(4)]):
    loss = model(x).pow(2).mean()
    loss.backward()
    metrics.phases.enter(OPTIMIZER)
    metrics.step(loss=loss, samples=8)
metrics.close()
print(" ".join(seen))
"""


def test_a_ranks_own_backward_is_compute_not_the_all_reduce():
    """DDP sends its first gradient bucket (1 MiB) early in backward: entering `collective` there booked the rest of
    the rank's backward (a slow rank's, a stuck one's) as waiting for its peers, and TrainerStraggler and
    TrainerRankStuck, which leave that phase out, could not name it."""
    result = subprocess.run([sys.executable, "-c", BACKWARD_PHASES, str(free_port())], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    phases = result.stdout.split()
    assert len(phases) >= 3 and set(phases) == {"compute"}, phases


def test_the_ranks_wait_at_the_stop_check_as_collective(monkeypatch):
    """A rank waiting at the every-10-steps stop check for a stuck peer showed `compute`: TrainerRankStuck, which
    looks for the ranks in `collective`, named no one."""
    from types import SimpleNamespace

    from trainmetrics.trainer import distributed
    from trainmetrics.trainer.metrics import JobMetrics
    from trainmetrics.trainer.runner import Trainer
    from trainmetrics.trainer.stopping import StopFlag

    metrics, seen = JobMetrics("stop-check"), []

    def waiting(ctx, outcome, keep):      # the peer is stuck: what this rank shows while it waits
        seen.append(metrics.phases.phase)
        return "paused", 1

    monkeypatch.setattr(distributed, "agree_on_stop", waiting)
    trainer = SimpleNamespace(metrics=metrics, dist=SimpleNamespace(enabled=True), stop=StopFlag())
    try:
        metrics.start()
        assert Trainer.agree_on_stop(trainer) == "paused"
        assert seen == ["collective"] and metrics.phases.phase == "compute"
        assert (trainer.stop.outcome, trainer.stop.reason) == ("paused", "loss spike on rank 1")
    finally:
        metrics.close()


@pytest.mark.parametrize("signum,state,code", [(signal.SIGTERM, "cancelled", 3), (signal.SIGUSR1, "paused", 4)])
def test_a_rank_stopped_while_the_others_have_not_joined_ends_as_asked(tmp_path, signum, state, code):
    """A rank waiting in the process group's start for a peer not up yet (its node still starting, a rank that
    failed to start) waited there in C++, where Python runs no signal handler: SIGTERM, Ctrl-C and a pause were
    ignored for the process group's 30 minutes, then torchrun (or its user) killed it, with no result and its
    Prometheus target file left behind."""
    targets, result_file = tmp_path / "targets", tmp_path / "result.json"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    process = subprocess.Popen(
        [sys.executable, "-m", "trainmetrics", "train", "--job-id", "alone-1", "--dataset", "blobs", "--epochs", "1",
         "--checkpoint-dir", str(tmp_path / "ckpt"), "--targets-dir", str(targets), "--result-file", str(result_file),
         "--linger-timeout", "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:         # its files are written: next, it joins the process group
            if "job alone-1: model=" in line:
                break
        time.sleep(1.0)
        process.send_signal(signum)
        assert process.wait(timeout=60) == code
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert read_result(result_file)["state"] == state
    assert list(targets.iterdir()) == []


def test_ranks_that_loaded_different_data_fail_at_once_saying_so(tmp_path):
    """Ranks of a job that loaded other data (another copy of the file on each node) took shares of other
    lengths: the rank with fewer batches ended its epoch and waited at its evaluation while the other waited for
    it in a gradient all-reduce, and the job hung for the process group's 30 minutes, deaf to a cancel."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    processes = []
    for rank, rows in enumerate((100, 160)):
        data = tmp_path / f"node{rank}" / "data.csv"
        data.parent.mkdir()
        data.write_text("x,label\n" + "".join(f"{i / rows:.4f},{i % 2}\n" for i in range(rows)))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "trainmetrics", "train", "--job-id", "split-data-1", "--dataset", str(data),
             "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--linger-timeout", "0",
             "--result-file", str(tmp_path / "result.json")],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
    try:
        assert [process.wait(timeout=60) for process in processes] == [1, 1]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for path in (tmp_path / "result.json", tmp_path / "result.rank1.json"):
        said = read_result(path)
        assert said["state"] == "failed" and "the ranks loaded different data" in said["error"]
        assert "rank 0: 80 training rows" in said["error"] and "rank 1: 128 training rows" in said["error"]


def test_rank_0_waits_for_its_peers_after_an_evaluation_or_checkpoint_as_collective(monkeypatch):
    """Rank 0, done with an evaluation or checkpoint write, waited at the barrier for the other ranks in `compute`: a
    peer stuck after the step's all-reduce (in its optimizer) was named by nobody (TrainerRankStuck looks for a rank
    in `collective`), and rank 0 read as the one stuck in its loop."""
    from types import SimpleNamespace

    from trainmetrics.trainer import distributed
    from trainmetrics.trainer.metrics import JobMetrics
    from trainmetrics.trainer.phases import EVAL
    from trainmetrics.trainer.runner import Trainer

    metrics, seen = JobMetrics("rank-0-barrier"), []
    monkeypatch.setattr(distributed, "gather_objects", lambda ctx, value: seen.append(metrics.phases.phase))
    trainer = SimpleNamespace(metrics=metrics, dist=SimpleNamespace(enabled=True, is_main=True))

    def evaluation():
        with metrics.phase(EVAL):
            seen.append(metrics.phases.phase)

    try:
        metrics.start()
        Trainer.on_rank_0(trainer, evaluation, EVAL)
        assert seen == ["eval", "collective"] and metrics.phases.phase == "compute"
    finally:
        metrics.close()


def _two_ranks_on_own_dirs(tmp_path, data, *args: str) -> list[int]:
    """One job as 2 ranks started by hand, each with a checkpoint directory of its own (as on two nodes whose
    --checkpoint-dir is no shared filesystem); their exit codes (None: still running after 90 s, then killed)."""
    deadline = time.monotonic() + 90
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "trainmetrics", "train", "--job-id", "own-dirs-1", "--dataset", str(data),
         "--batch-size", "8", "--device", "cpu", "--linger-timeout", "0", "--checkpoint-every", "5",
         "--keep-checkpoints", "0", "--checkpoint-dir", str(tmp_path / f"node{rank}" / "ckpt"),
         "--result-file", str(tmp_path / "result.json"), *args],
        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL) for rank in (0, 1)]
    codes = []
    try:
        for process in processes:
            try:
                codes.append(process.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return codes


@pytest.mark.parametrize("rank_1_sees", ["none", "the one before"])
def test_ranks_that_found_different_checkpoints_fail_the_resume_at_once_saying_so(tmp_path, rank_1_sees):
    """Each rank resumes from the newest checkpoint it finds itself. One that found another (a --checkpoint-dir
    local to each node: rank 0's checkpoints on its own; a network filesystem's stale listing: the one before)
    went on from there, rank 1 silently from step 0: the ranks trained on from other weights and other places in
    the data, their collectives out of step, and the job hung."""
    data = tmp_path / "data.csv"
    data.write_text("x,label\n" + "".join(f"{i / 200:.4f},{i % 2}\n" for i in range(200)))
    assert _two_ranks_on_own_dirs(tmp_path, data, "--epochs", "1") == [0, 0]      # 10 steps: checkpoints 5, 10
    written = list_checkpoints(tmp_path / "node0" / "ckpt")
    assert [checkpoint.step for checkpoint in written] == [5, 10]
    assert list_checkpoints(tmp_path / "node1" / "ckpt") == []
    if rank_1_sees == "the one before":
        (tmp_path / "node1" / "ckpt" / written[0].path.name).write_bytes(written[0].path.read_bytes())

    assert _two_ranks_on_own_dirs(tmp_path, data, "--epochs", "3", "--resume") == [1, 1]
    rank_1_found = "none" if rank_1_sees == "none" else "step 5"
    for path in (tmp_path / "result.json", tmp_path / "result.rank1.json"):
        said = read_result(path)
        assert said["state"] == "failed" and "the ranks found different checkpoints" in said["error"], said
        assert f"rank 0: step 10, rank 1: {rank_1_found}" in said["error"]
