"""Helpers for trainer tests: run the real trainer in-process or as the real command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import kill_left
from trainmetrics.trainer.config import TrainConfig
from trainmetrics.trainer.metrics import JobInfo, JobMetrics
from trainmetrics.trainer.runner import Trainer, prepare
from trainmetrics.trainer.stopping import StopFlag


def build_trainer(**overrides) -> Trainer:
    """A Trainer for the config, with metrics not served over HTTP."""
    config = TrainConfig(**{"job_id": "test-job", **overrides})
    device, dataset, model, _ = prepare(config)
    metrics = JobMetrics(config.job_id, JobInfo(model=config.model, dataset=dataset.name), log_every=config.log_every)
    return Trainer(config, dataset, model, device, metrics, StopFlag())


@pytest.fixture
def make_trainer():
    """Build Trainers and release their metrics afterwards."""
    made = []

    def make(**overrides) -> Trainer:
        trainer = build_trainer(**overrides)
        made.append(trainer)
        return trainer

    yield make
    for trainer in made:
        trainer.metrics.close()


@pytest.fixture
def spawn_train():
    """Start `trainmetrics train ARGS` in the background (stdout/stderr piped); killed at teardown."""
    processes = []

    def spawn(*args: str) -> subprocess.Popen:
        process = subprocess.Popen(train_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes.append(process)
        return process

    yield spawn
    kill_left(processes)


def train_command(*args: str) -> list[str]:
    """The real `trainmetrics train` command line."""
    return [sys.executable, "-m", "trainmetrics", "train", *args]


def parse_summary(stdout: str) -> dict:
    """The job's closing `summary {...}` line."""
    lines = [line for line in stdout.splitlines() if line.startswith("summary ")]
    assert lines, f"no summary line in output:\n{stdout}"
    return json.loads(lines[-1][len("summary "):])


def run_train(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `trainmetrics train ARGS` to completion, capturing output."""
    return subprocess.run(train_command(*args), capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).parent)
