"""NVIDIA GPUs through NVML (nvidia-ml-py): utilisation, memory, power, clocks, errors, jobs per GPU.

Fast loop (every --sample-interval): utilisation and memory, the two gauges with peaks; each call costs
well under a millisecond. Slow loop (every --slow-interval, its own thread): temperature, power, the
energy counter (~4 ms), clocks, throttle reasons, ECC counters, XID events and the per-GPU process lists
that attribute GPUs to jobs.

Each GPU fails on its own. A GPU that is lost ("GPU is lost", one that needs a reset) has its series left
out, is said once at warning level and is asked for again by index with backoff, while the others carry on.
A query a GPU or its driver cannot answer (not supported, a function the driver lacks, no permission) is
left out for that GPU for good, said once; any other failed query leaves out that one series for that
sample (utilisation and memory, windowed: once no reading is left in their window). Only when no GPU
answers (driver gone, NVML itself failing) does the collector report failure, shut
NVML down and re-initialise it with exponential backoff. Nonsense readings (NaN, negative) are left out for
that sample; utilisation is clamped to 0..1 and memory in use to the memory size.

Energy per job: each slow sample adds a GPU's energy since its previous reading to the jobs holding the GPU
now, split evenly among them (exporters/job_energy.py keeps the accounts, the energy collector publishes
them). Each GPU's interval is its own, so one GPU's outage never stretches another's; a pass whose process
list failed keeps the previous reading (the holders are unknown). A counter that went
back (a driver reload, a GPU reset) counts its new value, never a negative step. A step more than a GPU can use
in the interval (MAX_GPU_WATTS) is no energy used, only a new baseline.
"""

import logging
import math
import time
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from trainmetrics.contract import Node
from trainmetrics.exporters.collectors.base import Collector, CollectorContext, CollectorUnavailable
from trainmetrics.exporters.window import SampleWindow

log = logging.getLogger(__name__)

THROTTLE_REASONS = (  # (NVML bit constant, reason label)
    ("nvmlClocksThrottleReasonGpuIdle", "gpu_idle"),
    ("nvmlClocksThrottleReasonApplicationsClocksSetting", "applications_clocks_setting"),
    ("nvmlClocksThrottleReasonSwPowerCap", "sw_power_cap"),
    ("nvmlClocksThrottleReasonHwSlowdown", "hw_slowdown"),
    ("nvmlClocksThrottleReasonSyncBoost", "sync_boost"),
    ("nvmlClocksThrottleReasonSwThermalSlowdown", "sw_thermal_slowdown"),
    ("nvmlClocksThrottleReasonHwThermalSlowdown", "hw_thermal_slowdown"),
    ("nvmlClocksThrottleReasonHwPowerBrakeSlowdown", "hw_power_brake_slowdown"),
    ("nvmlClocksThrottleReasonDisplayClockSetting", "display_clock_setting"),
)
# The throttle reasons' function, newest name first: drivers before R535 lack the new one (pynvml then raises
# FunctionNotFound), and older bindings lack its name.
THROTTLE_FUNCTIONS = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
MAX_EVENTS_PER_SAMPLE = 256
MIN_UUID_PREFIX = len("GPU-") + 8     # the shortest UUID a mapping may hold (trainmetrics.jobmap.GPU_UUID)
# Far above what one GPU draws (the largest boards, a GH200 module included: ~1-1.4 kW). A counter that stepped
# further in its interval was set to another value (a driver's glitch), not used: one
# such step added 9e9 J to the job holding the GPU, a count that only grows and outlives restarts.
MAX_GPU_WATTS = 5_000

# NVML errors by what they say, as pynvml names its exception classes. Lost: the GPU (or NVML under it) is
# gone until it is reset or the driver reloaded; asking again by index later may find it back.
LOST_ERRORS = ("NVMLError_GpuIsLost", "NVMLError_ResetRequired", "NVMLError_Uninitialized",
               "NVMLError_DriverNotLoaded", "NVMLError_LibRmVersionMismatch")
