"""Finding a job by id (lookup.find_jobs) over backend answers given part by part."""

import asyncio
import re

from trainmetrics.analytics import queries as q
from trainmetrics.analytics.lookup import find_jobs

PART = re.compile(rf'"{q.PART_LABEL}", "(\w+)"')


class Backend:
    """Answers each tagged part of a union from `answers` (part name without its __<job> suffix: samples as
    (labels, value)); every other part is empty."""

    def __init__(self, answers: dict[str, list[tuple[dict, float]]]):
        self.answers = answers
        self.asked: list[str] = []

    async def query(self, expr: str, time_: float | None = None) -> list[dict]:
        names = PART.findall(expr)
        self.asked.extend(names)
        return [{"metric": {**labels, q.PART_LABEL: name}, "value": [time_, repr(value)]}
                for name in names for labels, value in self.answers.get(name.rsplit("__", 1)[0], [])]

    async def answer_delay(self) -> float:
        return 0.0


def test_a_process_whose_state_went_stale_before_its_heartbeat_has_its_final_state():
    """Remote write brings a scrape's stale markers in several requests, and VictoriaMetrics shows each as it
    arrives: the job's state series stale at now while its heartbeat and start still answer. It stopped: it has
    an end. It was read `unknown` (live, without a state); its state is the last one before its final scrape."""
    now = 1_000_000.0
    end, last_seen, start, spawned = now - 2.0, now - 1.75, now - 60.0, now - 63.0
    process = {"job_id": "rw-b-1", "instance": "127.0.0.1:4242", "rank": "0"}
    backend = Backend({
        # job_recent: its end over the lookback, its start and heartbeat at now, no state at now
        "end": [(process, end)], "starts": [(process, start)], "spawns": [(process, spawned)],
        "start": [(process, start)], "heartbeat": [(process, last_seen)], "spawned": [(process, spawned)],
        # job_ended: its last values before its final scrape
        "end_0": [], "start_0": [(process, start)], "spawned_0": [(process, spawned)],
        "state_0": [({**process, "state": "completed"}, 1.0)], "heartbeat_0": [(process, last_seen)],
    })
    [facts] = asyncio.run(find_jobs(backend, ["rw-b-1"], 86400.0, now))
    assert facts.status == "completed"
    assert "state_0__0" in backend.asked
    assert (facts.start, facts.end) == (start, end)
    assert not facts.settled        # still scraped at now in the store: not cached until it is not
