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


def test_the_job_list_asks_no_heartbeat_of_jobs_the_server_ended_while_they_waited():
    """A process with an end and no start is a trainer's that failed in its init, or the job server's entry of a
    job it cancelled while queued (never run): which one matters only beside another process of the job
    (lookup.speakers, in_order). Every job cancelled in the queue over the range entered the heartbeat query,
    one max_over_time part each; the resumed job whose newest process failed in its restore still does."""
    from trainmetrics.analytics.fleet import _add_last_seen
    from trainmetrics.analytics.lookup import Process

    now = 1_000_000.0
    processes = {(f"cancelled-{i}", "server:8080"): Process("server:8080", end=now - 100.0 - i, state="cancelled")
                 for i in range(500)}
    processes[("restored", "h:20")] = Process("h:20", start=now - 3000, end=now - 2400, state="paused")
    processes[("restored", "h:21")] = Process("h:21", end=now - 2290, state="failed")
    backend = Backend({"seen_0": [({"job_id": "restored", "instance": "h:21", "rank": "0"}, now - 2290)]})
    asyncio.run(_add_last_seen(backend, processes, 7200.0, now))
    assert backend.asked == ["seen_0"], backend.asked[:5]
    assert processes[("restored", "h:21")].last_seen == now - 2290
