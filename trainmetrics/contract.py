"""The contract between the parts of trainmetrics, written once: job ids, job states, exit codes, the metric
names more than one part reads, and the job spec (every `trainmetrics train` option, which of them a job
server request may set, and how a spec becomes `trainmetrics train` arguments).

Imports the standard library only: the CLI's --help, the job server and the analytics load it for free.
"""

import math
import re
import secrets
import signal
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

# ----- job ids -------------------------------------------------------------------------------------------

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Ids the API's paths cannot tell from their own words: /api/training/jobs/analytics is job `analytics` on the job
# server and would be the analytics of a job `jobs`.
RESERVED_JOB_IDS = frozenset({"jobs"})


def validate_job_id(job_id: str) -> str:
    """Return job_id unchanged, or raise ValueError naming the rule it breaks."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        shown = job_id[:80] if isinstance(job_id, str) else job_id
        raise ValueError(
            f"invalid job id {shown!r}: must match {JOB_ID_PATTERN.pattern} "
            "(letters, digits, '.', '_', '-'; first a letter or digit; at most 64 characters)"
        )
    if job_id in RESERVED_JOB_IDS:
        raise ValueError(f"invalid job id {job_id!r}: a word of the API's paths (/api/training/{job_id}/analytics "
                         "would be another route's)")
    return job_id


def _job_id_problem(job_id: str) -> str | None:
    """What is wrong with a job id, for the job spec's check (None: nothing)."""
    if not JOB_ID_PATTERN.fullmatch(job_id):
        return f"must be letters, digits, '.', '_', '-' (first a letter or digit; at most 64), got {job_id[:80]!r}"
    if job_id in RESERVED_JOB_IDS:
        return f"{job_id!r} is a word of the API's paths"
    return None


def new_job_id() -> str:
    """A fresh, valid job id: job-<UTC time>-<random hex>."""
    return f"job-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


# The environment variable that carries a job run's secret for reporting its endpoints to the job server.
REGISTER_TOKEN_VARIABLE = "TRAINMETRICS_REGISTER_TOKEN"

# Where jobs write their job-mapping files for the node exporter, as deploy/ expects it.
DEFAULT_JOB_DIR = "/var/lib/trainmetrics/jobs"

# ----- job states ----------------------------------------------------------------------------------------

ACTIVE_STATES = ("queued", "running", "paused")
FINAL_STATES = ("completed", "failed", "cancelled")
# A job without a process, waiting to run (or to resume) or paused: the job server publishes its state.
WAITING_STATES = ("queued", "paused")
JOB_STATES = (*ACTIVE_STATES, *FINAL_STATES)
# What the analytics say of a job whose processes stopped being scraped without a final state (kill -9, a
# lost node): not a state any process publishes.
VANISHED = "vanished"
# What a stop that ends in a state is called, for messages: "cannot pause it", "cancel requested".
STOP_VERBS = {"cancelled": "cancel", "paused": "pause"}
# The signal that asks a training process for each stop (at its next step boundary, after a checkpoint).
STOP_SIGNALS = {"paused": signal.SIGUSR1, "cancelled": signal.SIGTERM}
# The signal that makes a training process write every thread's stack (trainer/watchdog.py).
STACKS_SIGNAL = signal.SIGUSR2
# Blocked while a job process is spawned: each is unblocked once its handler exists, so one that comes early
# is handled then instead of killing the process.
SPAWN_BLOCKED_SIGNALS = (*STOP_SIGNALS.values(), STACKS_SIGNAL)


# Where a job's time goes: every second of a job process falls in exactly one (trainer_phase_seconds_total).
# The step, goodput's numerator, is compute + optimizer + collective; the job server adds `queued`, the
# analytics `paused` (between runs) and `lost` (trained, then thrown away by a resume from an older checkpoint).
ACCOUNTED_PHASES = ("init", "restore", "data_wait", "compute", "optimizer", "collective", "eval", "checkpoint")
STEP_PHASES = ("compute", "optimizer", "collective")
# The training loop's: the step's and the data wait for it (the data-wait share's whole, the hang watchdog's watch).
TRAINING_LOOP_PHASES = ("data_wait", *STEP_PHASES)


class ExitCode(IntEnum):
    """`trainmetrics train`'s exit codes; every other command exits 0, or 2 on bad input."""

    COMPLETED = 0
    FAILED = 1
    BAD_INPUT = 2
    CANCELLED = 3
    PAUSED = 4


