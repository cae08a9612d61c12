"""JobMetrics: the instrumentation library for one training job, used by the built-in runner and by
users' own loops::

    with JobMetrics(job_id="resnet-7", model="resnet18", dataset="cifar10") as m:
        for epoch in range(epochs):
            m.set_epoch(epoch)
            for x, y in m.timed(loader):            # measures data-loader wait
                loss = step(x, y)
                m.step(loss=loss, samples=len(x))   # no GPU sync: losses are read once per log interval
            m.eval(loss=val_loss, accuracy=val_acc)

The hot path (`step`, `timed`) only appends to Python lists and bumps ints; counters are observed and
histograms filled at scrape time, so the loop never waits on telemetry and a metric call never raises.
"""

import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from opentelemetry.metrics import CallbackOptions, Observation

from trainer import instruments as inst
from trainer.discovery import announced_host, remove_quietly, write_target_file
from trainer.telemetry import MetricsServer, build_meter_provider
from trainmetrics.jobmap import JobMapping, write_job_mapping
from trainmetrics.names import parse_listen, validate_job_id
from trainmetrics.webconfig import WebConfig

log = logging.getLogger("trainmetrics.trainer")

FINAL_STATES = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class IntervalStats:
    """What one log interval measured; handed to the on_log callback (progress bar, log line)."""

    step: int
    samples: int
    loss: float | None
    samples_per_second: float
    mfu: float | None


