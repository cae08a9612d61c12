"""The evaluation history: a scraper that starts a little after the others is still shown every evaluation."""

from trainmetrics.trainer.evaluations import LATE_SCRAPER_SECONDS, EvaluationHistory


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scrape(history: EvaluationHistory, scraper: str, active: set[str]) -> list[int]:
    """One delivered scrape: the steps it showed."""
    shown = history.shown(scraper)
    history.delivered(scraper, shown, active)
    return [record.step for record in shown]


def test_a_late_scraper_is_shown_what_the_others_already_had():
    """Before: an evaluation every active scraper had was dropped at once, so the second Prometheus of a pair
    that found the job a little later held only the newest evaluation of each slot (the suite saw it miss the
    job's first two of ten)."""
    clock = Clock()
    history = EvaluationHistory(clock=clock)
    steps = list(range(25, 275, 25))                # ten evaluations: more than the slots
    for step in steps:
        history.add(step, clock(), 1.0, 0.5)
    assert scrape(history, "a", {"a"}) == steps[:8]                 # eight slots a scrape
    assert scrape(history, "a", {"a"}) == steps[2:]                 # the last two, and the newest of each slot
    clock.now += 1
    first, second = scrape(history, "b", {"a", "b"}), scrape(history, "b", {"a", "b"})
    assert first == steps[:8] and sorted(set(first + second)) == steps
    assert history.complete_for("b")


def test_what_every_scraper_has_goes_once_the_late_window_passed():
    clock = Clock()
    history = EvaluationHistory(clock=clock)
    history.add(25, clock(), 1.0, 0.5)
    scrape(history, "a", {"a"})
    assert not history.complete_for("c")            # within the window: kept for a scraper not seen yet
    clock.now += LATE_SCRAPER_SECONDS + 1
    scrape(history, "a", {"a"})
    assert history.complete_for("c")                # gone: nothing is pending for a newcomer
    assert scrape(history, "c", {"a", "c"}) == [25]  # its slot still shows the newest evaluation
