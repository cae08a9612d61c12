"""Every trainer metric, declared once: Prometheus name, OpenTelemetry unit, description, kind.

docs/metrics.md is the maintained contract for these names; tests compare the two both ways.
Names are the exposition names: the Prometheus exporter appends no unit suffix when the name already
ends with it, and writes counters as ``<name>`` + ``_total``.
"""

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    """How an instrument is fed: synchronously from the loop or observed at collection time."""

    COUNTER = "counter"                      # observable: read from a Python int at scrape time
    GAUGE = "gauge"                          # synchronous gauge, set at log/eval/lifecycle points
    OBSERVABLE_GAUGE = "observable_gauge"    # read at scrape time
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class Instrument:
    """One metric: its exposition name, unit, meaning and kind."""

    name: str
    unit: str
    description: str
    kind: Kind


JOB_STATES = ("queued", "running", "paused", "completed", "failed", "cancelled")

JOB_INFO = Instrument("trainer_job_info", "1", "Job metadata; always 1.", Kind.OBSERVABLE_GAUGE)
JOB_STATE = Instrument("trainer_job_state", "1", "1 for the job's current lifecycle state, 0 for the others.",
                       Kind.OBSERVABLE_GAUGE)
JOB_FAILURE = Instrument("trainer_job_failure_info", "1",
                         "1 with the exception class of a failed job; absent unless the job failed.",
                         Kind.OBSERVABLE_GAUGE)
JOB_START = Instrument("trainer_job_start_timestamp_seconds", "s",
                       "Unix time the job started running.", Kind.OBSERVABLE_GAUGE)
JOB_END = Instrument("trainer_job_end_timestamp_seconds", "s",
                     "Unix time the job reached a final state; absent while it runs.", Kind.OBSERVABLE_GAUGE)
UPLOAD_DURATION = Instrument("trainer_upload_duration_seconds", "s",
                             "Time to upload and ingest the job's dataset.", Kind.OBSERVABLE_GAUGE)
STEPS = Instrument("trainer_steps_total", "1", "Optimizer steps completed.", Kind.COUNTER)
SAMPLES = Instrument("trainer_samples_total", "1", "Training samples processed.", Kind.COUNTER)
EPOCH = Instrument("trainer_epoch", "1", "Current epoch, counted from 0.", Kind.GAUGE)
LOSS = Instrument("trainer_loss", "1", "Mean training loss over the last log interval.", Kind.GAUGE)
# The OpenTelemetry SDK drops NaN and infinite measurements, so a diverged loss cannot appear as a NaN
# gauge: this counter is how it reaches Prometheus (and the TrainerLossNaN alert).
LOSS_NONFINITE = Instrument("trainer_loss_nonfinite_total", "1",
                            "Log intervals whose mean training loss was NaN or infinite.", Kind.COUNTER)
EVAL_LOSS = Instrument("trainer_eval_loss", "1", "Loss of the last evaluation.", Kind.GAUGE)
EVAL_ACCURACY = Instrument("trainer_eval_accuracy_ratio", "1", "Accuracy (0..1) of the last evaluation.",
                           Kind.GAUGE)
LEARNING_RATE = Instrument("trainer_learning_rate", "1", "Current learning rate.", Kind.GAUGE)
STEP_DURATION = Instrument("trainer_step_duration_seconds", "s",
                           "Wall time per optimizer step, data wait included.", Kind.HISTOGRAM)
DATA_WAIT = Instrument("trainer_data_wait_seconds", "s", "Time spent waiting for the next batch.",
                       Kind.HISTOGRAM)
CHECKPOINTS = Instrument("trainer_checkpoints_total", "1", "Checkpoints written.", Kind.COUNTER)
CHECKPOINT_DURATION = Instrument("trainer_checkpoint_duration_seconds", "s",
                                 "Time to write one checkpoint.", Kind.HISTOGRAM)
GPU_MEMORY_PEAK = Instrument("trainer_gpu_memory_peak_bytes", "By",
                             "Peak bytes allocated by the CUDA caching allocator (CUDA jobs only).", Kind.GAUGE)
MFU = Instrument("trainer_model_flops_utilization_ratio", "1",
                 "Model FLOPs utilisation over the last log interval (where the model's FLOPs and the device "
                 "peak are known).", Kind.GAUGE)

ALL = (JOB_INFO, JOB_STATE, JOB_FAILURE, JOB_START, JOB_END, UPLOAD_DURATION, STEPS, SAMPLES, EPOCH, LOSS,
       LOSS_NONFINITE, EVAL_LOSS, EVAL_ACCURACY, LEARNING_RATE, STEP_DURATION, DATA_WAIT, CHECKPOINTS, CHECKPOINT_DURATION,
       GPU_MEMORY_PEAK, MFU)

# Seconds. Steps run from ~1 ms (small CPU models) to ~10 s (large GPU models); data waits can be far
# shorter, so the scale starts at 100 µs. The SDK default (0..10,000) is shaped for milliseconds.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0)
CHECKPOINT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
