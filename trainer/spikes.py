"""Loss spikes caught on the log interval they happen in: an interval whose mean loss lies more than `z`
standard deviations above the running mean of the intervals before it (exponentially weighted, so the
mean follows a falling loss) is a spike. Spikes do not enter the running mean, so one does not hide the
next; but a rise that lasts `warmup` intervals in a row is the loss's new level, not a spike that goes on for
ever: the detector starts again from those intervals, as from a warm-up's (otherwise every interval after a
lasting shift, a new data mix or a learning-rate restart, would be flagged until the job ends). Defaults:
z = 6, after 10 intervals of warm-up (docs/metrics.md). An interval cut short (by a checkpoint, the run's end)
has a noisier mean: it is judged, and learnt, by its share of a full interval's steps.

The warm-up intervals have nothing before them to be judged against: once there are `warmup` of them, the
detector starts from those within WARMUP_OUTLIER_MADS median absolute deviations of their median, so a spike among
them (a bad first shard) does not widen the spread for the intervals after it (it hid a second spike of the same
size for 25 intervals more): its mean at their last ones' level, its deviation their wobble from one interval to the
next, not their fall (_start_from)."""

import math
import statistics
import sys

# Weight of a new interval in the running mean and spread: about the last 20 intervals count.
ALPHA = 0.1
# A warm-up interval this many (normal-scaled) median absolute deviations above the warm-up's median is left out
# of what the detector starts from.
WARMUP_OUTLIER_MADS = 6.0
# The warm-up's last intervals (its outliers left out) whose median is the level the detector starts from.
WARMUP_LEVEL_INTERVALS = 3
# The least spread a loss is judged against, relative to its level (and absolute, for a loss at 0): a loss flat to
# the last digit has none, and then no rise was a spike (spread 0), or one of 1e-4 was (a spread of 1e-5).
SPREAD_FLOOR_RELATIVE, SPREAD_FLOOR_ABSOLUTE = 1e-3, 1e-8
# The running standard deviation saturates here (only a difference past a float, 1e308 against -1e308, reaches it):
# an infinite one never came down again (every later spike hidden) and made the checkpoint's state unloadable.
DEVIATION_MAX = sys.float_info.max