# The job state each exit code stands for (bad input is a failure of the job).
EXIT_STATES = {ExitCode.COMPLETED: "completed", ExitCode.FAILED: "failed", ExitCode.BAD_INPUT: "failed",
               ExitCode.CANCELLED: "cancelled", ExitCode.PAUSED: "paused"}


def exit_code_for(state: str) -> ExitCode:
    """The exit code of a job process that ended in `state`."""
    return {"completed": ExitCode.COMPLETED, "cancelled": ExitCode.CANCELLED,
            "paused": ExitCode.PAUSED}.get(state, ExitCode.FAILED)


# The result file's field that says whether a scraper read the run's final state (written by the trainer,
# trainer/outcome.py, and by a Ray launcher whose ranks never ran; read by the job server). False: no scraper
# read it (the run ended before it published anything, or no scrape came during its linger: Prometheus down),
# so the job server publishes the end itself (JobService.waiting_jobs). Absent (an older trainer's result): read.
RESULT_PUBLISHED = "published"
# The result file's field that says no rank of the run started (False: a Ray launcher stopped while Ray placed the
# ranks, a trainer that refused its arguments): its end, which the job server publishes, ends the job's wait (to
# resume, for a resumed job), not a run. Absent: a run's end.
RESULT_STARTED = "started"


# The label a trainer process adds to every series it publishes: an id of its own, random, so that a process started
# at the address of one before it (a container restarted in its pod, a fixed --metrics-listen port, an OTLP push,
# which has no address) publishes series of its own, not a fall in the earlier one's (Prometheus took the two for
# one process: the runs before were lost to the job's duration and ledger, and a paused job's resumed run ended at
# the pause). With `instance`, it names a process (analytics/results.process_of).
RUN_LABEL = "run_id"


# ----- metric names read by more than one part (docs/metrics.md describes every series) -------------------

class Trainer:
    """Series a training process publishes (exposition names)."""

    JOB_INFO = "trainer_job_info"
    JOB_STATE = "trainer_job_state"
    JOB_FAILURE = "trainer_job_failure_info"
    JOB_START = "trainer_job_start_timestamp_seconds"
    JOB_END = "trainer_job_end_timestamp_seconds"
    HEARTBEAT = "trainer_heartbeat_timestamp_seconds"
    UPLOAD_DURATION = "trainer_upload_duration_seconds"
    STEPS = "trainer_steps_total"
    SAMPLES = "trainer_samples_total"
    EPOCH = "trainer_epoch"
    LOSS = "trainer_loss"
    LOSS_FIRST = "trainer_loss_first"
    LOSS_MIN = "trainer_loss_min"
    LOSS_SUM = "trainer_loss_accumulated"
    LOSS_INTERVALS = "trainer_loss_intervals_total"
    LOSS_NONFINITE = "trainer_loss_nonfinite_total"
    LOSS_FINITE = "trainer_loss_finite"
    EVALUATIONS = "trainer_evaluations_total"
    EVAL_LOSS = "trainer_eval_loss"
    EVAL_ACCURACY = "trainer_eval_accuracy_ratio"
    EVAL_LOSS_MIN = "trainer_eval_loss_min"
    EVAL_ACCURACY_MAX = "trainer_eval_accuracy_max_ratio"
    EVAL_HISTORY_INDEX = "trainer_eval_history_index"
    EVAL_HISTORY_STEP = "trainer_eval_history_step"
    EVAL_HISTORY_TIME = "trainer_eval_history_timestamp_seconds"
    EVAL_HISTORY_LOSS = "trainer_eval_history_loss"
    EVAL_HISTORY_ACCURACY = "trainer_eval_history_accuracy_ratio"
    LEARNING_RATE = "trainer_learning_rate"
    STEP_DURATION = "trainer_step_duration_seconds"
    STEP_DURATION_MAX = "trainer_step_duration_max_seconds"
    DATA_WAIT = "trainer_data_wait_seconds"
    CHECKPOINTS = "trainer_checkpoints_total"
    CHECKPOINT_DURATION = "trainer_checkpoint_duration_seconds"
    GPU_MEMORY_PEAK = "trainer_gpu_memory_peak_bytes"
    MFU = "trainer_model_flops_utilization_ratio"
    JOB_SUBMITTED = "trainer_job_submitted_timestamp_seconds"
    JOB_RESUMING = "trainer_job_resuming"        # the job server's: a queued job that ran before
    # The job server's: since when its executor could not start any job (present only while it cannot).
    STARTS_HELD_BACK_SINCE = "trainer_server_starts_held_back_since_timestamp_seconds"
    PROCESS_START = "trainer_process_start_timestamp_seconds"
    PHASE = "trainer_phase"
    PHASE_SINCE = "trainer_phase_since_timestamp_seconds"
    PHASE_SECONDS = "trainer_phase_seconds_total"
    CHECKPOINTED_SECONDS = "trainer_checkpointed_seconds"
    LAST_STEP = "trainer_last_step_timestamp_seconds"
    PROGRESS = "trainer_progress_timestamp_seconds"
    LOSS_SPIKES = "trainer_loss_spikes_total"
    # This process's own: from 0 in each process, where the job's counts above carry a checkpoint's over.
    PROCESS_LOSS_NONFINITE = "trainer_process_loss_nonfinite_total"
    PROCESS_LOSS_SPIKES = "trainer_process_loss_spikes_total"
    STACK_DUMPS = "trainer_stack_dumps_total"
    HANG_MIN = "trainer_hang_min_seconds"


