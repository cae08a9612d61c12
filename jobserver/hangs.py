"""Stacks of hung jobs, taken by the job server itself: when TrainerHang fires for one of its running jobs, the
server asks every rank for its thread stacks once (as `GET .../stacks` does), so they are on disk in the job's
directory (`stacks.rank<N>.txt`) before anyone looks. Once per hang: a job is asked again only after the
alert has stopped firing for it (as an answer with all of the backend's data says) and fired anew.

The alert is read through the analytics (trainmetrics.hangs), from the Prometheus they read, which must
evaluate the deployable rules. The trainer's own watchdog (trainer/watchdog.py) applies the same bound from
inside the process; this one works from outside it, for a process whose main thread is stuck. A process none
of whose Python threads can run (a hang holding the GIL in native code) serves no scrape either: TrainerHang
cannot fire for it (TargetDown does), and its stacks are taken on request (`GET .../stacks`).
"""

import asyncio
import logging

from trainmetrics.edge import ApiError
from trainmetrics.jobserver import stacks

log = logging.getLogger("trainmetrics.server")


class HangStacks:
    """One round at a time from the server's loop: take the stacks of jobs that became hung."""

    def __init__(self, feed, call, service):
        self.feed, self.call, self.service = feed, call, service
        self.taken: set[str] = set()        # jobs whose current hang has its stacks
        self._failing: set[str] = set()     # jobs whose ask failed in their current hang (said once per hang)
        self._unreachable = False

    def _ask(self, job_id: str) -> tuple | None:
        """Ask the job's ranks for their stacks, whoever owns it: (its directory, each rank's stacks-file length
        before), or None when it is not a running job of this server."""
        job = self.service.store.get_job(job_id)
        if job is None:
            return None
        try:
            _, path, before, asked_at = self.service.request_stacks(job.owner, job_id)
        except ApiError:
            return None
        return None if before is None else (path, before, asked_at)

    async def round(self) -> None:
        if self.feed is None or self.feed.hung_jobs is None:
            return
        try:
            hung = await self.feed.hung_jobs()
        except Exception as error:
            if not self._unreachable:       # said once per outage, not every round
                log.warning("cannot tell hung jobs (TrainerHang) from Prometheus: %s", getattr(error, "message", error))
            self._unreachable = True
            return
        self._unreachable = False
        if hung.whole:
            # A hang that ended: the next one is taken again. Not on a partial answer: the job it leaves out may
            # hang still, and was asked again at the next whole answer (a flapping store: once per flap).
            self.taken &= hung.ids
            self._failing &= hung.ids
        asked = []
        for job_id in sorted(hung.ids - self.taken):
            try:
                found = await self.call(self._ask, job_id)
            except Exception as error:
                # Asked again next round, the others asked meanwhile: raised out of the round, one job's failure
                # (a Ray job's request file on a full disk) kept every job sorted after it from being asked, round
                # after round.
                if job_id not in self._failing:
                    log.warning("job %s: TrainerHang fires: cannot ask its ranks for their stacks: %s", job_id, error)
                self._failing.add(job_id)
                continue
            self._failing.discard(job_id)
            if found is not None:           # (None: not one of this server's running jobs)
                self.taken.add(job_id)
                asked.append((job_id, *found))
        # Every hung job asked first, then their answers awaited together: one at a time, each up to
        # stacks.ANSWER_SECONDS (a rank that never answers), the twentieth job of a hang of many at once (a switch
        # gone, every job's collective stuck) was asked 100 s late.
        answers = await asyncio.gather(*(stacks.collect(path, before, asked_at) for _, path, before, asked_at in asked))
        for (job_id, path, _, _), answer in zip(asked, answers):
            log.warning("job %s: TrainerHang fires: took the stacks of ranks %s (%s), missing %s", job_id,
                        [rank["rank"] for rank in answer["ranks"]], stacks.stacks_file(path, 0).parent,
                        answer["missing_ranks"] or "none")
