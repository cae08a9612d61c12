"""Hung jobs: where the analytics (which read Prometheus) tell the job server (which can ask a job's ranks for
their stacks) which jobs the TrainerHang alert fires for, inside one `trainmetrics server`.

As with trainmetrics.reports, neither part imports the other: the server composition (trainmetrics.service)
hands both the same HangFeed; the analytics set `hung_jobs` in their lifespan, the job server polls it
(jobserver/hangs.py). The alert is evaluated by the Prometheus the analytics read, with the deployable rules
(deploy/prometheus/rules): the rule is written once, there.
"""

from dataclasses import dataclass
from typing import Awaitable, Callable


@dataclass(frozen=True)
class HungJobs:
    """The ids of the jobs TrainerHang fires for now, and whether the backend said so with all of its data: a
    partial answer (a Thanos store or a VictoriaMetrics node that did not answer) may leave out a job whose hang
    goes on, which is no sign that it ended."""

    ids: frozenset[str]
    whole: bool = True


@dataclass
class HangFeed:
    """The analytics' half: the jobs TrainerHang fires for now (raises when Prometheus cannot say)."""

    hung_jobs: Callable[[], Awaitable[HungJobs]] | None = None