def _floor(level: float) -> float:
    return SPREAD_FLOOR_RELATIVE * abs(level) + SPREAD_FLOOR_ABSOLUTE


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class LossSpikeDetector:
    """Running mean and standard deviation of the log intervals' losses, and the spikes above them. The deviation is
    kept, not the variance: a variance squares the losses, and one of losses near 1e200 (a rise of 1e198 squares past
    a float) saturated at a float's largest, a deviation of 1e154, so each interval's ordinary wobble was a spike."""

    def __init__(self, z: float = 6.0, warmup: int = 10):
        self.z, self.warmup = z, warmup
        self.mean: float | None = None
        self.deviation = 0.0
        self.seen = 0
        self.spikes = 0
        self._run: list[float] = []       # the spikes in a row so far
        self._early: list[float] = []     # the warm-up intervals, until there are `warmup` of them

    def observe(self, loss: float, share: float = 1.0) -> bool:
        """Take an interval's mean loss; True when it is a spike. `share`: the interval's steps over a full
        interval's (an interval a checkpoint or the run's end cut short has fewer, and a noisier mean: its
        spread is the full intervals' / sqrt(share). Judged as a full one, a clean run's one-step interval
        before a checkpoint was a spike one time in five)."""
        if not math.isfinite(loss):
            return False
        share = min(max(share, 1e-6), 1.0)
        if self.mean is not None and self.seen >= self.warmup:
            spread = max(self.deviation, _floor(self.mean)) / math.sqrt(share)
            if (loss - self.mean) / spread > self.z:
                self.spikes += 1
                self._run.append(loss)
                if len(self._run) >= self.warmup:      # a lasting rise: the new level, started from its intervals
                    run, self._run = self._run, []
                    self._start_from(run)
                return True
            # A drop is learnt (a falling loss is no spike) as one of z spreads at most: an interval far below (a
            # batch of padding at loss 0) widened the spread by its whole fall, hiding the spikes after it, and
            # pulled the mean so far down that the loss's return to its level read as spikes.
            learnt = max(loss, self.mean - self.z * spread)
        else:
            learnt = loss
        self._run = []
        self._learn(learnt, share)
        if self._early is not None and self.seen <= self.warmup:
            self._early.append(loss)
            if len(self._early) >= self.warmup:
                self._start_from(self._early)
        return False

    def _start_from(self, early: list[float]) -> None:
        """Start the running mean and deviation from the warm-up intervals, their outliers left out: the mean at
        where the loss is at the warm-up's end (the median of its last WARMUP_LEVEL_INTERVALS kept), the deviation
        its wobble from one interval to the next around their typical change (the root mean square of the changes
        less their median, over √2: the deviation of one interval's noise), so a loss that falls in its warm-up
        (most do: a language model's from 10 to 2 in its first hundreds of steps) is not taken for one that
        wobbles by its fall. Learnt in order, from the first interval on, the mean started at 6 and the deviation
        at 3 for such a loss, and a rise from 2 to 10 after the warm-up was no spike for 25 intervals."""
        middle = statistics.median(early)
        spread = max(1.4826 * statistics.median(abs(value - middle) for value in early), _floor(middle))
        kept = [value for value in early if value - middle <= WARMUP_OUTLIER_MADS * spread]
        # Halves of the changes, and halves of those less their median: no difference of losses near a float's
        # largest overflows (hypot squares nothing; a sum past a float saturates below).
        halves = [later / 2 - earlier / 2 for earlier, later in zip(kept, kept[1:])]
        wobble = 0.0
        if halves:
            typical = statistics.median(halves)
            wobble = 4 * math.hypot(*(half / 2 - typical / 2 for half in halves)) / math.sqrt(2 * len(halves))
        self.mean = statistics.median(kept[-WARMUP_LEVEL_INTERVALS:])
        self.deviation, self.seen, self._early = min(wobble, DEVIATION_MAX), len(early), None

    def state_dict(self) -> dict:
        """What a resumed process needs to watch on at once (without it, a resume was blind for `warmup`
        intervals: the very spike a job paused on went unflagged when its batch came again)."""
        # The variance too (saturated), for a trainer from before the deviation that resumes from this checkpoint.
        variance = min(self.deviation * self.deviation, DEVIATION_MAX)
        return {"mean": self.mean, "deviation": self.deviation, "variance": variance, "seen": self.seen,
                "run": list(self._run), "early": None if self._early is None else list(self._early)}

    def load_state_dict(self, state: dict) -> None:
        """Take over state_dict(); ValueError, and nothing taken, for anything that is not one."""
        mean, deviation, seen, run = state.get("mean"), state.get("deviation"), state.get("seen"), state.get("run")
        if deviation is None:     # (older checkpoints hold the variance alone)
            variance = state.get("variance")
            deviation = math.sqrt(variance) if _number(variance) and variance >= 0 else variance
        early = state.get("early", [] if seen is not None and seen < self.warmup else None)    # (older checkpoints)

        def finite(value) -> bool:
            return _number(value) and math.isfinite(value)

        if not ((mean is None or finite(mean)) and finite(deviation) and deviation >= 0 and isinstance(seen, int)
                and not isinstance(seen, bool) and seen >= 0 and isinstance(run, list) and all(map(finite, run))
                and (early is None or (isinstance(early, list) and all(map(finite, early))))):
            raise ValueError("loss_spike_detector: not a detector's state")
        self.mean, self.deviation, self.seen = None if mean is None else float(mean), float(deviation), seen
        self._run = [float(value) for value in run]
        self._early = None if early is None else [float(value) for value in early]

    def _learn(self, loss: float, share: float = 1.0) -> None:
        self.seen += 1
        if self.mean is None:
            self.mean = loss
            return
        # A short interval weighs by its share, and its deviation is scaled to a full interval's (its variance is
        # 1/share times theirs): the running deviation stays that of full intervals' means.
        delta, alpha = loss - self.mean, ALPHA * share
        if math.isfinite(delta):
            self.mean += alpha * delta
        else:       # 1e308 against -1e308: their difference overflows, their weighted sum does not
            self.mean = (1 - alpha) * self.mean + alpha * loss
        # variance' = (1 - alpha)(variance + alpha share delta²), as deviations: hypot squares nothing.
        spread = math.sqrt(1 - alpha) * math.hypot(self.deviation, math.sqrt(alpha * share) * abs(delta))
        self.deviation = min(spread, DEVIATION_MAX)
