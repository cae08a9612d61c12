"""Every evaluation reaches every scraper, however fast evaluations come.

A gauge shows one value per scrape, so evaluations that come faster than scrapes would overwrite each other.
The history series (`trainer_eval_history_*{slot}`) hold them instead: evaluation number i sits in slot
i mod SLOTS, and each scraper is shown, per scrape, the next SLOTS evaluations it has not been delivered
yet (a slot without one keeps showing its last). An evaluation is kept until every active scraper has had
it delivered (its answer was written to the scraper's connection), and for LATE_SCRAPER_SECONDS at least,
so a scraper that starts a little after the others (an HA pair's second Prometheus, finding the job later)
is shown it too; the job's linger waits for every active scraper.
"""

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

log = logging.getLogger("trainmetrics.trainer")

SLOTS = 8
# Evaluations every scraper has are still kept this long for a scraper not seen yet. Seen in the suite: a
# 2-node job's first two evaluations came within the 250 ms before the second Prometheus' first scrape.
LATE_SCRAPER_SECONDS = 30.0
# Evaluations kept for scrapers that have not read them; beyond this the oldest go (a job evaluating
# thousands of times while nothing scrapes).
MAX_RETAINED = 10_000


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: its number in the job (from 1), the step after which it ran, when, and its results."""

    index: int
    step: int
    time: float
    loss: float | None
    accuracy: float | None

    @property
    def slot(self) -> str:
        """The history slot it is shown in."""
        return str(self.index % SLOTS)


class EvaluationHistory:
    """The evaluations not yet delivered to every scraper, and each scraper's progress through them."""

    def __init__(self, first_index: int = 1, clock=time.time):
        self._clock = clock             # the evaluations' own clock (Evaluation.time)
        self._lock = threading.Lock()
        self._records: deque[Evaluation] = deque()
        self._newest_per_slot: dict[str, Evaluation] = {}
        self._next_index = first_index
        self._dropping = False
        self._delivered: dict[str, int] = {}     # scraper -> highest index delivered (all before it too)

    @property
    def count(self) -> int:
        """Evaluations recorded in the job so far."""
        return self._next_index - 1

    def add(self, step: int, time: float, loss: float | None, accuracy: float | None) -> Evaluation:
        """Record an evaluation; returns it with its number."""
        with self._lock:
            record = Evaluation(self._next_index, step, time, loss, accuracy)
            self._next_index += 1
            self._records.append(record)
            if len(self._records) > MAX_RETAINED:
                oldest = self._records.popleft()
                everyone_has = min(self._delivered.values(), default=0)
                if oldest.index > everyone_has and not self._dropping:    # not one kept for a late scraper
                    self._dropping = True
                    log.warning("over %d evaluations not read by a scraper: dropping the oldest", MAX_RETAINED)
            return record

    def _after(self, scraper: str | None) -> int:
        """The highest index `scraper` has, with everything before it (a new scraper: all that is kept)."""
        floor = self._records[0].index - 1 if self._records else self._next_index - 1
        return max(self._delivered.get(scraper, floor), floor) if scraper is not None else floor

    def shown(self, scraper: str | None) -> list[Evaluation]:
        """What one scrape shows, one evaluation per slot: a counting scraper's next undelivered ones, and for
        the other slots their newest; anyone else sees the newest of each slot."""
        with self._lock:
            if scraper is not None:
                after = self._after(scraper)
                pending = [record for record in self._records if record.index > after][:SLOTS]
            else:
                pending = list(self._records)[-SLOTS:]
            shown = {record.slot: record for record in pending}
            # Every index after `after` is pending up to the newest, so the others are older: already delivered.
            for slot, record in self._newest_per_slot.items():
                shown.setdefault(slot, record)
            return sorted(shown.values(), key=lambda record: record.index)

    def delivered(self, scraper: str, shown: list[Evaluation], active: set[str]) -> None:
        """A scrape's answer reached `scraper`: it has every evaluation up to the last pending one it was
        shown. Evaluations every active scraper has are then dropped."""
        with self._lock:
            contiguous = self._after(scraper)
            for record in sorted(shown, key=lambda r: r.index):
                if record.index == contiguous + 1:
                    contiguous = record.index
                newest = self._newest_per_slot.get(record.slot)
                if newest is None or record.index > newest.index:
                    self._newest_per_slot[record.slot] = record
            self._delivered[scraper] = contiguous
            for gone in set(self._delivered) - active - {scraper}:
                del self._delivered[gone]
            everyone_has = min(self._delivered.values())
            kept_since = self._clock() - LATE_SCRAPER_SECONDS
            while self._records and self._records[0].index <= everyone_has and self._records[0].time < kept_since:
                self._records.popleft()

    def complete_for(self, scraper: str) -> bool:
        """True when `scraper` has been delivered every evaluation recorded so far."""
        with self._lock:
            return self._after(scraper) >= self._next_index - 1