class Node:
    """Series the node exporter publishes that other parts read."""

    CPU_UTILIZATION = "system_cpu_utilization_ratio"
    CPU_UTILIZATION_PEAK = "system_cpu_utilization_peak_ratio"
    MEMORY_USAGE = "system_memory_usage_bytes"
    MEMORY_USED_PEAK = "system_memory_used_peak_bytes"
    MEMORY_LIMIT = "system_memory_limit_bytes"
    JOB_CPU_SECONDS = "process_cpu_time_seconds_total"
    JOB_RSS = "process_memory_rss_bytes"
    JOB_PROCESSES = "process_tree_processes"
    JOB_ENERGY = "process_energy_joules_total"
    GPU_JOB = "hw_gpu_job_info"
    GPU_UTILIZATION = "hw_gpu_utilization_ratio"
    GPU_TEMPERATURE = "hw_gpu_temperature_celsius"
    GPU_MEMORY_USAGE = "hw_gpu_memory_usage_bytes"


# ----- the job spec ----------------------------------------------------------------------------------------

MODELS = ("mlp", "cnn", "transformer")
BUILTIN_DATASETS = ("blobs", "digits", "corpus")
MAX_NPROC = 64
MAX_WORKERS = 64            # DataLoader processes per rank: a spec must not fork without bound on a shared host
MAX_SEED = 2**64 - 1        # what torch.manual_seed takes (numpy's generators take any non-negative int)
MAX_NAME_LENGTH = 200
# Counts (epochs, batch size, step intervals) above this reach torch and the standard library as sizes they refuse
# (a batch of 10**20 failed the job in islice); a job that asks for more asks for more than it can run.
MAX_COUNT = 2**31 - 1
MAX_TEXT_LENGTH = 1000      # a text field of a job spec
MAX_CUDA_INDEX = 127        # torch keeps a device index in one signed byte
MAX_LR = 1e3                # far above any AdamW rate that trains; past float32's range torch fails the job
# No text from outside (a request path, a job name) may carry these: a line break or an escape in a log, a
# label, a CSV. The C1 controls and the line and paragraph separators too: str.splitlines() breaks a line at
# U+0085, U+2028 and U+2029, and a terminal takes U+009B as an escape.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def http_url_problem(url: str) -> str | None:
    """What keeps `url` from being an http(s) URL a client can send requests to (None: nothing). The scheme alone
    let `http://`, `http://[::1` and `http://host:99999` through: a server started on them failed every request
    to the URL, or (a bad IPv6 host) its start in a traceback."""
    try:
        parts = urlsplit(url)
        parts.port          # ValueError: out of range, or no number
    except ValueError as error:
        return f"must be an http(s) URL, got {url[:80]!r} ({error})"
    if not url.startswith(("http://", "https://")) or not parts.hostname or " " in url or \
            CONTROL_CHARACTERS.search(url):
        return f"must be an http(s) URL, got {url[:80]!r}"
    return None


def listen_problem(value: str) -> str | None:
    """What keeps `value` from being a HOST:PORT to listen on (None: nothing), said with the flags: an IPv6 address
    without brackets (`::1`) was found only once the job had loaded its data, in an unclear bind error."""
    from trainmetrics.command import parse_listen     # here: the contract loads before a job's stop handlers

    try:
        parse_listen(value)
    except ValueError as error:
        return str(error)
    return None


