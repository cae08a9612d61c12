"""Faults on purpose, for drills and tests: the built-in runner reads TRAINMETRICS_FAULTS (JSON) once and
makes a rank start late, stall, load its data slowly, compute slowly, evaluate or checkpoint slowly, train
on one corrupted batch, or fail before it joins the others:

    TRAINMETRICS_FAULTS='{"slow_start": {"rank": 1, "seconds": 3}, "stall": {"rank": 1, "step": 30, "seconds": 600},
                          "slow_data": {"rank": 1, "seconds": 0.05}, "slow_compute": {"rank": 1, "seconds": 0.05},
                          "slow_eval": {"seconds": 5}, "slow_checkpoint": {"seconds": 5},
                          "corrupt_batch": {"step": 40, "scale": 1000}, "fail_start": {"rank": 1}}'

Each fault applies to every rank and job unless it names one (`"rank": N`, `"job": "JOB_ID"`); `step` counts
from 1, like trainer_steps_total. A slow start is a wait before the rank's wait for its first scrape (its
start-up, a restore say, taking its time). A failed start is a rank that fails before it joins the others (as one
whose node lacks the dataset does). A stall ends early when the job is asked to stop. Without the variable
nothing here costs the loop a thing.
"""

import functools
import json
import logging
import os
import time
from typing import Callable

log = logging.getLogger("trainmetrics.trainer")

VARIABLE = "TRAINMETRICS_FAULTS"
KINDS = ("slow_start", "stall", "slow_data", "slow_compute", "slow_eval", "slow_checkpoint", "corrupt_batch",
         "fail_start")


class Faults:
    """The faults asked of this rank of this job."""

    def __init__(self, spec: dict, rank: int, job_id: str):
        def mine(name: str) -> dict | None:
            fault = spec.get(name)
            if not isinstance(fault, dict):
                return None
            return fault if fault.get("rank", rank) == rank and fault.get("job", job_id) == job_id else None

        self.slow_start = mine("slow_start")
        self.stall, self.slow_data, self.slow_compute = mine("stall"), mine("slow_data"), mine("slow_compute")
        self.slow_eval, self.slow_checkpoint = mine("slow_eval"), mine("slow_checkpoint")
        self.corrupt_batch = mine("corrupt_batch")
        self.fail_start = mine("fail_start")

    def __bool__(self) -> bool:
        return any(getattr(self, kind) for kind in KINDS)

    def before_joining(self) -> None:
        """Fail before joining the other ranks, as a rank whose node lacks the job's data would."""
        if self.fail_start:
            raise RuntimeError("fault injected: failing before joining the other ranks")

    def before_start(self) -> None:
        """Start late, as a rank whose start-up takes its time would."""
        if self.slow_start:
            time.sleep(float(self.slow_start["seconds"]))

    def before_data(self) -> None:
        """Wait as a slow data loader would."""
        if self.slow_data:
            time.sleep(float(self.slow_data["seconds"]))

    def before_forward(self, next_step: int, stopping: Callable[[], bool]) -> None:
        """Stall once at the step asked for (until a stop is asked); wait as slow compute would."""
        if self.stall and next_step == int(self.stall["step"]):
            log.warning("fault injected: stalling %s s before step %d", self.stall["seconds"], next_step)
            deadline = time.monotonic() + float(self.stall["seconds"])
            while time.monotonic() < deadline and not stopping():
                time.sleep(0.05)
        if self.slow_compute:
            time.sleep(float(self.slow_compute["seconds"]))

    def during_eval(self) -> None:
        """An evaluation that takes its time."""
        if self.slow_eval:
            time.sleep(float(self.slow_eval["seconds"]))

    def during_checkpoint(self) -> None:
        """A checkpoint write that takes its time."""
        if self.slow_checkpoint:
            time.sleep(float(self.slow_checkpoint["seconds"]))

    def corrupt(self, inputs, next_step: int):
        """The batch of the step asked for, scaled out of all proportion (a corrupted batch)."""
        if self.corrupt_batch and next_step == int(self.corrupt_batch["step"]) and inputs.is_floating_point():
            log.warning("fault injected: corrupting the batch of step %d", next_step)
            return inputs * float(self.corrupt_batch.get("scale", 1000.0))
        return inputs


def from_environment(rank: int, job_id: str) -> Faults | None:
    """The faults TRAINMETRICS_FAULTS asks of this rank of this job, or None (the usual case)."""
    text = os.environ.get(VARIABLE)
    return _parsed(text, rank, job_id) if text else None


@functools.lru_cache(maxsize=4)
def _parsed(text: str, rank: int, job_id: str) -> Faults | None:
    """(Read once: the runner asks before the rank joins the others and again for the loop.)"""
    try:
        spec = json.loads(text)
    except ValueError:
        log.error("%s is not JSON: no faults injected", VARIABLE)
        return None
    faults = Faults(spec, rank, job_id) if isinstance(spec, dict) else None
    return faults or None
