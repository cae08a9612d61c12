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
whose node lacks the dataset does). A stall ends early when the job is asked to stop. A variable that is no JSON
object of well-formed faults (an unknown kind, a field missing, seconds that are no finite number from 0, a rank
or step that is no whole number) is logged as an error naming it, and no fault is injected. Without the variable
nothing here costs the loop a thing.
"""

import functools
import json
import logging
import math
import os
import time
from typing import Callable

log = logging.getLogger("trainmetrics.trainer")

VARIABLE = "TRAINMETRICS_FAULTS"
KINDS = ("slow_start", "stall", "slow_data", "slow_compute", "slow_eval", "slow_checkpoint", "corrupt_batch",
         "fail_start")
# The fields each kind needs, besides the optional "rank" and "job" (corrupt_batch's "scale" is optional too).
REQUIRED = {"slow_start": ("seconds",), "stall": ("step", "seconds"), "slow_data": ("seconds",),
            "slow_compute": ("seconds",), "slow_eval": ("seconds",), "slow_checkpoint": ("seconds",),
            "corrupt_batch": ("step",), "fail_start": ()}
# Longer than any drill, and short of the ~9.2e9 s time.sleep() overflows at.
MAX_SECONDS = 1e6


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
        self.fail_start = mine("fail_start")     # (`{}` asks for it on every rank: not None, not falsy, is a fault)

    def __bool__(self) -> bool:
        return any(getattr(self, kind) is not None for kind in KINDS)

    def before_joining(self) -> None:
        """Fail before joining the other ranks, as a rank whose node lacks the job's data would."""
        if self.fail_start is not None:
            raise RuntimeError("fault injected: failing before joining the other ranks")

    def before_start(self) -> None:
        """Start late, as a rank whose start-up takes its time would."""
        if self.slow_start is not None:
            time.sleep(float(self.slow_start["seconds"]))

    def before_data(self) -> None:
        """Wait as a slow data loader would."""
        if self.slow_data is not None:
            time.sleep(float(self.slow_data["seconds"]))

    def before_forward(self, next_step: int, stopping: Callable[[], bool]) -> None:
        """Stall once at the step asked for (until a stop is asked); wait as slow compute would."""
        if self.stall is not None and next_step == int(self.stall["step"]):
            log.warning("fault injected: stalling %s s before step %d", self.stall["seconds"], next_step)
            deadline = time.monotonic() + float(self.stall["seconds"])
            while time.monotonic() < deadline and not stopping():
                time.sleep(0.05)
        if self.slow_compute is not None:
            time.sleep(float(self.slow_compute["seconds"]))

    def during_eval(self) -> None:
        """An evaluation that takes its time."""
        if self.slow_eval is not None:
            time.sleep(float(self.slow_eval["seconds"]))

    def during_checkpoint(self) -> None:
        """A checkpoint write that takes its time."""
        if self.slow_checkpoint is not None:
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
    problem = spec_problem(spec)
    if problem:
        # Taken as it was, a fault's bad field failed the job mid-run with an error naming no variable (a ValueError
        # from time.sleep or int()), and a misspelt kind or a rank given as text injected nothing without a word.
        log.error("%s: %s: no faults injected", VARIABLE, problem)
        return None
    return Faults(spec, rank, job_id) or None


def spec_problem(spec) -> str | None:
    """What is wrong with a parsed TRAINMETRICS_FAULTS, in words, or None when every fault in it is well formed."""
    if not isinstance(spec, dict):
        return "not a JSON object of faults"
    for kind, fault in spec.items():
        if kind not in REQUIRED:
            return f"unknown fault {kind!r} (the faults: {', '.join(KINDS)})"
        problem = _fault_problem(fault, REQUIRED[kind])
        if problem:
            return f"{kind}: {problem}"
    return None


def _fault_problem(fault, required: tuple[str, ...]) -> str | None:
    if not isinstance(fault, dict):
        return "not a JSON object"
    missing = [name for name in required if name not in fault]
    if missing:
        return f"no {missing[0]!r}"
    checks = {"rank": (_is_whole, 0, "a whole number, 0 or more"),
              "step": (_is_whole, 1, "a whole number, 1 or more"),
              "seconds": (_is_number, 0, f"a number of seconds from 0 to {MAX_SECONDS:g}"),
              "scale": (_is_scale, -math.inf, "a number")}
    for name, (kind_of, least, words) in checks.items():
        if name in fault and not (kind_of(fault[name]) and fault[name] >= least
                                  and (name != "seconds" or fault[name] <= MAX_SECONDS)):
            return f"{name} {fault[name]!r} is not {words}"
    if "job" in fault and not isinstance(fault["job"], str):
        return f"job {fault['job']!r} is not a job id (text)"
    return None


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_scale(value) -> bool:
    # Infinity too: a drill for a loss that is no longer finite.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_number(value) -> bool:
    # JSON's NaN and Infinity (and 1e309, read as infinity) are floats too.
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)
