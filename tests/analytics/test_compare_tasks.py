"""The comparison's best_loss on backfilled history (promtool) read raw: losses are compared between jobs of one task
only (trainer_job_info's `task`), never a regression's mean squared error against a classifier's cross-entropy."""

import time

import pytest

from trainmetrics.analytics.app import Settings

from .conftest import as_openmetrics, backfilled_prometheus, running, serve
from .test_fleet_agrees import process

pytestmark = pytest.mark.slow

INFO = dict(job_name="x", model="mlp", device="cpu", owner="alice")


def history(written: float) -> str:
    # (process(): the loss falls as 2 / (1 + minutes trained): the longer run ends lower)
    lines = []
    lines += process("cls-1", "h:1", written - 3000, written - 2400, "completed",
                     {**INFO, "dataset": "digits", "task": "classification"})
    lines += process("cls-2", "h:2", written - 2400, written - 1200, "completed",
                     {**INFO, "dataset": "blobs", "task": "classification"})
    # The lowest loss of all, in other units: a mean squared error.
    lines += process("reg-1", "h:3", written - 3000, written - 600, "completed",
                     {**INFO, "dataset": "diabetes", "task": "regression"})
    # A trainer from before the task label.
    lines += process("old-1", "h:4", written - 3000, written - 1800, "completed", {**INFO, "dataset": "blobs"})
    return as_openmetrics(lines)


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    with running(backfilled_prometheus(tmp_path_factory.mktemp("compare-tasks"), history(time.time()))) as prometheus:
        yield prometheus


def compare(backend, *job_ids: str) -> dict:
    with serve(Settings(prometheus_url=backend.url, recorded_series=False)) as client:
        response = client.get("/api/training/analytics/compare", params={"job_ids": ",".join(job_ids)})
        assert response.status_code == 200, response.text
        return response.json()


def test_losses_of_different_tasks_have_no_winner(backfilled):
    body = compare(backfilled, "cls-1", "reg-1", "cls-2")
    losses = {row["job_id"]: (row["task"], row["final_loss"]) for row in body["jobs"]}
    print("losses:", losses, "winner:", body["winner"]["best_loss"], body["no_winner_reasons"])
    assert min(losses, key=lambda job_id: losses[job_id][1]) == "reg-1"        # what won before
    assert body["winner"]["best_loss"] is None and "best_loss" not in body["ties"]
    assert body["no_winner_reasons"] == {"best_loss": "losses of different tasks are not comparable: "
                                                      "classification: cls-1, cls-2; regression: reg-1"}
    # The other categories are not a loss's: they still have their winner.
    assert body["winner"]["best_throughput"] is not None


def test_losses_of_one_task_are_compared(backfilled):
    body = compare(backfilled, "cls-1", "cls-2")
    assert [row["task"] for row in body["jobs"]] == ["classification", "classification"]
    assert (body["winner"]["best_loss"], body["no_winner_reasons"]) == ("cls-2", {})


def test_a_job_of_no_task_is_not_compared_with_one_of_a_task(backfilled):
    body = compare(backfilled, "old-1", "cls-2")
    assert [row["task"] for row in body["jobs"]] == [None, "classification"]
    assert body["winner"]["best_loss"] is None
    assert body["no_winner_reasons"]["best_loss"].endswith("task unknown: old-1; classification: cls-2")