def _device_problem(value: str) -> str | None:
    # The index as torch reads it: one byte (cuda:256 was cuda:0, cuda:255 the current GPU, cuda:128 cuda:-128) and
    # no leading zero (cuda:01 is "Invalid device string"). Each was accepted, then trained elsewhere or failed.
    index = re.fullmatch(r"cuda(?::(0|[1-9][0-9]{0,2}))?", value)
    if value in ("auto", "cpu") or (index and int(index[1] or 0) <= MAX_CUDA_INDEX):
        return None
    return f"must be auto, cpu or cuda[:N] (N from 0 to {MAX_CUDA_INDEX}, no leading zero), got {value[:40]!r}"


def device_for_ranks_problem(device: str, ranks_on_machine: int, ranks: int | None = None) -> str | None:
    """What is wrong with `device` for a job with this many ranks on one machine (torchrun's), of `ranks` in all
    (ranks_on_machine when not given), if anything: each rank of several takes the GPU of its local rank, so a
    GPU index would be ignored (rank 1 of `cuda:1` trained on cuda:1, and rank 0 on cuda:0)."""
    ranks = ranks_on_machine if ranks is None else ranks
    if ranks <= 1 or not device.startswith("cuda:"):
        return None
    if ranks_on_machine > 1:
        return (f"{device!r} names one GPU, but each of the {ranks_on_machine} ranks on this machine takes the GPU "
                f"of its local rank (cuda:0 to cuda:{ranks_on_machine - 1}): ask for cuda")
    if int(device[5:]) != 0:
        # One rank on each machine (torchrun over several, or Ray's): each took cuda:0, whatever the index.
        return (f"{device!r} names one GPU, but each of the {ranks} ranks, one on each machine, takes the GPU of "
                "its local rank (cuda:0): ask for cuda")
    return None


@dataclass(frozen=True)
class Option:
    """One `trainmetrics train` option: its flag, type, default, help, checks, and whether a job spec sent to
    the job server may set it (`api`: True, or the reason it may not, as docs/api.md lists it)."""

    name: str
    kind: type                      # int, float, str, bool (a switch) or Path
    default: object
    help: str
    group: str
    api: bool | str = True
    minimum: float | None = None    # inclusive
    maximum: float | None = None    # inclusive
    above: float | None = None      # exclusive
    choices: tuple[str, ...] | None = None
    problem: Callable[[object], str | None] | None = None    # a further check: None, or what is wrong
    env: str | None = None          # the flag's default comes from this variable when it is set
    flag: str | None = None         # when not --<name with dashes>

    @property
    def cli_flag(self) -> str:
        """The flag as a user types it."""
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value):
        """`value` if it is allowed, else ValueError saying why (without the option's name)."""
        if value is None:
            if self.default is None:
                return value
            raise ValueError("must not be null")
        if self.kind is float and not math.isfinite(value):
            # `inf` parses as a float: --loss-spike-z inf turned spike detection off in silence.
            raise ValueError(f"must be a finite number, got {value}")
        if self.kind is str and CONTROL_CHARACTERS.search(value):
            # Text becomes an argument of the job's process (where a NUL cannot be at all), a path, a label.
            raise ValueError("no control characters (a NUL, a line break, a tab...)")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be at least {self.minimum:g}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {_number(self.maximum)}, got {value}")
        if self.above is not None and not value > self.above:
            raise ValueError(f"must be above {self.above:g}, got {value}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}, got {str(value)[:40]!r}")
        if self.problem is not None:
            problem = self.problem(value)
            if problem:
                raise ValueError(problem)
        return value

    def from_json(self, value):
        """A value from a request body, strictly typed (no bool for a number, no string for a number)."""
        if value is None:
            return self.check(None)
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                try:
                    value = float(value)
                except OverflowError:       # an integer of 400 digits: past every float, as 1e400 is
                    value = math.inf
        else:
            ok = isinstance(value, str)
            if ok and not 0 < len(value) <= MAX_TEXT_LENGTH:      # a string all the same: say what is wrong
                raise ValueError(f"expected 1 to {MAX_TEXT_LENGTH} characters, got {len(value)}")
        if not ok:
            raise ValueError(f"expected {_KIND_WORDS[self.kind]}")
        if self.kind is float and not math.isfinite(value):
            raise ValueError("expected a finite number")
        return self.check(value)

    def to_args(self, value) -> list[str]:
        """The arguments that set this option to `value` on the command line."""
        if self.kind is bool:
            return [self.cli_flag] if value else []
        if value is None:
            return []
        text = repr(value) if self.kind is float else str(value)
        # A value that starts with '-' (a target column named "--resume") goes as one --flag=value argument:
        # argparse would take it for a flag. The others stay two arguments (the job id one of its own, which
        # is how the job's processes are recognised).
        return [f"{self.cli_flag}={text}"] if text.startswith("-") else [self.cli_flag, text]