class JobMetrics:
    """Publishes one job's trainer_* series through OpenTelemetry and its Prometheus exporter."""

    def __init__(self, job_id: str, *, job_name: str | None = None, model: str = "", dataset: str = "",
                 owner: str = "", device: str = "cpu", rank: int = 0, world_size: int = 1,
                 listen: str | None = "127.0.0.1:0", targets_dir: Path | None = None,
                 job_dir: Path | None = None, gpus: Iterable[int] = (), upload_seconds: float | None = None,
                 log_every: int = 50, flops_per_sample: float | None = None, peak_flops: float | None = None,
                 linger_timeout: float = 15.0, on_log: Callable[[IntervalStats], None] | None = None,
                 start_steps: int = 0, start_samples: int = 0, publish_job_state: bool = True,
                 web_config: WebConfig | None = None):
        self.job_id = validate_job_id(job_id)
        self.rank = rank
        self.log_every = max(1, int(log_every))
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops
        self.linger_timeout = linger_timeout
        self.on_log = on_log
        self._cuda = device.startswith("cuda")
        self._info = {"job_name": job_name or job_id, "model": model, "dataset": dataset, "owner": owner,
                      "device": device, "world_size": str(world_size)}
        self.state = "queued"
        self.error_type: str | None = None
        self.start_time: float | None = None
        self.end_time: float | None = None
        self._end_monotonic: float | None = None
        self.upload_seconds = upload_seconds
        # A resumed job continues its counters from the checkpoint before its first scrape, so Prometheus
        # never sees them restart from 0.
        self.steps = start_steps
        self.samples = start_samples
        self.checkpoints = 0
        self.nonfinite_losses = 0
        self.last_loss: float | None = None
        self._loss_tensors: list = []
        self._loss_floats: list[float] = []
        self._pending_lock = threading.Lock()
        self._pending_step_durations: list[float] = []
        self._pending_data_waits: list[float] = []
        self._last_step_end: float | None = None
        self._interval_start = (time.perf_counter(), start_steps, start_samples)   # (time, steps, samples) at the last log
        self._server: MetricsServer | None = None
        self._target_file: Path | None = None
        self._mapping_file: Path | None = None

        labels = {"job_id": self.job_id}
        if world_size > 1:
            labels["rank"] = str(rank)
        self._provider, self.registry = build_meter_provider(labels)
        # In a multi-process job only rank 0 publishes the job's lifecycle (info, state, start/end, failure,
        # upload): the state is the job's, not a rank's. Every rank publishes its own progress.
        self._publish_job_state = publish_job_state
        self._create_instruments()
        try:
            if listen is not None:
                host, port = parse_listen(listen)
                self._server = MetricsServer(self.registry, host, port, web_config)
                if targets_dir is not None:
                    address = f"{announced_host(host)}:{self._server.port}"
                    scheme = "https" if web_config is not None and web_config.ssl_context else "http"
                    self._target_file = write_target_file(Path(targets_dir), self._file_stem(), address, scheme)
            if job_dir is not None:
                mapping = JobMapping(job_id=self.job_id, pid=os.getpid(), gpus=list(gpus), rank=rank,
                                     started=time.time())
                self._mapping_file = write_job_mapping(Path(job_dir), mapping)
        except BaseException:
            self._release()
            raise

    # ----- instruments -------------------------------------------------------------------------------
    def _create_instruments(self) -> None:
        meter = self._provider.get_meter("trainmetrics.trainer")

        def gauge(spec):
            return meter.create_gauge(spec.name, unit=spec.unit, description=spec.description)

        def histogram(spec):
            return meter.create_histogram(spec.name, unit=spec.unit, description=spec.description)

        def observe(spec, callback, counter=False):
            factory = meter.create_observable_counter if counter else meter.create_observable_gauge
            factory(spec.name, callbacks=[callback], unit=spec.unit, description=spec.description)

        self._epoch = gauge(inst.EPOCH)
        self._loss = gauge(inst.LOSS)
        self._eval_loss = gauge(inst.EVAL_LOSS)
        self._eval_accuracy = gauge(inst.EVAL_ACCURACY)
        self._learning_rate = gauge(inst.LEARNING_RATE)
        self._gpu_memory_peak = gauge(inst.GPU_MEMORY_PEAK)
        self._mfu = gauge(inst.MFU)
        self._step_duration = histogram(inst.STEP_DURATION)
        self._data_wait = histogram(inst.DATA_WAIT)
        self._checkpoint_duration = histogram(inst.CHECKPOINT_DURATION)
        if self._publish_job_state:
            observe(inst.JOB_INFO, lambda options: [Observation(1, self._info)])
            observe(inst.JOB_STATE, self._observe_state)
            observe(inst.JOB_FAILURE, lambda options: [Observation(1, {"error_type": self.error_type})]
                    if self.error_type else [])
            observe(inst.JOB_START, lambda options: [Observation(self.start_time)] if self.start_time else [])
            observe(inst.JOB_END, lambda options: [Observation(self.end_time)] if self.end_time else [])
            observe(inst.UPLOAD_DURATION, lambda options: [Observation(self.upload_seconds)]
                    if self.upload_seconds is not None else [])
        observe(inst.STEPS, self._observe_steps, counter=True)
        observe(inst.SAMPLES, lambda options: [Observation(self.samples)], counter=True)
        observe(inst.CHECKPOINTS, lambda options: [Observation(self.checkpoints)], counter=True)
        observe(inst.LOSS_NONFINITE, lambda options: [Observation(self.nonfinite_losses)], counter=True)

    def _observe_state(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(1 if state == self.state else 0, {"state": state}) for state in inst.JOB_STATES]

    def _observe_steps(self, options: CallbackOptions) -> list[Observation]:
        # Callbacks run at the start of every collection, before the histograms are read: the step-time
        # and data-wait samples buffered by the loop enter their histograms here, off the hot path.
        self._flush_pending()
        return [Observation(self.steps)]

    def _flush_pending(self) -> None:
        with self._pending_lock:
            durations, self._pending_step_durations = self._pending_step_durations, []
            waits, self._pending_data_waits = self._pending_data_waits, []
        for value in durations:
            self._step_duration.record(value)
        for value in waits:
            self._data_wait.record(value)

    # ----- lifecycle ---------------------------------------------------------------------------------
    def _file_stem(self) -> str:
        return f"{self.job_id}.rank{self.rank}"

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on (None when not serving)."""
        return self._server.port if self._server else None

    def wait_for_first_scrape(self, timeout: float) -> bool:
        """Block until Prometheus has scraped this job once (only when announced through targets_dir).

        Prometheus discovers a new file_sd target within ~5 s; a job that waits for that scrape before
        training has its whole history in Prometheus, first loss included. False when none came in time."""
        if self._server is None or self._target_file is None:
            return False
        return self._server.wait_for_scrape_after(float("-inf"), timeout)

    def start(self) -> "JobMetrics":
        """Mark the job running and note its start time."""
        if self.start_time is None:
            self.start_time = time.time()
        self.state = "running"
        self._last_step_end = time.perf_counter()
        self._interval_start = (self._last_step_end, self.steps, self.samples)
        return self

    def set_state(self, state: str) -> None:
        """Move to a non-final state (queued, running, paused); final states go through finish()."""
        if state not in inst.JOB_STATES or state in FINAL_STATES:
            raise ValueError(f"unknown or final state {state!r}; use finish() for final states")
        self.state = state

    def finish(self, state: str, error: BaseException | None = None) -> None:
        """Enter a final state (completed, failed, cancelled) and note the end time; idempotent."""
        if state not in FINAL_STATES:
            raise ValueError(f"{state!r} is not a final state")
        if self.state in FINAL_STATES:
            return
        self._log_interval()
        self.error_type = type(error).__name__ if error is not None and state == "failed" else None
        self.end_time = time.time()
        self.state = state
        self._end_monotonic = time.monotonic()

    def pause(self) -> None:
        """Mark the job paused before its process exits (it resumes later, from a checkpoint, in a new one).

        Like finish(), the state is held until it has been scraped (close() lingers for it)."""
        self._log_interval()
        self.state = "paused"
        self._end_monotonic = time.monotonic()

    def __enter__(self) -> "JobMetrics":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("completed")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("cancelled")
        else:
            self.finish("failed", exc)
        self.close()

    def close(self) -> None:
        """Linger until the final state has been scraped (when announced to Prometheus), then clean up."""
        self._flush_pending()
        if self._server and self._target_file and self._end_monotonic is not None:
            if not self._server.wait_for_scrape_after(self._end_monotonic, self.linger_timeout):
                log.warning("job %s: no scrape within %.0fs after the end; its final state may be missing "
                            "from Prometheus", self.job_id, self.linger_timeout)
        self._release()

    def _release(self) -> None:
        remove_quietly(self._target_file)
        remove_quietly(self._mapping_file)
        self._target_file = self._mapping_file = None
        if self._server:
            self._server.close()
            self._server = None
        self._provider.shutdown()

    # ----- the hot path ------------------------------------------------------------------------------
    def timed(self, batches: Iterable) -> Iterator:
        """Yield from `batches`, recording how long each batch took to arrive (data-loader wait)."""
        iterator = iter(batches)
        self._last_step_end = time.perf_counter()
        while True:
            began = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            with self._pending_lock:
                self._pending_data_waits.append(time.perf_counter() - began)
            yield batch

    def step(self, loss=None, samples: int = 0) -> None:
        """Record one optimizer step. `loss` may be a tensor on any device: it is not read here."""
        now = time.perf_counter()
        if self._last_step_end is not None:
            with self._pending_lock:
                self._pending_step_durations.append(now - self._last_step_end)
        self._last_step_end = now
        self.steps += 1
        self.samples += samples
        if loss is not None:
            try:
                if hasattr(loss, "detach"):
                    self._loss_tensors.append(loss.detach())
                else:
                    self._loss_floats.append(float(loss))
            except (TypeError, ValueError):   # a bad loss value must not break the loop
                log.warning("job %s: ignoring a loss that is not a number: %r", self.job_id, loss)
        if self.steps - self._interval_start[1] >= self.log_every:
            self._log_interval()

    # ----- once per log interval / eval / checkpoint ---------------------------------------------------
    def _mean_loss(self) -> float | None:
        tensors, floats = self._loss_tensors, self._loss_floats
        self._loss_tensors, self._loss_floats = [], []
        count = len(tensors) + len(floats)
        if count == 0:
            return None
        total = math.fsum(floats)
        if tensors:
            import torch  # the library works without torch for float losses

            total += torch.stack(tensors).double().sum().item()   # the one device sync per interval
        return total / count

    def _log_interval(self) -> None:
        try:
            now = time.perf_counter()
            began, steps_before, samples_before = self._interval_start
            if self.steps == steps_before:
                return
            self._interval_start = (now, self.steps, self.samples)
            loss = self._mean_loss()
            if loss is not None:
                self.last_loss = loss
                if math.isfinite(loss):
                    self._loss.set(loss)
                else:
                    self.nonfinite_losses += 1
            elapsed = max(now - began, 1e-9)
            throughput = (self.samples - samples_before) / elapsed
            mfu = None
            if self.flops_per_sample and self.peak_flops:
                mfu = throughput * self.flops_per_sample / self.peak_flops
                self._mfu.set(mfu)
            if self._cuda:
                import torch

                self._gpu_memory_peak.set(torch.cuda.max_memory_allocated())
            if self.on_log:
                self.on_log(IntervalStats(self.steps, self.samples, loss, throughput, mfu))
        except Exception:   # telemetry must never break the training loop
            log.exception("job %s: metrics log interval failed", self.job_id)

    def set_epoch(self, epoch: int) -> None:
        """Publish the current epoch."""
        self._epoch.set(epoch)

    def set_learning_rate(self, lr: float) -> None:
        """Publish the current learning rate."""
        self._learning_rate.set(lr)

    def eval(self, loss: float | None = None, accuracy: float | None = None) -> None:
        """Publish the result of an evaluation (accuracy as a 0..1 ratio)."""
        if loss is not None:
            self._eval_loss.set(float(loss))
        if accuracy is not None:
            self._eval_accuracy.set(float(accuracy))

    @contextmanager
    def checkpoint(self):
        """Time a checkpoint write; counts it only when the block succeeds."""
        began = time.perf_counter()
        yield
        self._checkpoint_duration.record(time.perf_counter() - began)
        self.checkpoints += 1
        # The gap spent checkpointing is not a training step's time.
        self._last_step_end = time.perf_counter()
