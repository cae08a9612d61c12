"""The job server's own stacks of hung jobs (jobserver/hangs.py): every job that became hung is asked in the same
round, then their answers are awaited together."""

import asyncio
from pathlib import Path
from types import SimpleNamespace

from trainmetrics.jobserver import hangs, stacks


class Service:
    """request_stacks as JobService answers it for a running job of this server: each ask noted."""

    def __init__(self, events: list[str]):
        self.events = events
        self.store = SimpleNamespace(get_job=lambda job_id: SimpleNamespace(id=job_id, owner="default"))

    def request_stacks(self, owner, job_id):
        self.events.append(f"asked {job_id}")
        return {}, Path("/nonexistent") / job_id, {0: 0}, 0.0


def three_hung_jobs(monkeypatch, service: Service, collect) -> hangs.HangStacks:
    """A HangStacks for which TrainerHang fires for job-a, job-b and job-c, its ranks' answers from `collect`."""
    async def hung_jobs():
        return {"job-a", "job-b", "job-c"}

    async def call(operation, *args):
        return operation(*args)

    monkeypatch.setattr(stacks, "collect", collect)
    return hangs.HangStacks(SimpleNamespace(hung_jobs=hung_jobs), call, service)


def test_every_hung_job_is_asked_before_any_answer_is_awaited(monkeypatch):
    """One job at a time, each answer awaited up to 5 s (a rank that never answers): in a hang of many jobs at
    once (a switch gone, every job's collective stuck), the twentieth job's ranks were asked 100 s late."""
    events: list[str] = []

    async def collect(path, before, asked_at):
        await asyncio.sleep(0.05)      # the ranks' answer (up to stacks.ANSWER_SECONDS)
        events.append(f"answered {path.name}")
        return {"ranks": [], "missing_ranks": [0]}

    taker = three_hung_jobs(monkeypatch, Service(events), collect)
    asyncio.run(taker.round())
    assert events[:3] == ["asked job-a", "asked job-b", "asked job-c"]
    assert sorted(events[3:]) == ["answered job-a", "answered job-b", "answered job-c"]
    assert taker.taken == {"job-a", "job-b", "job-c"}
    asyncio.run(taker.round())              # once per hang
    assert len(events) == 6


def test_a_job_whose_ask_fails_does_not_keep_the_others_from_being_asked(monkeypatch, caplog):
    """An error asking one hung job (a Ray job's stacks request file on a full disk) was raised out of the round:
    every job sorted after it went unasked, round after round, and the round's failure was all the log said."""
    events: list[str] = []

    class FailingForB(Service):
        def request_stacks(self, owner, job_id):
            if job_id == "job-b":
                raise OSError(28, "No space left on device")
            return super().request_stacks(owner, job_id)

    async def collect(path, before, asked_at):
        return {"ranks": [], "missing_ranks": [0]}

    taker = three_hung_jobs(monkeypatch, FailingForB(events), collect)
    asyncio.run(taker.round())
    asyncio.run(taker.round())              # job-b asked again, said once
    assert events == ["asked job-a", "asked job-c"]
    assert taker.taken == {"job-a", "job-c"}
    assert caplog.text.count("job job-b: TrainerHang fires: cannot ask its ranks for their stacks") == 1
