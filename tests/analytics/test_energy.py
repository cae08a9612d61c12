"""Energy per job end to end: real `trainmetrics train` jobs attributed by exporters built in-process, scraped
by a real Prometheus that remote-writes to a real VictoriaMetrics, and the analytics over both.

One exporter has a fake NVML and a fake powercap tree: its GPU's energy counter advances a fixed step per
slow read while the GPU runs a job, and is reset once meanwhile, so the job's GPU energy is computable by
hand; the analytics must report it exactly, and the CPU estimate exactly as the exporter counted it. The
other exporter is this machine's own (no NVML, no readable RAPL): its job's energy is null, and says why.
"""

import asyncio
import threading
import time
from pathlib import Path

import pytest

from tests.exporters.exporter_fixtures import GIB, FakeGpu, FakeNvml, write_zone
from tests.processes import kill_left
from trainmetrics.analytics.app import Settings
from trainmetrics.analytics.lookup import find_jobs
from trainmetrics.analytics.prometheus import PrometheusClient
from trainmetrics.analytics.job import (NOT_ATTRIBUTED, NO_CPU_ENERGY, NO_ENERGY_SOURCE, NO_GPU_ENERGY,
                                         PARTIAL_CPU_ENERGY, PARTIAL_GPU_ENERGY, _energy)
from trainmetrics.analytics.scoring import rounded
from trainmetrics.contract import Node
from trainmetrics.exporters.collectors import COLLECTORS
from trainmetrics.exporters.collectors.base import CollectorContext
from trainmetrics.exporters.collectors.energy import EnergyCollector
from trainmetrics.exporters.collectors.gpu import GpuCollector
from trainmetrics.exporters.collectors.jobs import JobsCollector, JobTracker
from trainmetrics.exporters.exporter import Exporter, metrics_server
from trainmetrics.exporters.job_energy import JobEnergy, state_file_for
from trainmetrics.prometheus_process import PrometheusServer, VictoriaMetricsServer, free_port
from trainmetrics.trainer.discovery import write_target_file

from .conftest import finish, same_answer, serve, start_job

JOB, ABSENT = "energy-1", "no-energy-1"
STEP_MJ, RESET_MJ, RESET_AT = 1_500, 250, 3     # the fake GPU's counter: +1.5 J per busy read, reset to 0.25 J
RAPL_STEP_UJ = 2_000_000                        # the fake package: +2 J per slow pass
ARRIVED = ("sum(count_over_time(process_energy_joules_total[10m]))",
           "sum(count_over_time(process_cpu_time_seconds_total[10m]))",
           "count(last_over_time(trainer_job_end_timestamp_seconds[10m]))",
           "sum(count_over_time(trainer_samples_total[10m]))")


class JobPoweredNvml(FakeNvml):
    """One GPU that runs whatever the exporter's job tracker holds: it lists those processes, and while it does
    its energy counter advances STEP_MJ per read; its RESET_AT-th busy read finds it reset (a driver reload)
    to RESET_MJ."""

    def __init__(self, tracker: JobTracker):
        super().__init__([FakeGpu("GPU-e0000000-0000-4000-8000-000000000000", utilization=[90], memory_used=[GIB])])
        self.tracker = tracker
        self.busy_reads = 0

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        gpu = self._device(handle)
        gpu.processes = {pid: GIB for pid in self.tracker.snapshot.job_of_pid}
        if gpu.processes:
            self.busy_reads += 1
            gpu.energy_millijoules = RESET_MJ if self.busy_reads == RESET_AT else gpu.energy_millijoules + STEP_MJ
        return gpu.energy_millijoules

    @property
    def expected_joules(self) -> float:
        """What the job's GPU used by hand: a step per busy read, but the reset read counts its new value, and the
        first, the pass that first attributes the job, opens its series at 0 (docs/metrics.md)."""
        assert self.busy_reads > RESET_AT, f"the job held the GPU for {self.busy_reads} reads only"
        return ((self.busy_reads - 2) * STEP_MJ + RESET_MJ) / 1000