def _number(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}

_SERVER_SETS = "set by the job server"
TRAIN_OPTIONS: tuple[Option, ...] = (
    # job
    Option("job_id", str, None, "job id, ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$, not 'jobs' "
           "(default: job-<UTC time>-<random>)", "job", problem=lambda v: _job_id_problem(v)),
    Option("job_name", str, None, "human-readable name (default: the job id)", "job",
           problem=lambda v: f"at most {MAX_NAME_LENGTH} characters" if len(v) > MAX_NAME_LENGTH else None),
    Option("owner", str, None, "owner label on trainer_job_info (default: none)", "job",
           api="the job server sets it from the caller's token",
           problem=lambda v: f"at most {MAX_NAME_LENGTH} characters" if len(v) > MAX_NAME_LENGTH else None),
    Option("model", str, "mlp", f"model to train: {', '.join(MODELS)}", "job", choices=MODELS),
    Option("dataset", str, "blobs", f"built-in ({', '.join(BUILTIN_DATASETS)}) or a path to a .csv, .npz or "
           ".txt file", "job"),
    Option("target", str, "label", "target column of a CSV dataset", "job"),
    Option("submitted_at", float, None, "unix time the job was submitted, for its queued time (the job server "
           "sets it)", "job", api=_SERVER_SETS, minimum=0),
    # training
    Option("epochs", int, 3, "passes over the training split", "training", minimum=1, maximum=MAX_COUNT),
    Option("batch_size", int, 64, "samples per optimizer step (per rank)", "training", minimum=1,
           maximum=MAX_COUNT),
    Option("lr", float, 1e-3, "AdamW learning rate", "training", above=0, maximum=MAX_LR),
    Option("device", str, "auto", "auto, cpu or cuda[:N]", "training", problem=_device_problem),
    Option("seed", int, 0, "seed for data order and initial weights", "training", minimum=0, maximum=MAX_SEED),
    Option("workers", int, 0, f"DataLoader worker processes, 0..{MAX_WORKERS}", "training", minimum=0,
           maximum=MAX_WORKERS),
    Option("eval_every", int, 0, "evaluate every N steps as well as at each epoch end (0: epoch ends only)",
           "training", minimum=0, maximum=MAX_COUNT),
    Option("loss_spike_z", float, 6.0, "a log interval whose mean loss is this many standard deviations above "
           "its running mean is a loss spike", "training", above=0),
    Option("loss_spike_warmup", int, 10, "log intervals before loss spikes are looked for; a rise lasting this "
           "many is the new level", "training", minimum=1, maximum=MAX_COUNT),
    Option("on_loss_spike", str, "none", "none, or pause: stop at once, keeping the last checkpoint from before "
           "the spike", "training", choices=("none", "pause")),
    # checkpoints
    Option("checkpoint_dir", Path, None, "where checkpoints and the final model.pt go (default: no "
           "checkpoints)", "checkpoints", api="the job server keeps them in the job's directory"),
    Option("checkpoint_every", int, 0, "checkpoint every N steps (0: at each epoch end)", "checkpoints",
           minimum=0, maximum=MAX_COUNT),
    Option("keep_checkpoints", int, 3, "newest checkpoints kept (0: all)", "checkpoints", minimum=0,
           maximum=MAX_COUNT),
    Option("resume", bool, False, "continue from the newest checkpoint in --checkpoint-dir that loads (none there: "
           "from the start; some, none loadable: the job fails)", "checkpoints",
           api="POST /api/training/jobs/{job_id}/resume"),
    # telemetry
    Option("log_every", int, 50, "steps per log interval (loss read, log line, MFU)", "telemetry", minimum=1,
           maximum=MAX_COUNT),
    Option("metrics_listen", str, "127.0.0.1:0", "HOST:PORT to serve /metrics on (port 0: a free one; a fixed "
           "port is local rank 0's, each next local rank's the port after; an IPv6 address in brackets: "
           "[::1]:0)", "telemetry", api=_SERVER_SETS, problem=listen_problem),
    Option("targets_dir", Path, None, "Prometheus file_sd directory to announce the job in; the job then waits "
           "for Prometheus' first scrape before its first step (default: not announced)", "telemetry",
           api="never passed: Prometheus finds the job server's jobs through GET /api/training/sd",
           env="TRAINMETRICS_TARGETS_DIR"),
    Option("job_dir", Path, None, "job-mapping directory the node exporter reads (default: none)", "telemetry",
           api="the job server's --job-dir", env="TRAINMETRICS_JOB_DIR"),
    Option("linger_timeout", float, 15.0, "wait up to this many seconds for the first scrape before the first "
           "step, and after the end for every scraper to read the final state (only when announced: --targets-dir "
           "or --register-url)", "telemetry", api="the job server's "
           "--linger-timeout", minimum=0),
    Option("upload_seconds", float, None, "dataset upload time to publish (default: the load time)", "telemetry",
           api="measured by the job server at upload", minimum=0),
    Option("peak_flops", float, None, "device peak FLOP/s for MFU (default: known GPUs only)", "telemetry",
           above=0),
    Option("web_config_file", Path, None, "TLS and basic auth for /metrics, in Prometheus exporter-toolkit's "
           "web-config format (the file_sd target then says https)", "telemetry",
           api="server-wide: the job server's own --web.config.file is not passed on", flag="--web.config.file"),
    Option("register_url", str, None, "report this process's /metrics endpoint to this URL (the job server's "
           "HTTP service discovery; the secret comes in TRAINMETRICS_REGISTER_TOKEN)", "telemetry", api=_SERVER_SETS,
           problem=http_url_problem),
    Option("diagnostics_dir", Path, None, "where every rank's thread stacks go (stacks.rank<N>.txt): on SIGUSR2, "
           "and once when the job seems hung (default: stderr)", "telemetry", api="the job's directory"),
    Option("hang_seconds", float, 60.0, "the trainer's hang watchdog writes the thread stacks once no step has "
           "completed for max(this, 10 x the p99 step time over 10 minutes), outside evaluations and "
           "checkpoints; TrainerHang pages by the same bound (raise it for a first step of minutes)",
           "telemetry", minimum=1),
    Option("result_file", Path, None, "write the job's outcome here as JSON when it ends (atomically)",
           "telemetry", api=_SERVER_SETS),
    Option("progress", bool, False, "progress bar on a terminal (log lines otherwise)", "telemetry",
           api="jobs of the job server have no terminal"),
)

