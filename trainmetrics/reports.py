"""Job reports that outlive Prometheus' retention: where the job server (which keeps them) and the analytics
(which compute them, and fall back to them) meet inside one `trainmetrics server`.

Neither part imports the other: the server composition (trainmetrics.service) hands both the same archive;
the analytics set `compute` in their lifespan, the job server sets `load` in its own. Run apart (`trainmetrics
analytics` alone) the archive is absent, and jobs Prometheus no longer holds are not found.
"""

from dataclasses import dataclass
from typing import Awaitable, Callable


class NotSettled(Exception):
    """The job's report could still change: a process of it or a node exporter attributing it is scraped."""


class PartialAnswer(Exception):
    """The backend answered with part of its data (a store or shard that did not answer): a report computed from
    it may fall short, and is not stored (asked again later)."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.message = "the backend answered with part of its data (a store or shard did not answer)"


@dataclass
class ReportArchive:
    """The two halves of stored reports."""

    # The analytics: a settled job's report, as JSON-ready dicts (NotSettled while it could still change, unless
    # called with settled=False; another error when Prometheus does not hold the job, or with owner=, not wholly as
    # that owner's, or cannot answer).
    compute: Callable[..., Awaitable[dict]] | None = None
    # The job server: (owner, report) of a job whose report it stored, else None.
    load: Callable[[str], Awaitable[tuple[str, dict] | None]] | None = None
