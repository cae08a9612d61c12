"""Helpers for the exporter tests: a fake NVML, the /proc and powercap fixtures, collectors built on them,
parsing."""

import os
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pynvml
from prometheus_client.parser import text_string_to_metric_families

from trainmetrics.exporters.collectors.cpu import CpuCollector
from trainmetrics.exporters.collectors.disk import DiskCollector
from trainmetrics.exporters.collectors.energy import EnergyCollector
from trainmetrics.exporters.collectors.filesystem import FilesystemCollector
from trainmetrics.exporters.collectors.gpu import GpuCollector
from trainmetrics.exporters.collectors.jobs import JobsCollector, JobTracker
from trainmetrics.exporters.collectors.memory import MemoryCollector
from trainmetrics.exporters.collectors.network import NetworkCollector
from trainmetrics.exporters.collectors.processes import ProcessesCollector
from trainmetrics.exporters.exporter import Exporter
from trainmetrics.exporters.job_energy import JobEnergy

FIXTURES = Path(__file__).parent / "fixtures"
PROC_T0 = FIXTURES / "proc" / "t0"
PROC_T1 = FIXTURES / "proc" / "t1"
FIXTURE_JOB_DIR = FIXTURES / "jobs"
# One CPU package (intel-rapl:0, with its cores' subzone, also listed at the top as in sysfs) and the
# platform's psys zone, which holds the package's energy too: only intel-rapl:0 counts.
FIXTURE_POWERCAP = FIXTURES / "powercap"
FIXTURE_DESCENDANTS = {4242: [4250, 4251]}
GIB = 1 << 30


@dataclass
class FakeGpu:
    """What the fake NVML reports for one device; utilisation is a list consumed one value per sample.

    lost=True makes every call on this device alone raise "GPU is lost"; errors maps an NVML function name to
    the NVML error code that call raises on this device (NVML_ERROR_NOT_SUPPORTED on a MIG GPU's utilisation,
    NVML_ERROR_FUNCTION_NOT_FOUND for a function the driver lacks).
    """

    uuid: str
    utilization: list[int]
    memory_used: list[int]
    memory_total: int = 80 * GIB
    temperature: int = 55
    power_milliwatts: float = 250_000
    energy_millijoules: int | None = 9_000_000     # None: not supported
    clock_sm_mhz: int = 1410
    throttle_reasons: int = 0
    ecc: tuple[int, int] | None = (0, 0)
    processes: dict[int, int | None] = field(default_factory=dict)
    lost: bool = False
    errors: dict[str, int] = field(default_factory=dict)


