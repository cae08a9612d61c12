"""NVIDIA GPUs through NVML (nvidia-ml-py): utilisation, memory, power, clocks, errors, jobs per GPU.

Fast loop (every --sample-interval): utilisation and memory, the two gauges with peaks; each call costs
well under a millisecond. Slow loop (every --slow-interval, its own thread): temperature, power, the
energy counter (~4 ms), clocks, throttle reasons, ECC counters, XID events and the per-GPU process lists
that attribute GPUs to jobs. When NVML fails (library missing, driver gone, "GPU is lost") the collector
reports failure, shuts NVML down and re-initialises it with exponential backoff.

Energy per job: each slow sample adds a GPU's energy since its previous reading to the jobs holding the GPU
now, split evenly among them (exporters/job_energy.py keeps the accounts, the energy collector publishes
them). A counter that went back (a driver reload, a GPU reset) counts its new value, never a negative step.
"""

import logging
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
MAX_EVENTS_PER_SAMPLE = 256


@dataclass
class SlowReadings:
    """The slow loop's readings of one GPU; None where the GPU does not support the query."""

    temperature_celsius: float | None = None
    power_watts: float | None = None
    energy_joules: float | None = None
    clock_sm_hertz: float | None = None
    throttle_reasons: int | None = None
    ecc_corrected: int | None = None
    ecc_uncorrected: int | None = None
    process_memory: dict[int, int] = field(default_factory=dict)  # pid -> bytes


@dataclass
class Gpu:
    """One device: its identity, fast-loop windows and the latest slow readings."""

    index: int
    handle: object
    uuid: str
    utilization: SampleWindow
    memory_used: SampleWindow
    memory_total: int = 0
    xid_errors: int = 0
    slow: SlowReadings | None = None


