"""Every trainer instrument, declared once: exposition name (from the contract), OpenTelemetry unit and
description. docs/metrics.md is the maintained contract for these names; tests compare the two both ways.

Names are the exposition names, as series.py writes them to /metrics and as the OpenTelemetry Prometheus exporter
would (it appends no unit suffix when the name already ends with it, and ``_total`` to a counter's name without it).
"""

from dataclasses import dataclass

from trainmetrics.contract import Trainer as T


@dataclass(frozen=True)
class Instrument:
    """One metric: its exposition name, unit and meaning."""

    name: str
    unit: str
    description: str


JOB_INFO = Instrument(T.JOB_INFO, "1", "Job metadata; always 1.")
JOB_STATE = Instrument(T.JOB_STATE, "1", "1 for the job's current lifecycle state, 0 for the others.")
JOB_FAILURE = Instrument(T.JOB_FAILURE, "1", "1 with the exception class of a failed job; absent unless it failed.")
JOB_START = Instrument(T.JOB_START, "s", "Unix time this process started training the job.")
JOB_END = Instrument(T.JOB_END, "s", "Unix time this process stopped training: a final state, or paused.")
HEARTBEAT = Instrument(T.HEARTBEAT, "s", "Unix time of this scrape, by the job's clock: when the job was last seen.")
UPLOAD_DURATION = Instrument(T.UPLOAD_DURATION, "s", "Time to upload and ingest the job's dataset.")
STEPS = Instrument(T.STEPS, "1", "Optimizer steps completed.")
SAMPLES = Instrument(T.SAMPLES, "1", "Training samples processed.")
EPOCH = Instrument(T.EPOCH, "1", "Current epoch, counted from 0.")
LOSS = Instrument(T.LOSS, "1", "Mean training loss over the last log interval.")
LOSS_FIRST = Instrument(T.LOSS_FIRST, "1", "Mean training loss of the job's first log interval.")
LOSS_MIN = Instrument(T.LOSS_MIN, "1", "Lowest mean training loss of any log interval so far.")
LOSS_SUM = Instrument(T.LOSS_SUM, "1", "Sum of the logged (finite) mean training losses (a gauge: a loss may be "
                      "negative).")
LOSS_INTERVALS = Instrument(T.LOSS_INTERVALS, "1", "Log intervals with a finite mean training loss.")
# NaN and infinite measurements are left out (series.py; the OpenTelemetry SDK too), so a diverged loss cannot
# appear as a NaN gauge: this counter is how it reaches Prometheus (and the TrainerLossNaN alert).
LOSS_NONFINITE = Instrument(T.LOSS_NONFINITE, "1", "Log intervals whose mean training loss was NaN or infinite.")
# ...and this gauge says whether the last interval's was: trainer_loss alone would show a diverged job's last
# finite loss as its final one.
LOSS_FINITE = Instrument(T.LOSS_FINITE, "1", "1 when the last log interval's mean training loss was finite, 0 when "
                         "NaN or infinite (trainer_loss then holds the last finite one).")
