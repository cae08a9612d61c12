"""Hung jobs: where the analytics (which read Prometheus) tell the job server (which can ask a job's ranks for
their stacks) which jobs the TrainerHang alert fires for, inside one `trainmetrics server`.

As with trainmetrics.reports, neither part imports the other: the server composition (trainmetrics.service)
hands both the same HangFeed; the analytics set `hung_jobs` in their lifespan, the job server polls it
(jobserver/hangs.py). The alert is evaluated by the Prometheus the analytics read, with the deployable rules
(deploy/prometheus/rules): the rule is written once, there.
"""

from dataclasses import dataclass
from typing import Awaitable, Callable


@dataclass
class HangFeed:
    """The analytics' half: the ids of the jobs TrainerHang fires for now (raises when Prometheus cannot say)."""

    hung_jobs: Callable[[], Awaitable[set[str]]] | None = None