class GpuCollector(Collector):
    """hw_gpu_* series per GPU ({gpu,uuid}) and hw_gpu_job_info / hw_gpu_process_memory_bytes per job."""

    name = "gpu"
    fast = True
    slow = True

    def __init__(self, nvml=None, peak_window: float = 1.0, job_tracker=None,
                 backoff_initial: float = 1.0, backoff_max: float = 60.0, job_energy=None):
        self._nvml = nvml
        self.peak_window = peak_window
        self.job_tracker = job_tracker
        self.job_energy = job_energy
        self._energy_read: dict[str, float] = {}    # uuid -> joules at the previous slow sample (over re-inits)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._backoff = backoff_initial
        self._retry_at = 0.0
        self._last_error: Exception | None = None
        self._gpus: list[Gpu] | None = None
        self._events = None
        self._generation = 0
        self._lost_generation: int | None = None  # set by the slow loop, handled by the fast one
        self._last_slow_error: Exception | None = None

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
            gpus = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                gpus.append(Gpu(index, handle, nvml.nvmlDeviceGetUUID(handle),
                                SampleWindow(self.peak_window), SampleWindow(self.peak_window)))
            if not gpus:
                raise CollectorUnavailable("NVML found no GPU")
            self._events = self._register_xid_events(gpus)
        except (nvml.NVMLError, CollectorUnavailable) as error:
            self._shutdown()
            self._schedule_retry(now, error)
            raise
        self._gpus = gpus
        self._generation += 1
        self._backoff = self.backoff_initial
        self._last_error = None
        log.info("NVML initialised: %d GPU(s)", len(gpus))
        return gpus

    def _register_xid_events(self, gpus: list[Gpu]):
        nvml = self.nvml
        try:
            events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as error:
            log.debug("no NVML event set, XID errors not counted: %s", error)
            return None
        for gpu in gpus:
            try:
                nvml.nvmlDeviceRegisterEvents(gpu.handle, nvml.nvmlEventTypeXidCriticalError, events)
            except nvml.NVMLError_NotSupported:
                log.debug("GPU %d: XID events not supported", gpu.index)
        return events

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

    def sample(self, now: float) -> None:
        if self.job_tracker is not None:
            try:
                self.job_tracker.update(now)
            except OSError as error:  # the jobs collector reports the job dir; GPUs go on
                log.debug("job tracker: %s", error)
        if self._lost_generation is not None and self._lost_generation == self._generation and self._gpus:
            self._fail(now, self._last_slow_error)
        self._lost_generation = None
        gpus = self._gpus if self._gpus is not None else self._start(now)
        nvml = self.nvml
        try:
            for gpu in gpus:
                utilization = nvml.nvmlDeviceGetUtilizationRates(gpu.handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(gpu.handle)
                gpu.utilization.add(now, utilization.gpu / 100.0)
                gpu.memory_used.add(now, memory.used)
                gpu.memory_total = memory.total
        except nvml.NVMLError as error:
            self._fail(now, error)
            raise

    def _optional(self, call, *args):
        """The call's result, or None where this GPU does not support it."""
        try:
            return call(*args)
        except self.nvml.NVMLError_NotSupported:
            return None

    def sample_slow(self, now: float) -> None:
        gpus, generation = self._gpus, self._generation
        if gpus is None:
            return  # the fast loop reports the failure and re-initialises
        nvml = self.nvml
        try:
            for gpu in gpus:
                gpu.slow = self._read_slow(gpu)
            self._drain_xid_events(gpus)
        except nvml.NVMLError as error:
            self._last_slow_error = error
            self._lost_generation = generation
            raise
        if self.job_energy is not None:
            self._add_energy(gpus)

    def _add_energy(self, gpus: list[Gpu]) -> None:
        """Each GPU's energy since the previous sample to the jobs holding it now, split evenly."""
        jobs = self.job_tracker.snapshot if self.job_tracker is not None else None
        for gpu in gpus:
            joules = gpu.slow.energy_joules
            if joules is None:
                continue
            previous = self._energy_read.get(gpu.uuid)
            self._energy_read[gpu.uuid] = joules
            if previous is None:
                used = 0.0              # the first reading is the baseline; the holders get their account
            elif joules < previous:
                used = joules           # reset (driver reload, GPU reset): what it counted since
            else:
                used = joules - previous
            holders = _jobs_on(gpu, gpu.slow, jobs)[1]
            for job_id in holders:
                self.job_energy.add(job_id, "gpu", used / len(holders))

    def _read_slow(self, gpu: Gpu) -> SlowReadings:
        nvml, optional, handle = self.nvml, self._optional, gpu.handle
        power = optional(nvml.nvmlDeviceGetPowerUsage, handle)
        energy = optional(nvml.nvmlDeviceGetTotalEnergyConsumption, handle)
        clock = optional(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
        throttle_call = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        processes: dict[int, int] = {}
        for list_call in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for process in optional(list_call, handle) or ():
                used = process.usedGpuMemory or 0  # None where the driver hides it (no permission)
                processes[process.pid] = max(processes.get(process.pid, 0), used)
        return SlowReadings(
            temperature_celsius=optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
            power_watts=None if power is None else power / 1000.0,
            energy_joules=None if energy is None else energy / 1000.0,
            clock_sm_hertz=None if clock is None else clock * 1e6,
            throttle_reasons=optional(throttle_call, handle),
            ecc_corrected=optional(nvml.nvmlDeviceGetTotalEccErrors, handle,
                                   nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC),
            ecc_uncorrected=optional(nvml.nvmlDeviceGetTotalEccErrors, handle,
                                     nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC),
            process_memory=processes,
        )

    def _drain_xid_events(self, gpus: list[Gpu]) -> None:
        nvml = self.nvml
        if self._events is None:
            return
        by_index = {gpu.index: gpu for gpu in gpus}
        for _ in range(MAX_EVENTS_PER_SAMPLE):
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError_Timeout:
                return
            if event.eventType & nvml.nvmlEventTypeXidCriticalError:
                gpu = by_index.get(nvml.nvmlDeviceGetIndex(event.device))
                if gpu is not None:
                    gpu.xid_errors += 1

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
            ids = [str(gpu.index), gpu.uuid]
            if len(gpu.utilization):
                utilization.add_metric(ids, gpu.utilization.mean())
                utilization_peak.add_metric(ids, gpu.utilization.peak())
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
            if self._events is not None:
                errors.add_metric(ids + ["xid"], gpu.xid_errors)
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
    declared = {job_id for job_id, indices in jobs.gpus.items() if gpu.index in indices}
    return used_by_job, sorted(declared | used_by_job.keys())