EVALUATIONS = Instrument(T.EVALUATIONS, "1", "Evaluations completed.")
EVAL_LOSS = Instrument(T.EVAL_LOSS, "1", "Loss of the last evaluation.")
EVAL_ACCURACY = Instrument(T.EVAL_ACCURACY, "1", "Accuracy (0..1) of the last evaluation.")
EVAL_LOSS_MIN = Instrument(T.EVAL_LOSS_MIN, "1", "Lowest evaluation loss so far.")
EVAL_ACCURACY_MAX = Instrument(T.EVAL_ACCURACY_MAX, "1", "Highest evaluation accuracy (0..1) so far.")
EVAL_HISTORY_INDEX = Instrument(T.EVAL_HISTORY_INDEX, "1", "Number (from 1) of the evaluation held in the slot.")
EVAL_HISTORY_STEP = Instrument(T.EVAL_HISTORY_STEP, "1", "Step after which the slot's evaluation ran.")
EVAL_HISTORY_TIME = Instrument(T.EVAL_HISTORY_TIME, "s", "Unix time the slot's evaluation finished.")
EVAL_HISTORY_LOSS = Instrument(T.EVAL_HISTORY_LOSS, "1", "Loss of the slot's evaluation.")
EVAL_HISTORY_ACCURACY = Instrument(T.EVAL_HISTORY_ACCURACY, "1", "Accuracy (0..1) of the slot's evaluation.")
LEARNING_RATE = Instrument(T.LEARNING_RATE, "1", "Current learning rate.")
STEP_DURATION = Instrument(T.STEP_DURATION, "s", "Wall time per optimizer step, data wait included.")
STEP_DURATION_MAX = Instrument(T.STEP_DURATION_MAX, "s", "Longest optimizer step so far, data wait included.")
DATA_WAIT = Instrument(T.DATA_WAIT, "s", "Time spent waiting for the next batch.")
CHECKPOINTS = Instrument(T.CHECKPOINTS, "1", "Checkpoints written.")
CHECKPOINT_DURATION = Instrument(T.CHECKPOINT_DURATION, "s", "Time to write one checkpoint.")
GPU_MEMORY_PEAK = Instrument(T.GPU_MEMORY_PEAK, "By",
                             "Peak bytes allocated by the CUDA caching allocator (CUDA jobs only).")
MFU = Instrument(T.MFU, "1", "Model FLOPs utilisation over the last log interval (where the model's FLOPs and "
                             "the device peak are known).")

JOB_SUBMITTED = Instrument(T.JOB_SUBMITTED, "s", "Unix time the job was submitted (jobs of the job server).")
PROCESS_START = Instrument(T.PROCESS_START, "s", "Unix time this process started (before its imports; a later job "
                                                "in the same process: its creation): the start of its init phase.")
PHASE = Instrument(T.PHASE, "1", "1 for the phase this process is in now, 0 for the others.")
PHASE_SINCE = Instrument(T.PHASE_SINCE, "s", "Unix time the current phase began.")
PHASE_SECONDS = Instrument(T.PHASE_SECONDS, "s", "Seconds of the job spent in each phase (carried across resumes).")
CHECKPOINTED_SECONDS = Instrument(T.CHECKPOINTED_SECONDS, "s", "The job's phase seconds in all when its last checkpoint "
                                                              "was written, its write included.")
LAST_STEP = Instrument(T.LAST_STEP, "s", "Unix time the last optimizer step completed.")
PROGRESS = Instrument(T.PROGRESS, "s", "Unix time the loop last made progress: a step completed, or an evaluation "
                                      "or checkpoint ended, or training started.")
LOSS_SPIKES = Instrument(T.LOSS_SPIKES, "1", "Log intervals whose loss spiked far above its running mean.")
# This process's own counts of the two (counted by the process itself: 0 at its start, a resume's too): a rise
# of these is a new one, what TrainerLossNaN and TrainerLossSpike alert on. The job's counts jump at a resume,
# down or up to the carried count, which no rule can tell from a new one.
PROCESS_LOSS_NONFINITE = Instrument(T.PROCESS_LOSS_NONFINITE, "1", "Log intervals of this process whose mean training "
                                    "loss was NaN or infinite (0 at its start, a resume's included).")
PROCESS_LOSS_SPIKES = Instrument(T.PROCESS_LOSS_SPIKES, "1", "Log intervals of this process whose loss spiked far "
                                 "above its running mean (0 at its start, a resume's included).")
STACK_DUMPS = Instrument(T.STACK_DUMPS, "1", "Thread stack dumps the hang watchdog wrote.")
HANG_MIN = Instrument(T.HANG_MIN, "s", "The least time without progress that is a hang (the job's hang_seconds): "
                                      "the floor of the hang watchdog's bound and of TrainerHang's.")

# Seconds. Steps run from ~1 ms (small CPU models) to minutes (large models, gradient accumulation); data
# waits can be far shorter, so the scale starts at 100 µs. The SDK default (0..10,000) is shaped for
# milliseconds. The hang bound is 10 x the p99 step: a p99 past the last finite bucket reads as that bucket,
# so the scale reaches 10 minutes (with 10 s last, TrainerHang fired on every step of a job with 2-minute steps).
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CHECKPOINT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