class FreezingTracker(JobTracker):
    """A job tracker whose listing that first finds JOB's mapping file gone, while it holds the job, waits there
    until `thaw` is set: the exporter's passes stop and it goes on serving the job's series, as a slowly
    scraped exporter does after a job ends. (Decided inside the listing: a check before each pass missed a file
    removed between the check and the pass's listing, and the tracker let the job go.)"""

    def __init__(self, job_dir: Path):
        super().__init__(job_dir)
        self.frozen, self.thaw, self.seen = threading.Event(), threading.Event(), False

    def _read_files(self) -> dict:
        files = super()._read_files()
        self.seen = self.seen or JOB in self.snapshot.usage
        if not self.thaw.is_set() and JOB in self.snapshot.usage and not any(name.startswith(JOB) for name in files):
            self.frozen.set()
            self.thaw.wait()
        return files


class Loops(threading.Thread):
    """The fake exporter's fast pass every 50 ms and slow pass every other, in one thread (so the fake NVML and
    the collectors see the same jobs in a slow pass), the fake package advancing before each slow pass."""

    def __init__(self, exporter: Exporter, package: Path):
        super().__init__(daemon=True)
        self.exporter, self.package = exporter, package
        self.halt = threading.Event()
        self.package_uj = int(package.read_text())

    def run(self) -> None:
        tick = 0
        while not self.halt.wait(0.05):
            now = time.monotonic()
            self.exporter.sample(now)
            if tick % 2 == 0:
                self.package_uj += RAPL_STEP_UJ
                self.package.write_text(f"{self.package_uj}\n")
                self.exporter.sample_slow(now)
            self.exporter.render()
            tick += 1


@pytest.fixture(scope="module")
def energy_run(tmp_path_factory):
    """Both jobs run and ended, every sample in both backends: ({backend: server}, job runs, fake NVML,
    the fake exporter's final counts of JOB by source)."""
    work = tmp_path_factory.mktemp("energy")
    fake_dir, real_dir, powercap = work / "fake-jobs", work / "real-jobs", work / "powercap"
    tracker = FreezingTracker(fake_dir)
    nvml = JobPoweredNvml(tracker)
    ledger = JobEnergy(state_file_for(fake_dir))
    write_zone(powercap, "intel-rapl:0", "package-0", 5_000_000)
    fake = Exporter([JobsCollector(tracker), GpuCollector(nvml=nvml, job_tracker=tracker, job_energy=ledger),
                     EnergyCollector(ledger, tracker, powercap_root=powercap)])
    loops = Loops(fake, powercap / "intel-rapl:0" / "energy_uj")
    # This machine's exporter: every collector as `trainmetrics exporter` builds them.
    context = CollectorContext(job_tracker=JobTracker(real_dir), job_energy=JobEnergy(state_file_for(real_dir)))
    real = Exporter([spec.load().build(context) for spec in COLLECTORS.values()])
    servers = [metrics_server(exporter, ("127.0.0.1", 0)).serve_in_background() for exporter in (fake, real)]
    victoria = VictoriaMetricsServer(work / "victoria")
    prometheus = PrometheusServer(work / "prometheus", remote_write=[victoria.remote_write_url],
                                  static_targets={"exporter": [f"127.0.0.1:{server.port}" for server in servers]})
    # The jobs' targets announced before Prometheus starts, as each job announces itself (same file, same
    # port): its first discovery holds them, where a new target would wait for its next one (up to 5 s).
    ports = {JOB: free_port(), ABSENT: free_port()}
    for job_id, port in ports.items():
        write_target_file(prometheus.targets_dir, f"{job_id}.rank0", f"127.0.0.1:{port}")
    processes = []
    try:
        victoria.start()
        prometheus.start()
        loops.start()
        real.start()
        # Long enough (~1 s of training) for the exporter to sample each job several times.
        common = ("--model", "mlp", "--dataset", "blobs", "--epochs", "8", "--device", "cpu")
        processes = [start_job(job_id, prometheus.targets_dir, "--job-dir", str(job_dir), "--metrics-listen",
                               f"127.0.0.1:{ports[job_id]}", *common)
                     for job_id, job_dir in ((JOB, fake_dir), (ABSENT, real_dir))]
        runs = {job_id: finish(job_id, process) for job_id, process in zip((JOB, ABSENT), processes)}
        # Ended and no longer scraped, but an exporter still attributes it: its energy may still grow, so its
        # report is not yet to be kept (it was stored 5 s after the end whatever the exporter's interval).
        assert tracker.frozen.wait(10), f"the exporter never saw the job's mapping go (it saw the job: {tracker.seen})"
        facts = asyncio.run(settledness(prometheus.url, lambda facts: not facts.live))
        assert facts.end is not None and facts.attributed_now and not facts.settled
        tracker.thaw.set()
        facts = asyncio.run(settledness(prometheus.url, lambda facts: not facts.attributed_now))
        assert facts.settled
        # Once the exporter no longer attributes the job (its mapping file went), every slow pass that counted
        # for it has published: its counts are final, and the exporter holds them for Prometheus.
        deadline = time.monotonic() + 10
        while JOB in tracker.snapshot.usage:
            assert time.monotonic() < deadline, "the exporter still attributes the job"
            time.sleep(0.05)
        final = {source: joules for (job_id, source), joules in ledger.published.items() if job_id == JOB}
        prometheus.wait_for(f'{Node.JOB_ENERGY}{{job_id="{JOB}"}}', timeout=10, predicate=lambda result: {
            sample["metric"]["source"]: float(sample["value"][1]) for sample in result} == final)
        loops.halt.set()
        for server in servers:      # their series go stale: the counts to agree on stop growing
            server.close()
        victoria.wait_until_agrees(prometheus, ARRIVED)
        yield {"prometheus": prometheus, "victoria-metrics": victoria}, runs, nvml, final
    finally:
        loops.halt.set()
        tracker.thaw.set()
        if loops.is_alive():
            loops.join()
        for server in servers:
            server.close()
        real.stop()
        kill_left(processes)
        prometheus.stop()
        victoria.stop()


