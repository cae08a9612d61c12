"""The job server's own stacks of hung jobs (jobserver/hangs.py): every job that became hung is asked in the same
round, then their answers are awaited together."""

import asyncio
import json
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

from trainmetrics.analytics.app import Settings as AnalyticsSettings, build_component as analytics_component
from trainmetrics.analytics.queries import HUNG_JOBS
from trainmetrics.hangs import HangFeed, HungJobs
from trainmetrics.jobserver import hangs, stacks
from trainmetrics.prometheus_process import PrometheusServer

from tests.prometheus_proxy import Relay


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
        return HungJobs(frozenset({"job-a", "job-b", "job-c"}))

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


# A rule of TrainerHang's name that fires for job-a from its first evaluation on, for as long as Prometheus runs.
HANG_FIRING = """groups:
  - name: hang
    interval: 1s
    rules:
      - alert: TrainerHang
        expr: label_replace(vector(1), "job_id", "job-a", "", "")
"""
# Thanos Query's warning for a store that did not answer (partial response on, its default).
STORE_DOWN = "receive series from Addr: 10.0.0.7:10901: rpc error: code = Unavailable"


class PartialHungJobs(Relay):
    """A proxy before a real Prometheus that, while `partial` is set, answers the hung-jobs query as Thanos Query
    does when the store holding the alert did not answer: success, without its series, with a warning."""

    partial = False

    def relay(self, method: str, path: str, headers, body: bytes) -> tuple[int, str, bytes]:
        status, kind, content = self.forward(method, path, headers, body)
        query = dict(urllib.parse.parse_qsl(body.decode())).get("query", "")
        if self.partial and query == HUNG_JOBS:
            answer = json.loads(content)
            content = json.dumps({**answer, "data": {**answer["data"], "result": []},
                                  "warnings": [STORE_DOWN]}).encode()
        return status, kind, content


def test_a_hang_left_out_of_a_partial_answer_is_not_taken_again(tmp_path, monkeypatch):
    """A backend answering with part of its data (a Thanos store that did not answer) left a hung job out: the
    round took that for the hang's end, and at the next whole answer asked the job's ranks again, the same hang's
    stacks taken twice (a flapping store: every time). Real Prometheus, the analytics' own feed of hung jobs."""
    (tmp_path / "hang.yml").write_text(HANG_FIRING)
    prometheus = PrometheusServer(tmp_path / "prometheus", rule_files=[str(tmp_path / "hang.yml")]).start()
    events: list[str] = []

    async def collect(path, before, asked_at):
        return {"ranks": [], "missing_ranks": [0]}

    async def call(operation, *args):
        return operation(*args)

    async def rounds(proxy: PartialHungJobs) -> None:
        feed = HangFeed()
        component = analytics_component(AnalyticsSettings(prometheus_url=proxy.url, hangs=feed))
        async with component.lifespan():
            taker = hangs.HangStacks(feed, call, Service(events))
            await taker.round()
            proxy.partial = True
            await taker.round()
            proxy.partial = False
            await taker.round()

    monkeypatch.setattr(stacks, "collect", collect)
    try:
        prometheus.wait_for('ALERTS{alertname="TrainerHang",alertstate="firing"}', timeout=30)
        with PartialHungJobs(prometheus.url).running() as proxy:
            asyncio.run(rounds(proxy))
    finally:
        prometheus.stop()
    assert events == ["asked job-a"]