# Unanswerable: this GPU or driver will never answer the query (a MIG GPU's utilisation, a function older
# drivers lack, a query for root only), so asking again every pass would only fail again.
UNANSWERABLE_ERRORS = ("NVMLError_NotSupported", "NVMLError_FunctionNotFound", "NVMLError_NoPermission")


class GpuLost(Exception):
    """A GPU stopped answering at all; carries NVML's error."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


@dataclass
class SlowReadings:
    """The slow loop's readings of one GPU; None where the GPU does not support the query."""

    temperature_celsius: float | None = None
    power_watts: float | None = None
    energy_joules: float | None = None
    energy_read_at: float = 0.0    # time.monotonic() just after the energy counter was read
    clock_sm_hertz: float | None = None
    throttle_reasons: int | None = None
    ecc_corrected: int | None = None
    ecc_uncorrected: int | None = None
    process_memory: dict[int, int] = field(default_factory=dict)  # pid -> bytes
    # False when a process list failed this time (not "not supported"): who held the GPU is unknown.
    holders_known: bool = True


@dataclass
class Gpu:
    """One device: its identity, fast-loop windows, the latest slow readings and what it cannot answer."""

    index: int
    handle: object | None          # None while the GPU is lost since NVML started
    uuid: str | None
    utilization: SampleWindow
    memory_used: SampleWindow
    memory_total: int = 0
    xid_events: bool = False       # registered for XID events
    slow: SlowReadings | None = None
    unanswerable: set[str] = field(default_factory=set)       # NVML functions never asked again
    failures_said: set[str] = field(default_factory=set)      # NVML functions whose failure was logged
    lost: Exception | None = None  # the error that lost it; None while it answers
    retry_at: float = 0.0
    retry_delay: float = 0.0       # 0 while it answers


