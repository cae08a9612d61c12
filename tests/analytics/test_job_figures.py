"""How the job analytics assemble figures that more than one series carries (analytics/job.py)."""

from trainmetrics.analytics.job import _assemble
from trainmetrics.analytics.lookup import JobFacts, Process, Timeline
from trainmetrics.analytics.shapes import Evaluation


def test_the_last_evaluation_is_one_number_wherever_the_answer_gives_it():
    # VictoriaMetrics converts each block's values from one decimal exponent: the same stored loss can come
    # back a unit in the last place apart from two series (seen: 0.232642251849 and 0.23264225184899998).
    process = Process("127.0.0.1:9000", start=100.0, end=160.0, state="completed")
    facts = JobFacts(job_id="j", info={}, status="completed", processes=[process],
                     timeline=Timeline.of([(100.0, 160.0)]), upload_seconds=None, owners=frozenset(),
                     fingerprint=frozenset(), now=200.0)
    sample = lambda value: [{"metric": {"instance": process.instance, "rank": "0"}, "value": [160, value]}]  # noqa: E731
    found = {"eval_loss": sample("0.23264225184899998"), "eval_accuracy": sample("0.90000000000000002")}
    history = [Evaluation(step=50, loss=0.5, accuracy=0.7, time=130.0),
               Evaluation(step=100, loss=0.232642251849, accuracy=0.9, time=150.0)]
    body = _assemble(facts, found, {}, history, None)
    assert body.losses.final_eval_loss == body.evaluations[-1].loss == 0.232642251849
    assert body.losses.final_eval_accuracy == body.evaluations[-1].accuracy == 0.9
    # Without a history (none read), the newest trainer_eval_loss sample says it.
    alone = _assemble(facts, found, {}, [], None)
    assert alone.losses.final_eval_loss == 0.23264225184899998 and alone.evaluations == []