async def settledness(url: str, until, timeout: float = 15):
    """The job's facts once `until(facts)` holds."""
    client = PrometheusClient(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            facts = (await find_jobs(client, [JOB], 3600, time.time()))[0]
            if until(facts) or time.monotonic() > deadline:
                return facts
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()


def energy_sources_here() -> bool:
    """Whether this machine's exporter can count energy: NVML finds a GPU, or a RAPL package is readable."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        return True
    for counter in Path("/sys/class/powercap").glob("intel-rapl:*/energy_uj"):
        try:
            counter.read_bytes()
            return True
        except OSError:
            continue
    return False


def analytics(backend, path: str) -> dict:
    with serve(Settings(prometheus_url=backend.url)) as client:
        response = client.get(path)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
def test_energy_is_what_the_fake_counters_advanced_while_the_job_ran(energy_run):
    backends, runs, nvml, final = energy_run
    assert runs[JOB].returncode == 0, runs[JOB].stderr[-2000:]
    # The exporter's own count is the hand computation: a reset counts its new value, never a negative step.
    assert final["gpu"] == nvml.expected_joules
    # The CPU share is an estimate from real CPU times: some of what the package used while the job ran.
    assert 0 < final["cpu"] <= nvml.busy_reads * RAPL_STEP_UJ / 1e6

    body = analytics(backends["prometheus"], f"/api/training/{JOB}/analytics")
    total = final["gpu"] + final["cpu"]
    assert body["energy"] == {"gpu_joules": rounded(final["gpu"]), "cpu_joules": rounded(final["cpu"]),
                              "total_joules": rounded(total),
                              "samples_per_joule": rounded(runs[JOB].summary["samples"] / total),
                              "unavailable_reason": None}
    assert body["performance"]["total_samples"] == runs[JOB].summary["samples"]
    same_answer(analytics(backends["victoria-metrics"], f"/api/training/{JOB}/analytics")["energy"],
                body["energy"], "energy")


@pytest.mark.slow
def test_without_a_gpu_energy_counter_or_rapl_the_energy_is_null_and_says_why(energy_run):
    backends, runs, _, _ = energy_run
    assert runs[ABSENT].returncode == 0, runs[ABSENT].stderr[-2000:]
    if energy_sources_here():
        pytest.skip("this machine has a GPU or a readable RAPL package: its exporter counts energy")
    for backend in backends.values():
        body = analytics(backend, f"/api/training/{ABSENT}/analytics")
        assert body["resource_utilization"]["average_cpu_percent"] is not None    # the exporter saw the job
        assert body["energy"] == {"gpu_joules": None, "cpu_joules": None, "total_joules": None,
                                  "samples_per_joule": None, "unavailable_reason": NO_ENERGY_SOURCE}


@pytest.mark.slow
def test_the_comparison_names_the_most_energy_efficient_job(energy_run):
    backends, _, _, final = energy_run
    body = analytics(backends["prometheus"], f"/api/training/analytics/compare?job_ids={ABSENT},{JOB}")
    assert body["winner"]["most_energy_efficient"] == JOB
    rows = {row["job_id"]: row for row in body["jobs"]}
    assert rows[JOB]["total_joules"] == rounded(final["gpu"] + final["cpu"]) and rows[JOB]["samples_per_joule"] > 0
    assert rows[ABSENT]["total_joules"] is None and rows[ABSENT]["samples_per_joule"] is None


def test_the_energy_block_says_which_figure_is_missing_and_why():
    def block(**by_source):
        return [{"metric": {"source": source, "instance": "n1"}, "value": [0, str(joules)]}
                for source, joules in by_source.items()]

    both = _energy(block(gpu=30.0, cpu=10.0) + block(gpu=20.0), samples=1000.0, attributed=True)
    assert (both.gpu_joules, both.cpu_joules, both.total_joules, both.samples_per_joule) == (50.0, 10.0, 60.0,
                                                                                           rounded(1000 / 60))
    assert both.unavailable_reason is None
    assert _energy(block(gpu=5.0), 10.0, True).unavailable_reason == NO_CPU_ENERGY
    cpu_only = _energy(block(cpu=4.0), 10.0, True)
    assert (cpu_only.gpu_joules, cpu_only.total_joules, cpu_only.unavailable_reason) == (None, 4.0, NO_GPU_ENERGY)
    assert _energy([], 10.0, attributed=True).unavailable_reason == NO_ENERGY_SOURCE
    # Two hosts attributed the job, one without readable RAPL: the CPU figure is partial and says so.
    partial = _energy(block(gpu=30.0, cpu=10.0), 10.0, True, hosts={"n1", "n2"})
    assert (partial.cpu_joules, partial.unavailable_reason) == (10.0, PARTIAL_CPU_ENERGY.format(counted=1, hosts=2))
    assert _energy(block(gpu=30.0, cpu=10.0), 10.0, True, hosts={"n1"}).unavailable_reason is None
    # A GPU job on two hosts, the second's GPUs without an energy counter: its GPU figure is partial.
    two_hosts = block(gpu=30.0, cpu=10.0) + [{"metric": {"source": "cpu", "instance": "n2"}, "value": [0, "5"]}]
    gpu_partial = _energy(two_hosts, 10.0, True, hosts={"n1", "n2"}, on_gpus=True)
    assert gpu_partial.unavailable_reason == PARTIAL_GPU_ENERGY.format(counted=1, hosts=2)
    assert _energy(two_hosts, 10.0, True, hosts={"n1", "n2"}).unavailable_reason is None      # a CPU job
    nothing = _energy([], 10.0, attributed=False)
    assert nothing.total_joules is None and nothing.unavailable_reason == NOT_ATTRIBUTED