class GpuCollector(Collector):
    """hw_gpu_* series per GPU ({gpu,uuid}) and hw_gpu_job_info / hw_gpu_process_memory_bytes per job."""

    name = "gpu"
    fast = True
    slow = True
    own_loop = True     # an NVML call of 300 ms slowed the whole fast loop to 3 Hz

    def __init__(self, nvml=None, peak_window: float = 1.0, job_tracker=None,
                 backoff_initial: float = 1.0, backoff_max: float = 60.0, job_energy=None):
        self._nvml = nvml
        self.peak_window = peak_window
        self.job_tracker = job_tracker
        self.job_energy = job_energy
        # uuid -> (joules, the pass's `now`, time.monotonic() at the read) of its previous reading (over re-inits)
        self._energy_read: dict[str, tuple[float, float, float]] = {}
        # uuid -> XID events since the exporter started: kept over NVML's re-inits (a lost GPU, often after an
        # XID 79), where the GPUs are enumerated afresh; it went back to 0 there.
        self._xid_errors: dict[str, int] = {}
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._backoff = backoff_initial
        self._retry_at = 0.0
        self._last_error: Exception | None = None
        self._gpus: list[Gpu] | None = None
        self._events = None
        self._event_failure_said = False

    @classmethod
    def build(cls, context: CollectorContext) -> "GpuCollector":
        return cls(peak_window=context.peak_window, job_tracker=context.job_tracker, job_energy=context.job_energy)

    @property
    def nvml(self):
        """The NVML module: the injected one, else pynvml (imported on first use)."""
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as error:
                raise CollectorUnavailable(f"nvidia-ml-py is not installed: {error}") from error
            self._nvml = pynvml
        return self._nvml

    def _start(self, now: float) -> list[Gpu]:
        """Initialise NVML and enumerate the GPUs, or raise (with the next retry scheduled)."""
        if now < self._retry_at:
            error = self._last_error
            if isinstance(error, CollectorUnavailable):
                raise CollectorUnavailable(str(error))
            raise RuntimeError(f"NVML failed ({error}); re-initialising in {self._retry_at - now:.1f}s")
        nvml = self.nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            missing = isinstance(error, (nvml.NVMLError_LibraryNotFound, nvml.NVMLError_DriverNotLoaded))
            self._schedule_retry(now, CollectorUnavailable(f"NVML unavailable: {error}") if missing else error)
            raise self._last_error from error
        try:
            gpus = [self._open_gpu(index) for index in range(nvml.nvmlDeviceGetCount())]
            if not gpus:
                raise CollectorUnavailable("NVML found no GPU")
            if all(gpu.lost is not None for gpu in gpus):
                raise gpus[0].lost
        except (nvml.NVMLError, CollectorUnavailable) as error:
            self._shutdown()
            self._schedule_retry(now, error)
            raise
        self._events = self._register_xid_events(gpus)
        for gpu in gpus:
            if gpu.lost is not None:  # the others go on; this one is asked for again with backoff
                self._lose(gpu, gpu.lost, now)
        self._gpus = gpus
        log.info("NVML initialised: %d GPU(s)", len(gpus))
        return gpus

    def _open_gpu(self, index: int) -> Gpu:
        """The GPU at index: with its handle and UUID, or marked lost where NVML cannot give them."""
        nvml = self.nvml
        gpu = Gpu(index, None, None, SampleWindow(self.peak_window), SampleWindow(self.peak_window))
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpu.handle, gpu.uuid = handle, nvml.nvmlDeviceGetUUID(handle)
        except nvml.NVMLError as error:
            gpu.handle, gpu.lost = None, error
        return gpu

    def _register_xid_events(self, gpus: list[Gpu]):
        nvml = self.nvml
        try:
            events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as error:
            log.debug("no NVML event set, XID errors not counted: %s", error)
            return None
        for gpu in gpus:
            if gpu.lost is None:
                self._register_gpu_events(gpu, events)
        return events

    def _register_gpu_events(self, gpu: Gpu, events) -> None:
        """Count the GPU's XID errors where it supports events (its xid series is left out where not)."""
        nvml = self.nvml
        try:
            nvml.nvmlDeviceRegisterEvents(gpu.handle, nvml.nvmlEventTypeXidCriticalError, events)
            gpu.xid_events = True
        except nvml.NVMLError as error:
            log.debug("GPU %d: XID events not counted: %s", gpu.index, error)

    def _schedule_retry(self, now: float, error: Exception) -> None:
        self._last_error = error
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self.backoff_max)

    def _shutdown(self) -> None:
        nvml = self.nvml
        if self._events is not None:
            try:
                nvml.nvmlEventSetFree(self._events)
            except nvml.NVMLError:
                pass
            self._events = None
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
        self._gpus = None

    def _fail(self, now: float, error: Exception) -> None:
        log.debug("NVML call failed, shutting NVML down: %s", error)
        self._shutdown()
        self._schedule_retry(now, error)

    def _errors(self, names: tuple[str, ...]) -> tuple[type, ...]:
        """The binding's exception classes of those names (an older binding may lack some)."""
        return tuple(getattr(self.nvml, name) for name in names if hasattr(self.nvml, name))

    def _ask(self, gpu: Gpu, function: str, *args):
        """NVML's answer to function(gpu's handle, *args), or None where the GPU cannot answer it, for good or
        this time. Raises GpuLost when the GPU stopped answering at all."""
        if function in gpu.unanswerable:
            return None
        nvml = self.nvml
        try:
            return getattr(nvml, function)(gpu.handle, *args)
        except nvml.NVMLError as error:
            if isinstance(error, self._errors(LOST_ERRORS)):
                raise GpuLost(error) from error
            if isinstance(error, self._errors(UNANSWERABLE_ERRORS)):
                self._never_ask_again(gpu, function, error)
            elif function not in gpu.failures_said:  # said once: it may fail every pass
                gpu.failures_said.add(function)
                log.warning("GPU %d: %s failed: %s; its series is left out while it fails", gpu.index,
                            function, error)
            return None

    def _never_ask_again(self, gpu: Gpu, function: str, error: Exception) -> None:
        gpu.unanswerable.add(function)
        # "Not supported" is what many GPUs say of ECC or graphics processes: routine, so debug level.
        level = logging.DEBUG if isinstance(error, self._errors(("NVMLError_NotSupported",))) else logging.INFO
        log.log(level, "GPU %d: %s: %s; not asked again", gpu.index, function, error)

    def _lose(self, gpu: Gpu, error: Exception, now: float) -> None:
        """Leave the GPU out and ask for it again later: 1 s, doubling up to backoff_max, as for NVML."""
        if gpu.retry_delay == 0.0:  # newly lost
            log.warning("GPU %d (%s) is lost: %s; its series are left out, the other GPUs go on",
                        gpu.index, gpu.uuid or "uuid unknown", error)
            gpu.retry_delay = self.backoff_initial
        else:
            gpu.retry_delay = min(gpu.retry_delay * 2, self.backoff_max)
        gpu.lost = error
        gpu.retry_at = now + gpu.retry_delay

    def _try_again(self, gpu: Gpu, now: float) -> None:
        """Ask NVML for a lost GPU again once its retry is due; it is back once it answers a query."""
        if now < gpu.retry_at:
            return
        nvml = self.nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(gpu.index)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            nvml.nvmlDeviceGetMemoryInfo(handle)  # NVML may keep a lost GPU's handle: only an answer proves it
        except nvml.NVMLError as error:
            self._lose(gpu, error, now)
            return
        if uuid != gpu.uuid:  # another board at this index (or the first sight of it): nothing carries over
            gpu.unanswerable.clear()
            gpu.failures_said.clear()
        gpu.handle, gpu.uuid = handle, uuid
        # Readings from before the loss are not current: the series come back with new readings.
        gpu.utilization, gpu.memory_used = SampleWindow(self.peak_window), SampleWindow(self.peak_window)
        gpu.slow = None
        if self._events is not None and not gpu.xid_events:
            self._register_gpu_events(gpu, self._events)
        gpu.lost, gpu.retry_delay = None, 0.0
        log.info("GPU %d (%s) answers again", gpu.index, uuid)

    def sample(self, now: float) -> None:
        # (No job tracker update here: this runs in a loop of its own, whose `now` is never the host loop's, so
        # the tracker, which reads every job process once per `now`, read them all a second time each tick. The
        # jobs on a GPU are published with its slow readings: the slow sample brings the tracker up to date.)
        gpus = self._gpus if self._gpus is not None else self._start(now)
        for gpu in gpus:
            if gpu.lost is not None:
                self._try_again(gpu, now)
            if gpu.lost is None:
                self._sample_fast(gpu, now)
            self.progressed()   # a driver slow on each of 8 GPUs is no hung one
        self._fail_if_no_gpu_answers(gpus, now)
        # NVML is back once a GPU answers, not once it initialises: NVML may hand out the handles of GPUs that
        # answer nothing, and resetting the backoff at the start re-initialised it every second for good.
        self._backoff = self.backoff_initial
        self._last_error = None

    def _sample_fast(self, gpu: Gpu, now: float) -> None:
        try:
            utilization = self._ask(gpu, "nvmlDeviceGetUtilizationRates")
            memory = self._ask(gpu, "nvmlDeviceGetMemoryInfo")
        except GpuLost as lost:
            self._lose(gpu, lost.error, now)
            return
        percent = _sane(utilization.gpu) if utilization is not None else None
        self._add_reading(gpu, "utilization", now, None if percent is None else min(percent / 100.0, 1.0))
        used, total = (_sane(memory.used), _sane(memory.total)) if memory is not None else (None, None)
        if used is not None and total is not None:
            gpu.memory_total = total
            used = min(used, total)  # more in use than there is: the size is the bound we know
        else:
            used = None
        self._add_reading(gpu, "memory_used", now, used)

    def _add_reading(self, gpu: Gpu, window: str, now: float, value: float | None) -> None:
        """Add the reading to the GPU's window. Without one (failed or nonsense), the window still moves on to now:
        kept whole until its latest reading was a window old, it showed a spike up to twice the window old as the
        peak of the last window. A query that keeps failing leaves its series out (an empty window), not frozen."""
        if value is not None:
            getattr(gpu, window).add(now, value)
        else:
            getattr(gpu, window).expire(now)

    def _fail_if_no_gpu_answers(self, gpus: list[Gpu], now: float) -> None:
        """With every GPU lost, NVML itself is suspect (driver gone, all GPUs reset): the collector fails, and
        NVML is shut down and initialised again with backoff."""
        lost = [gpu.lost for gpu in gpus if gpu.lost is not None]
        if len(lost) == len(gpus):
            self._fail(now, lost[-1])
            raise lost[-1]

    def sample_slow(self, now: float) -> None:
        if self.job_tracker is not None:
            try:
                self.job_tracker.update(now)    # once per `now`: shared with the slow loop's other collectors
            except OSError as error:  # the jobs collector reports the job dir; GPUs go on
                log.debug("job tracker: %s", error)
        gpus = self._gpus
        if gpus is None:
            return  # the fast loop reports the failure and re-initialises
        answered: list[tuple[Gpu, SlowReadings]] = []   # this pass's readings, whatever the fast loop does
        for gpu in gpus:
            if gpu.lost is not None:
                continue
            try:
                readings = self._read_slow(gpu)
            except GpuLost as lost:
                self._lose(gpu, lost.error, now)
                continue
            gpu.slow = readings
            answered.append((gpu, readings))
            self.progressed()
        if not answered:
            error = next((gpu.lost for gpu in gpus if gpu.lost is not None), None)
            if error is not None:
                raise error  # the fast loop shuts NVML down and re-initialises it
        self._drain_xid_events(gpus)
        if self.job_energy is not None:
            self._add_energy(answered, now)

    def _add_energy(self, answered: list[tuple[Gpu, SlowReadings]], now: float) -> None:
        """Each GPU's energy since its own previous reading to the jobs holding it now, split evenly. A GPU
        without a reading this pass keeps its previous one: its next interval is longer, no one else's is. A
        job's first pass on the GPUs opens its account at 0 (its series starts at 0, docs/metrics.md, as the CPU
        share's does): it held them for only part of that interval, and opened at its share, the series' first
        sample was no increase to Prometheus."""
        jobs = self.job_tracker.snapshot if self.job_tracker is not None else None
        shares: list[tuple[list[str], float]] = []
        for gpu, readings in answered:
            joules = readings.energy_joules
            # Without this pass's process list the holders are only the jobs declaring the GPU: they took the
            # whole interval, a job on it by its processes nothing. Keep the previous reading, as without one.
            if joules is None or not readings.holders_known:
                continue
            previous = self._energy_read.get(gpu.uuid)
            self._energy_read[gpu.uuid] = (joules, now, readings.energy_read_at)
            # The first reading is the baseline; the holders get their account.
            used = 0.0 if previous is None else _energy_step(previous, joules, now, readings.energy_read_at)
            holders = _jobs_on(gpu, readings, jobs)[1]
            if holders:
                shares.append((holders, used))
        opened = {job_id for holders, _ in shares for job_id in holders if self.job_energy.has(job_id, "gpu")}
        for holders, used in shares:
            # The interval counts whole for the holders that were counting: a job's account opens at 0 (the
            # interval it came in was before its series), and its share divided out went to no job.
            counting = [job_id for job_id in holders if job_id in opened]
            for job_id in holders:
                self.job_energy.add(job_id, "gpu", used / len(counting) if job_id in opened else 0.0)

    def _read_slow(self, gpu: Gpu) -> SlowReadings:
        nvml, ask = self.nvml, self._ask
        power = _sane(ask(gpu, "nvmlDeviceGetPowerUsage"))
        energy = _sane(ask(gpu, "nvmlDeviceGetTotalEnergyConsumption"))
        energy_read_at = time.monotonic()
        clock = _sane(ask(gpu, "nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM))
        processes: dict[int, int] = {}
        holders_known = True
        for function in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            listed = ask(gpu, function)
            holders_known = holders_known and (listed is not None or function in gpu.unanswerable)
            for process in listed or ():
                used = _sane(process.usedGpuMemory) or 0  # None where the driver hides it (no permission)
                processes[process.pid] = max(processes.get(process.pid, 0), used)
        return SlowReadings(
            temperature_celsius=_sane(ask(gpu, "nvmlDeviceGetTemperature", nvml.NVML_TEMPERATURE_GPU)),
            power_watts=None if power is None else power / 1000.0,
            energy_joules=None if energy is None else energy / 1000.0,
            energy_read_at=energy_read_at,
            clock_sm_hertz=None if clock is None else clock * 1e6,
            throttle_reasons=self._throttle_reasons(gpu),
            ecc_corrected=ask(gpu, "nvmlDeviceGetTotalEccErrors", nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                              nvml.NVML_VOLATILE_ECC),
            ecc_uncorrected=ask(gpu, "nvmlDeviceGetTotalEccErrors", nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                nvml.NVML_VOLATILE_ECC),
            process_memory=processes,
            holders_known=holders_known,
        )

    def _throttle_reasons(self, gpu: Gpu) -> int | None:
        """The throttle reasons bitmask from the newest function the binding and the driver both have."""
        for function in THROTTLE_FUNCTIONS:
            if function in gpu.unanswerable or not hasattr(self.nvml, function):
                continue
            reasons = self._ask(gpu, function)
            if function not in gpu.unanswerable:  # answered, or failed this time only: no fallback needed
                return reasons
        return None

    def _drain_xid_events(self, gpus: list[Gpu]) -> None:
        nvml = self.nvml
        if self._events is None:
            return
        by_index = {gpu.index: gpu for gpu in gpus}
        for _ in range(MAX_EVENTS_PER_SAMPLE):
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
                if not event.eventType & nvml.nvmlEventTypeXidCriticalError:
                    continue
                gpu = by_index.get(nvml.nvmlDeviceGetIndex(event.device))
            except nvml.NVMLError_Timeout:
                return
            except nvml.NVMLError as error:  # a lost GPU's events: the per-GPU queries say what is wrong
                if not self._event_failure_said:
                    self._event_failure_said = True
                    log.warning("NVML events: %s; XID errors not counted while it fails", error)
                return
            if gpu is not None:
                self._xid_errors[gpu.uuid] = self._xid_errors.get(gpu.uuid, 0) + 1

    def collect(self):
        gpus = self._gpus
        if not gpus:
            return
        labels = ["gpu", "uuid"]

        def family(kind, name, help_text, extra=()):
            return kind(name, help_text, labels=labels + list(extra))

        utilization = family(GaugeMetricFamily, Node.GPU_UTILIZATION,
                             "Share of time a kernel ran (0-1), mean of the samples over the peak window.")
        utilization_peak = family(GaugeMetricFamily, "hw_gpu_utilization_peak_ratio",
                                  "Share of time a kernel ran (0-1), max of the samples over the peak window.")
        memory = family(GaugeMetricFamily, Node.GPU_MEMORY_USAGE, "GPU memory in use.")
        memory_limit = family(GaugeMetricFamily, "hw_gpu_memory_limit_bytes", "GPU memory size.")
        memory_peak = family(GaugeMetricFamily, "hw_gpu_memory_usage_peak_bytes",
                             "Max of GPU memory in use over the peak window.")
        temperature = family(GaugeMetricFamily, Node.GPU_TEMPERATURE, "GPU core temperature.")
        power = family(GaugeMetricFamily, "hw_gpu_power_watts", "GPU board power draw.")
        energy = family(CounterMetricFamily, "hw_gpu_energy_joules_total",
                        "Energy the GPU consumed since the driver loaded.")
        clock = family(GaugeMetricFamily, "hw_gpu_clock_sm_hertz", "Current SM clock.")
        throttle = family(GaugeMetricFamily, "hw_gpu_throttle_reasons",
                          "1 while the reason holds the clocks down, else 0.", ["reason"])
        errors = family(CounterMetricFamily, "hw_gpu_errors_total",
                        "ECC errors since the driver loaded (corrected, uncorrected) and XID critical "
                        "errors seen since the exporter started.", ["type"])
        job_info = family(GaugeMetricFamily, Node.GPU_JOB,
                          "1 for each job the GPU serves (declared in the job mapping or running on it).",
                          ["job_id"])
        process_memory = GaugeMetricFamily("hw_gpu_process_memory_bytes",
                                           "GPU memory used by the job's processes on this GPU.",
                                           labels=["gpu", "job_id"])
        jobs = self.job_tracker.snapshot if self.job_tracker is not None else None
        nvml = self.nvml
        for gpu in gpus:
            if gpu.lost is not None:
                continue  # left out, not frozen
            ids = [str(gpu.index), gpu.uuid]
            if len(gpu.utilization):
                utilization.add_metric(ids, gpu.utilization.mean())
                utilization_peak.add_metric(ids, gpu.utilization.peak())
            if len(gpu.memory_used):
                memory.add_metric(ids, gpu.memory_used.latest())
                memory_limit.add_metric(ids, gpu.memory_total)
                memory_peak.add_metric(ids, gpu.memory_used.peak())
            slow = gpu.slow
            if slow is None:
                continue
            for target, value in ((temperature, slow.temperature_celsius), (power, slow.power_watts),
                                  (energy, slow.energy_joules), (clock, slow.clock_sm_hertz)):
                if value is not None:
                    target.add_metric(ids, value)
            if slow.throttle_reasons is not None:
                for constant, reason in THROTTLE_REASONS:
                    bit = getattr(nvml, constant)
                    throttle.add_metric(ids + [reason], 1 if slow.throttle_reasons & bit else 0)
            if slow.ecc_corrected is not None:
                errors.add_metric(ids + ["ecc_corrected"], slow.ecc_corrected)
            if slow.ecc_uncorrected is not None:
                errors.add_metric(ids + ["ecc_uncorrected"], slow.ecc_uncorrected)
            if gpu.xid_events:
                errors.add_metric(ids + ["xid"], self._xid_errors.get(gpu.uuid, 0))
            used_by_job, holders = _jobs_on(gpu, slow, jobs)
            for job_id in holders:
                job_info.add_metric(ids + [job_id], 1)
            for job_id in sorted(used_by_job):
                process_memory.add_metric([str(gpu.index), job_id], used_by_job[job_id])
        yield from (utilization, utilization_peak, memory, memory_limit, memory_peak, temperature, power,
                    energy, clock, throttle, errors, job_info, process_memory)

    def close(self) -> None:
        if self._gpus is not None:
            self._shutdown()


def _jobs_on(gpu: Gpu, slow: SlowReadings, jobs) -> tuple[dict[str, int], list[str]]:
    """GPU memory the jobs' processes use on the GPU, and the jobs holding it (declared in their mapping or
    running on it), sorted."""
    if jobs is None:
        return {}, []
    used_by_job: dict[str, int] = {}
    for pid, used in slow.process_memory.items():
        job_id = jobs.job_of_pid.get(pid)
        if job_id is not None:
            used_by_job[job_id] = used_by_job.get(job_id, 0) + used
    # A mapping names its GPUs by NVML index or by UUID ("GPU-..."): the UUID stays right where
    # CUDA_VISIBLE_DEVICES or a container renumbers the GPUs. CUDA takes a unique prefix of a UUID too
    # (CUDA_VISIBLE_DEVICES=GPU-5d2f9e81), which the trainer writes as given: such a job held no GPU. The UUID's
    # prefixes are looked up in each job's entries (a set): a mapping's thousands of entries cost no more.
    prefixes = {gpu.uuid[:end] for end in range(MIN_UUID_PREFIX, len(gpu.uuid) + 1)}
    declared = {job_id for job_id, named in jobs.gpus.items()
                if gpu.index in named or not prefixes.isdisjoint(named)}
    return used_by_job, sorted(declared | used_by_job.keys())


def _energy_step(previous: tuple[float, float, float], joules: float, now: float, read_at: float) -> float:
    """Joules a GPU used from its previous reading (joules, pass time, read time) to this one. The interval is the
    longer of the time between the two passes and between the two reads (a read late in its pass, after slow
    GPUs, covers more than the pass interval)."""
    last_joules, last_now, last_read_at = previous
    most = MAX_GPU_WATTS * max(now - last_now, read_at - last_read_at, 0.0)
    # Back: a reset (driver reload, GPU reset), whose new value is what it counted since.
    used = joules - last_joules if joules >= last_joules else joules
    return used if used <= most else 0.0


def _sane(reading: float | None) -> float | None:
    """The reading, or None where it is nonsense (NaN, infinite, negative): left out for this sample."""
    if reading is None or not math.isfinite(reading) or reading < 0:
        return None
    return reading