# A job spec sent to the job server: the API-settable train options plus what only the server knows how to do.
# `name` is the API's word for --job-name; `nproc` is the number of processes (torchrun ranks).
SPEC_EXTRAS: tuple[Option, ...] = (
    Option("nproc", int, 1, f"processes (torchrun ranks) for the job, 1..{MAX_NPROC}", "job", minimum=1,
           maximum=MAX_NPROC),
)
SPEC_ALIASES = {"name": "job_name"}


class SpecError(ValueError):
    """A job spec field that cannot be accepted; `field` is its name in the request body."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def spec_fields() -> dict[str, Option]:
    """Every field a job spec may hold, by its name in the request body."""
    fields = {option.name: option for option in (*TRAIN_OPTIONS, *SPEC_EXTRAS) if option.api is True}
    for alias, name in SPEC_ALIASES.items():
        fields[alias] = fields.pop(name)
    return fields


def parse_spec(body: object) -> dict:
    """A request body checked against the spec: only known fields, each of its type and in range. Returns the
    given fields under their option names (defaults are not filled in). Raises SpecError naming the field."""
    if not isinstance(body, dict):
        raise SpecError("body", "expected a JSON object")
    fields = spec_fields()
    values = {}
    for key, raw in body.items():
        option = fields.get(key) if isinstance(key, str) else None
        if option is None:
            shown = str(key)[:40]
            raise SpecError(shown, f"unknown field (allowed: {', '.join(sorted(fields))})")
        try:
            values[option.name] = option.from_json(raw)
        except ValueError as error:
            raise SpecError(key, str(error)) from None
    return values


def train_args(values: dict) -> list[str]:
    """`trainmetrics train` arguments for the given option values (option names as keys; extras ignored)."""
    args = []
    for option in TRAIN_OPTIONS:
        if option.name in values:
            args += option.to_args(values[option.name])
    return args