class FakeNvml:
    """Stands in for the pynvml module: same call names, constants and exception classes.

    missing=True makes nvmlInit fail as without the library; lost=True makes every device call raise
    "GPU is lost" until it is set back to False.
    """

    def __init__(self, gpus: list[FakeGpu], missing: bool = False):
        self.gpus = gpus
        self.missing = missing
        self.lost = False
        self.initialised = False
        self.init_calls = 0
        self.pending_xids: list[tuple[int, int]] = []  # (gpu index, xid)
        self.calls: Counter[tuple[str, int]] = Counter()  # (function name, handle) -> calls

    def __getattr__(self, name):
        if name.startswith(("NVML", "nvmlClocks", "nvmlEventType")):
            return getattr(pynvml, name)  # constants and exception classes
        raise AttributeError(name)

    def _error(self, code):
        return pynvml.NVMLError(code)

    def _device(self, handle, call: str = "") -> FakeGpu:
        self.calls[call, handle] += 1
        if not self.initialised:
            raise self._error(pynvml.NVML_ERROR_UNINITIALIZED)
        if self.lost or self.gpus[handle].lost:
            raise self._error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if call in self.gpus[handle].errors:
            raise self._error(self.gpus[handle].errors[call])
        return self.gpus[handle]

    def nvmlInit(self):
        self.init_calls += 1
        if self.missing:
            raise self._error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        if self.lost:
            raise self._error(pynvml.NVML_ERROR_GPU_IS_LOST)
        self.initialised = True

    def nvmlShutdown(self):
        self.initialised = False

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._device(index, "nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetIndex(self, handle):
        return handle

    def nvmlDeviceGetUUID(self, handle):
        return self._device(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetUtilizationRates(self, handle):
        gpu = self._device(handle, "nvmlDeviceGetUtilizationRates")
        value = gpu.utilization.pop(0) if len(gpu.utilization) > 1 else gpu.utilization[0]
        return SimpleNamespace(gpu=value, memory=value // 2)

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self._device(handle, "nvmlDeviceGetMemoryInfo")
        used = gpu.memory_used.pop(0) if len(gpu.memory_used) > 1 else gpu.memory_used[0]
        return SimpleNamespace(total=gpu.memory_total, used=used, free=gpu.memory_total - used)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._device(handle, "nvmlDeviceGetTemperature").temperature

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._device(handle, "nvmlDeviceGetPowerUsage").power_milliwatts

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        gpu = self._device(handle, "nvmlDeviceGetTotalEnergyConsumption")
        if gpu.energy_millijoules is None:
            raise self._error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.energy_millijoules

    def nvmlDeviceGetClockInfo(self, handle, clock):
        assert clock == pynvml.NVML_CLOCK_SM
        return self._device(handle, "nvmlDeviceGetClockInfo").clock_sm_mhz

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self._device(handle, "nvmlDeviceGetCurrentClocksEventReasons").throttle_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle):  # the name before R535 (still there)
        return self._device(handle, "nvmlDeviceGetCurrentClocksThrottleReasons").throttle_reasons

    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter_type):
        gpu = self._device(handle, "nvmlDeviceGetTotalEccErrors")
        if gpu.ecc is None:
            raise self._error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.ecc[0 if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else 1]

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        gpu = self._device(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes.items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        self._device(handle, "nvmlDeviceGetGraphicsRunningProcesses")
        raise self._error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlEventSetCreate(self):
        return "event-set"

    def nvmlEventSetFree(self, events):
        pass

    def nvmlDeviceRegisterEvents(self, handle, event_types, events):
        self._device(handle, "nvmlDeviceRegisterEvents")

    def nvmlEventSetWait_v2(self, events, timeout_ms):
        if self.lost:
            raise self._error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if not self.pending_xids:
            raise self._error(pynvml.NVML_ERROR_TIMEOUT)
        index, xid = self.pending_xids.pop(0)
        return SimpleNamespace(device=index, eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=xid)


def two_gpus() -> list[FakeGpu]:
    """The golden setup: GPU 0 busy with job mnist-1 (pid 4242) and a stranger, GPU 1 idle without ECC."""
    return [
        FakeGpu("GPU-0b7e1c3a-0000-4000-8000-000000000000", utilization=[40, 90], memory_used=[20 * GIB, 30 * GIB],
                throttle_reasons=pynvml.nvmlClocksThrottleReasonSwPowerCap,
                processes={4242: 18 * GIB, 7777: 1 * GIB}),
        FakeGpu("GPU-5d2f9e81-0000-4000-8000-000000000001", utilization=[0], memory_used=[512 << 20],
                temperature=35, power_milliwatts=60_500, energy_millijoules=1_000_500, clock_sm_mhz=210,
                throttle_reasons=pynvml.nvmlClocksThrottleReasonGpuIdle, ecc=None),
    ]


MAX_RANGE_UJ = 262_143_328_850      # a real package's max_energy_range_uj


def write_zone(root: Path, name: str, kind: str, energy_uj: int, max_uj: int = MAX_RANGE_UJ) -> None:
    """A powercap zone directory as sysfs shows it (kind: its name file, package-N, psys, dram...)."""
    zone = root / name
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "name").write_text(f"{kind}\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")


def write_proc(root: Path, host_busy: int, host_idle: int, processes: dict[int, int],
               parents: dict[int, int] | None = None) -> None:
    """A /proc with the aggregate cpu line (busy and idle ticks) and each pid's stat: its utime in ticks,
    started at tick 1000 + pid, its parent from `parents` (else 1)."""
    root.mkdir(parents=True, exist_ok=True)
    line = f"{host_busy} 0 0 {host_idle} 0 0 0 0 0 0"
    (root / "stat").write_text(f"cpu  {line}\ncpu0 {line}\n")
    for pid, utime in processes.items():
        (root / str(pid)).mkdir(exist_ok=True)
        (root / str(pid) / "stat").write_text(
            f"{pid} (python) R {(parents or {}).get(pid, 1)} {pid} {pid} 0 -1 0 0 0 0 0 {utime} 0 0 0 20 0 1 0 "
            f"{1000 + pid} 1000 10 0\n")


def fixture_statvfs(mountpoint: str) -> os.statvfs_result:
    """statvfs answers for the fixture mounts: (bsize, frsize, blocks, bfree, bavail, files, ffree, favail, flag, namemax)."""
    sizes = {"/": (4096, 4096, 1_000_000, 400_000, 350_000), "/boot/efi": (4096, 4096, 130_000, 100_000, 100_000),
             "/data": (4096, 4096, 5_000_000, 1_000_000, 1_000_000), "/mnt/nfs": (1 << 20, 1 << 20, 10_000, 2_500, 2_500)}
    sizes["/data/bind mount"] = sizes["/data"]    # a bind mount: the same filesystem
    if mountpoint not in sizes:
        raise FileNotFoundError(mountpoint)
    bsize, frsize, blocks, bfree, bavail = sizes[mountpoint]
    return os.statvfs_result((bsize, frsize, blocks, bfree, bavail, 0, 0, 0, 0, 255))


@dataclass
class FixtureHost:
    """Every collector built on the /proc fixtures and a fake NVML, and the exporter over them."""

    nvml: FakeNvml
    tracker: JobTracker
    energy: JobEnergy
    collectors: list
    exporter: Exporter

    def use_proc(self, proc_root: Path) -> None:
        """Point every /proc reader at another fixture snapshot."""
        for collector in self.collectors:
            if hasattr(collector, "proc_root"):
                collector.proc_root = str(proc_root)
        self.tracker.proc_root = str(proc_root)

    def sample_twice(self) -> bytes:
        """Fast and slow pass on t0, fast pass on t1 100 ms later, then render."""
        self.use_proc(PROC_T0)
        self.exporter.sample(100.0)
        self.exporter.sample_slow(100.0)
        self.use_proc(PROC_T1)
        self.exporter.sample(100.1)
        return self.exporter.render()


def build_fixture_host(nvml: FakeNvml | None = None, job_dir: Path = FIXTURE_JOB_DIR, proc_root: Path = PROC_T0,
                       backoff_initial: float = 1.0, powercap_root: Path = FIXTURE_POWERCAP,
                       energy: JobEnergy | None = None) -> FixtureHost:
    """Collectors over the fixtures, in the COLLECTORS table's order, inside an Exporter."""
    nvml = nvml if nvml is not None else FakeNvml(two_gpus())
    energy = energy if energy is not None else JobEnergy()
    tracker = JobTracker(job_dir, proc_root=proc_root, descendants=lambda pid: FIXTURE_DESCENDANTS.get(pid, []),
                         clock_ticks=100, page_bytes=4096)
    collectors = [
        CpuCollector(proc_root, peak_window=1.0, clock_ticks=100),
        MemoryCollector(proc_root, peak_window=1.0),
        DiskCollector(proc_root),
        FilesystemCollector(proc_root, statvfs=fixture_statvfs, is_directory=lambda path: True),
        NetworkCollector(proc_root),
        ProcessesCollector(proc_root),
        JobsCollector(tracker),
        GpuCollector(nvml=nvml, peak_window=1.0, job_tracker=tracker, backoff_initial=backoff_initial,
                     job_energy=energy),
        EnergyCollector(energy, tracker, proc_root, powercap_root, clock_ticks=100),
    ]
    return FixtureHost(nvml, tracker, energy, collectors, Exporter(collectors, sample_interval=0.1))


def parse_exposition(text: str | bytes) -> dict[str, dict[tuple, float]]:
    """{metric name: {sorted label items: value}} from exposition text (counters keep their _total)."""
    if isinstance(text, bytes):
        text = text.decode()
    parsed: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return parsed


def scrape(url: str) -> tuple[int, str, bytes]:
    """GET url/metrics: (status, content type, body)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read()
