"""Energy per job: GPU energy from a fake NVML whose counters the tests set (a reset included), CPU package
energy from fake powercap trees (a wrap-around included) shared out by CPU time, absent sources, the hold
after a job leaves, and the state file that carries the counts over an exporter restart."""

import json
import logging
import shutil

import pynvml
import pytest

from tests.exporters.exporter_fixtures import (FIXTURE_JOB_DIR, MAX_RANGE_UJ, FakeNvml, build_fixture_host,
                                              parse_exposition, two_gpus, write_proc, write_zone)
from trainmetrics.exporters.collectors.energy import EnergyCollector
from trainmetrics.exporters.collectors.jobs import JobsCollector, JobTracker
from trainmetrics.exporters.exporter import Exporter
from trainmetrics.exporters.job_energy import HOLD_SECONDS, MAX_JOBS, RESAVE_SECONDS, RETENTION_SECONDS, JobEnergy
from trainmetrics.jobmap import JobMapping, write_job_mapping


def energy_series(text: bytes) -> dict[tuple[str, str], float]:
    """process_energy_joules_total by (job_id, source)."""
    series = parse_exposition(text).get("process_energy_joules_total", {})
    return {(dict(labels)["job_id"], dict(labels)["source"]): value for labels, value in series.items()}


def success(text: bytes) -> dict[str, float]:
    return {dict(labels)["collector"]: value
            for labels, value in parse_exposition(text)["exporter_collector_success"].items()}


def test_gpu_energy_goes_to_the_jobs_holding_the_gpu_split_evenly_and_a_reset_counts_its_new_value(tmp_path):
    # mnist-1 (pid 4242) declares GPU 0; a second job on the fixtures' pid 5100 declares it too, for a while.
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    (job_dir / "mnist-1.rank0.json").write_text((FIXTURE_JOB_DIR / "mnist-1.rank0.json").read_text())
    second = write_job_mapping(job_dir, JobMapping(job_id="eval-2", pid=5100, gpus=[0], start_ticks=8))
    host = build_fixture_host(job_dir=job_dir, powercap_root=tmp_path / "no-powercap")
    gpu0, gpu1 = host.nvml.gpus

    def slow_pass(now: float, gpu0_mj: int) -> dict:
        gpu0.energy_millijoules = gpu0_mj
        gpu1.energy_millijoules += 5_000       # nobody's GPU: its energy goes to no job
        host.exporter.sample(now)
        host.exporter.sample_slow(now)
        return energy_series(host.exporter.render())

    # The first reading is the baseline: both jobs have their account, at 0.
    assert slow_pass(100.0, 9_000_000) == {("mnist-1", "gpu"): 0.0, ("eval-2", "gpu"): 0.0}
    assert slow_pass(101.0, 9_003_000) == {("mnist-1", "gpu"): 1.5, ("eval-2", "gpu"): 1.5}
    second.unlink()
    # eval-2 left: the next interval is mnist-1's alone, and eval-2's final count stays published (the hold).
    assert slow_pass(102.0, 9_005_500) == {("mnist-1", "gpu"): 4.0, ("eval-2", "gpu"): 1.5}
    # A driver reload: the counter starts again from 0 and reads 750 mJ; that is what counts, not -9004.75 J.
    assert slow_pass(103.0, 750) == {("mnist-1", "gpu"): 4.75, ("eval-2", "gpu"): 1.5}
    assert slow_pass(104.0, 2_750) == {("mnist-1", "gpu"): 6.75, ("eval-2", "gpu"): 1.5}
    # NVML lost and back: the GPU keeps its previous reading (by uuid), so the gap is one longer interval.
    host.nvml.lost = True
    host.exporter.sample(105.0)
    host.nvml.lost = False
    host.exporter.sample(107.0)
    assert slow_pass(107.5, 4_750) == {("mnist-1", "gpu"): 8.75, ("eval-2", "gpu"): 1.5}
    assert success(host.exporter.render())["energy"] == 1


def test_a_gpu_counter_step_no_gpu_could_use_in_its_interval_is_a_new_baseline_not_energy(tmp_path):
    """A counter that jumped up by 9e9 J in one second (a driver's glitch), or went back by 1 J (taken for a reset,
    its whole 8,999 J value counted), added that to the job's account, a count that only grows and outlives
    restarts. Now such a step is only a new baseline; the steps after it count as before."""
    host = build_fixture_host(powercap_root=tmp_path / "no-powercap")
    gpu0 = host.nvml.gpus[0]

    def slow_pass(now: float, gpu0_mj: int) -> dict:
        gpu0.energy_millijoules = gpu0_mj
        host.exporter.sample(now)
        host.exporter.sample_slow(now)
        return energy_series(host.exporter.render())

    assert slow_pass(100.0, 9_000_000) == {("mnist-1", "gpu"): 0.0}
    assert slow_pass(101.0, 9_000_000_000_000) == {("mnist-1", "gpu"): 0.0}    # up 9e9 J in 1 s
    assert slow_pass(102.0, 9_000_000_002_000) == {("mnist-1", "gpu"): 2.0}
    assert slow_pass(103.0, 8_999_000) == {("mnist-1", "gpu"): 2.0}            # back, yet 8,999 J in 1 s
    assert slow_pass(104.0, 9_000_000) == {("mnist-1", "gpu"): 3.0}
    # A real reset whose new value fits its interval still counts that value, a long outage's included.
    assert slow_pass(164.0, 6_000_000) == {("mnist-1", "gpu"): 6_003.0}


def test_a_job_that_comes_after_the_baseline_starts_its_gpu_series_at_0(tmp_path):
    """Its first interval on the GPU opened its account at that interval's share (250 J here): the series'
    first sample, which Prometheus' increase() and rate() never count, and only part of it the job's."""
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    host = build_fixture_host(job_dir=job_dir, powercap_root=tmp_path / "no-powercap")
    gpu0 = host.nvml.gpus[0]
    host.exporter.sample(100.0)
    host.exporter.sample_slow(100.0)                        # the GPUs' baseline: no job yet
    (job_dir / "mnist-1.rank0.json").write_text((FIXTURE_JOB_DIR / "mnist-1.rank0.json").read_text())
    readings = []
    for now in (101.0, 102.0):
        gpu0.energy_millijoules += 250_000
        host.exporter.sample(now)
        host.exporter.sample_slow(now)
        readings.append(energy_series(host.exporter.render()))
    assert readings == [{("mnist-1", "gpu"): 0.0}, {("mnist-1", "gpu"): 250.0}]


def test_a_gpu_declared_by_a_uuid_in_upper_case_is_the_gpu_nvml_names_in_lower_case(tmp_path):
    """A job given CUDA_VISIBLE_DEVICES=GPU-5D2F9E81-... (upper-case hex, as some tools write it) named its GPU
    so in its mapping: the exporter compared it with NVML's lower-case UUID, and the GPU was held by no job."""
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    host = build_fixture_host(job_dir=job_dir, powercap_root=tmp_path / "no-powercap")
    gpu1 = host.nvml.gpus[1]
    named = "GPU-" + gpu1.uuid[4:].upper()
    write_job_mapping(job_dir, JobMapping(job_id="eval-2", pid=5100, gpus=[named], start_ticks=8))
    for now, energy_millijoules in ((100.0, 1_000_000), (101.0, 1_004_000)):
        gpu1.energy_millijoules = energy_millijoules
        host.exporter.sample(now)
        host.exporter.sample_slow(now)
    assert energy_series(host.exporter.render()) == {("eval-2", "gpu"): 4.0}


def test_a_gpu_declared_by_uuid_gets_its_energy_and_job_info(tmp_path):
    """A job given its GPU by UUID (CUDA_VISIBLE_DEVICES=GPU-..., Kubernetes' device plugin) was mapped to GPU 0
    whatever GPU it was on; a mapping naming the UUID was refused whole."""
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    (job_dir / "mnist-1.rank0.json").write_text((FIXTURE_JOB_DIR / "mnist-1.rank0.json").read_text())
    host = build_fixture_host(job_dir=job_dir, powercap_root=tmp_path / "no-powercap")
    gpu0, gpu1 = host.nvml.gpus
    write_job_mapping(job_dir, JobMapping(job_id="eval-2", pid=5100, gpus=[gpu1.uuid], start_ticks=8))
    for now, energy_millijoules in ((100.0, 1_000_000), (101.0, 1_004_000)):
        gpu0.energy_millijoules, gpu1.energy_millijoules = 2 * energy_millijoules, energy_millijoules
        host.exporter.sample(now)
        host.exporter.sample_slow(now)
    text = host.exporter.render()
    assert energy_series(text) == {("mnist-1", "gpu"): 8.0, ("eval-2", "gpu"): 4.0}
    job_info = parse_exposition(text)["hw_gpu_job_info"]
    assert sorted((dict(labels)["gpu"], dict(labels)["job_id"]) for labels in job_info) == [("0", "mnist-1"),
                                                                                           ("1", "eval-2")]


def test_cpu_package_energy_is_shared_by_cpu_time_and_survives_a_wrap(tmp_path):
    proc, powercap, job_dir = tmp_path / "proc", tmp_path / "powercap", tmp_path / "jobs"
    write_proc(proc, host_busy=10_000, host_idle=50_000, processes={100: 1_000, 200: 2_000})
    write_job_mapping(job_dir, JobMapping(job_id="a", pid=100, start_ticks=1100))
    write_job_mapping(job_dir, JobMapping(job_id="b", pid=200, start_ticks=1200))
    write_zone(powercap, "intel-rapl:0", "package-0", 10_000_000)
    write_zone(powercap, "intel-rapl:1", "package-1", MAX_RANGE_UJ - 2_000_000)
    write_zone(powercap, "intel-rapl:1:0", "dram", 0)               # a part of package 1: not counted again
    write_zone(powercap, "intel-rapl:2", "psys", 0)                 # the whole platform: not the packages'
    tracker = JobTracker(job_dir, proc_root=proc, descendants=lambda pid: [], clock_ticks=100)
    energy = JobEnergy()
    exporter = Exporter([EnergyCollector(energy, tracker, proc, powercap, clock_ticks=100)])

    def slow_pass(now: float) -> dict:
        tracker.update(now)
        exporter.sample_slow(now)
        return energy_series(exporter.render())

    assert slow_pass(1.0) == {("a", "cpu"): 0.0, ("b", "cpu"): 0.0}
    # 4 busy seconds on the host, 1 of them job a's and 2 job b's; package 0 used 10 J and package 1 wrapped
    # after 2 J and counted 4 J more: 16 J, of which a gets a quarter and b a half (the rest: other processes).
    write_proc(proc, host_busy=10_400, host_idle=50_600, processes={100: 1_100, 200: 2_200})
    write_zone(powercap, "intel-rapl:0", "package-0", 20_000_000)
    write_zone(powercap, "intel-rapl:1", "package-1", 4_000_000)
    write_zone(powercap, "intel-rapl:1:0", "dram", 9_000_000)
    write_zone(powercap, "intel-rapl:2", "psys", 99_000_000)
    assert slow_pass(2.0) == {("a", "cpu"): 4.0, ("b", "cpu"): 8.0}
    # Reads of the trees and /proc/stat are not atomic: a job seen using more than the host's busy time gets
    # the interval's whole energy, never more.
    write_proc(proc, host_busy=10_500, host_idle=50_700, processes={100: 1_250, 200: 2_200})
    write_zone(powercap, "intel-rapl:0", "package-0", 23_000_000)
    assert slow_pass(3.0) == {("a", "cpu"): 7.0, ("b", "cpu"): 8.0}


def test_a_job_resumed_within_an_interval_never_gives_the_others_more_than_the_intervals_energy(tmp_path):
    """A job that ended and was resumed between two slow samples counts its CPU time again from its new process: its
    step back (10 s to 1 s) was added into the jobs' sum, which the shares are divided by where the jobs read more
    than the host's busy time. Job b, seen using 1.5 s of the host's 1 busy second, got 15 J of the packages' 10 J."""
    proc, powercap, job_dir = tmp_path / "proc", tmp_path / "powercap", tmp_path / "jobs"
    write_proc(proc, host_busy=10_000, host_idle=50_000, processes={100: 1_000, 200: 2_000})
    write_job_mapping(job_dir, JobMapping(job_id="a", pid=100, start_ticks=1100))
    write_job_mapping(job_dir, JobMapping(job_id="b", pid=200, start_ticks=1200))
    write_zone(powercap, "intel-rapl:0", "package-0", 10_000_000)
    tracker = JobTracker(job_dir, proc_root=proc, descendants=lambda pid: [], clock_ticks=100)
    exporter = Exporter([EnergyCollector(JobEnergy(), tracker, proc, powercap, clock_ticks=100)])
    tracker.update(1.0)
    exporter.sample_slow(1.0)
    # Job a's process ends (a fast pass sees it gone), then the job is resumed as pid 300.
    shutil.rmtree(proc / "100")
    write_proc(proc, host_busy=10_050, host_idle=50_000, processes={200: 2_050})
    tracker.update(1.5)
    write_job_mapping(job_dir, JobMapping(job_id="a", pid=300, start_ticks=1300))
    write_proc(proc, host_busy=10_100, host_idle=50_000, processes={200: 2_150, 300: 100})
    write_zone(powercap, "intel-rapl:0", "package-0", 20_000_000)
    tracker.update(2.0)
    exporter.sample_slow(2.0)
    # b is read using more than the host's busy time (reads are not atomic): the whole 10 J, never more. The
    # resumed job's first interval takes its baseline.
    assert energy_series(exporter.render()) == {("a", "cpu"): 0.0, ("b", "cpu"): 10.0}


def test_a_package_counter_that_went_back_further_than_a_wrap_allows_is_a_reset_not_a_wrap(tmp_path):
    """A counter set back to near 0 (the package reset at a resume from suspend, a driver that starts it again)
    was taken for a wrap: 262 kJ, the whole max_energy_range_uj, added to the jobs in one second (a 262 kW
    package). A wrap steps up by at most what a package can draw in the interval; any other step down is a
    reset, which counts its new value (as a GPU counter's reset does)."""
    proc, powercap, job_dir = tmp_path / "proc", tmp_path / "powercap", tmp_path / "jobs"
    write_job_mapping(job_dir, JobMapping(job_id="a", pid=100, start_ticks=1100))
    tracker = JobTracker(job_dir, proc_root=proc, descendants=lambda pid: [], clock_ticks=100)
    exporter = Exporter([EnergyCollector(JobEnergy(), tracker, proc, powercap, clock_ticks=100)])

    def slow_pass(now: float, joules: float) -> float:
        """The package's counter reads joules; job a is all of the host's busy CPU time."""
        busy = 1_000 + int(100 * now)
        write_proc(proc, host_busy=busy, host_idle=50_000, processes={100: busy})
        write_zone(powercap, "intel-rapl:0", "package-0", round(joules * 1e6))
        tracker.update(now)
        exporter.sample_slow(now)
        return energy_series(exporter.render())[("a", "cpu")]

    assert slow_pass(1.0, 100) == 0.0
    assert slow_pass(2.0, 150) == 50.0
    assert slow_pass(3.0, 3) == 53.0                    # reset: the 3 J counted since, not 262 kJ
    assert slow_pass(4.0, 60) == 110.0
    assert slow_pass(10.0, 8_060) == 8_110.0
    # Back to more than the package can use in half a second: not the energy since a reset, a new baseline.
    assert slow_pass(10.5, 1_500) == 8_110.0
    assert slow_pass(11.0, 1_600) == 8_210.0
    # A real wrap still counts what was used on both sides of it (the counter climbed to it over 189 s).
    assert slow_pass(200.0, MAX_RANGE_UJ / 1e6 - 7) == pytest.approx(8_210 + MAX_RANGE_UJ / 1e6 - 1_607)
    climbed = 8_210 + MAX_RANGE_UJ / 1e6 - 1_607 + 12
    assert slow_pass(201.0, 5) == pytest.approx(climbed)
    # Up by more than a package can use in the interval (10 kJ in a second: 10 kW) is no energy used, a new baseline:
    # it was counted whole.
    assert slow_pass(202.0, 10_005) == pytest.approx(climbed)
    assert slow_pass(203.0, 10_105) == pytest.approx(climbed + 100)


def test_a_package_whose_max_energy_range_is_below_its_reading_never_takes_energy_off_the_others(tmp_path):
    """A zone whose max_energy_range_uj read 0 (or anything below its counter) that went back was taken for a wrap
    of max - previous + value: a negative step, added to the other packages' energy (package 0's 50 J read as 0 J).
    Its counter cannot have wrapped at such a max: the step back is a reset, which counts its new value."""
    proc, powercap, job_dir = tmp_path / "proc", tmp_path / "powercap", tmp_path / "jobs"
    write_job_mapping(job_dir, JobMapping(job_id="a", pid=100, start_ticks=1100))
    tracker = JobTracker(job_dir, proc_root=proc, descendants=lambda pid: [], clock_ticks=100)
    exporter = Exporter([EnergyCollector(JobEnergy(), tracker, proc, powercap, clock_ticks=100)])

    def slow_pass(now: float, package0_joules: int, package1_joules: int) -> float:
        """Job a is all of the host's busy CPU time; package 1 says its counter wraps at 0."""
        busy = 1_000 + int(100 * now)
        write_proc(proc, host_busy=busy, host_idle=50_000, processes={100: busy})
        write_zone(powercap, "intel-rapl:0", "package-0", package0_joules * 1_000_000)
        write_zone(powercap, "intel-rapl:1", "package-1", package1_joules * 1_000_000, max_uj=0)
        tracker.update(now)
        exporter.sample_slow(now)
        return energy_series(exporter.render())[("a", "cpu")]

    assert slow_pass(1.0, 100, 500) == 0.0
    assert slow_pass(2.0, 150, 400) == 50.0 + 400.0     # package 1 reset: its 400 J, never -100 J
    assert slow_pass(3.0, 200, 410) == 450.0 + 50 + 10


def test_a_package_read_later_in_its_pass_counts_its_whole_interval(tmp_path):
    """The slow pass's collectors run one after another: a gpu sample seconds slower than the one before delays the
    zones' read, and the interval between the two reads is longer than between the passes' starts. Bounded by the
    passes' starts, a package's real 2.5 kJ over 5 s at 500 W passed for an impossible step (over 2 kW in 1 s) and
    was dropped."""
    proc, powercap, job_dir = tmp_path / "proc", tmp_path / "powercap", tmp_path / "jobs"
    write_job_mapping(job_dir, JobMapping(job_id="a", pid=100, start_ticks=1100))
    tracker = JobTracker(job_dir, proc_root=proc, descendants=lambda pid: [], clock_ticks=100)
    read_at = [0.0]
    exporter = Exporter([EnergyCollector(JobEnergy(), tracker, proc, powercap, clock_ticks=100,
                                         clock=lambda: read_at[0])])

    def slow_pass(now: float, read: float, joules: float) -> float:
        busy = 1_000 + int(100 * read)
        write_proc(proc, host_busy=busy, host_idle=50_000, processes={100: busy})
        write_zone(powercap, "intel-rapl:0", "package-0", round(joules * 1e6))
        read_at[0] = read
        tracker.update(now)
        exporter.sample_slow(now)
        return energy_series(exporter.render())[("a", "cpu")]

    assert slow_pass(1.0, 1.0, 100) == 0.0
    assert slow_pass(2.0, 6.0, 2_600) == 2_500.0            # read 4 s into its pass: 5 s since the last read
    assert slow_pass(3.0, 6.5, 2_900) == pytest.approx(2_800.0)   # 1 s between the passes' starts bounds it


def test_cpu_energy_per_job_needs_no_jobs_collector_and_counts_a_worker_started_later(tmp_path):
    """With --no-collector.jobs nothing kept the job tracker current: no cpu series at all (the gpu collector
    off too), or, with the gpu collector's updates alone, a worker started after the mapping was never
    counted (its job's share read 0.000 of the packages' energy, truly 0.885)."""
    proc, powercap, job_dir = tmp_path / "proc", tmp_path / "powercap", tmp_path / "jobs"
    children: dict[int, list[int]] = {}
    write_job_mapping(job_dir, JobMapping(job_id="a", pid=100, start_ticks=1100))
    tracker = JobTracker(job_dir, proc_root=proc, descendants=lambda pid: children.get(pid, []), clock_ticks=100)
    exporter = Exporter([EnergyCollector(JobEnergy(), tracker, proc, powercap, clock_ticks=100)])  # alone

    def slow_pass(now: float, host_busy: int, processes: dict[int, int], package_uj: int) -> dict:
        write_proc(proc, host_busy=host_busy, host_idle=50_000, processes=processes, parents={101: 100})
        write_zone(powercap, "intel-rapl:0", "package-0", package_uj)
        exporter.sample(now)
        exporter.sample_slow(now)
        return energy_series(exporter.render())

    assert slow_pass(1.0, 10_000, {100: 1_000}, 0) == {("a", "cpu"): 0.0}
    # The job's process sleeps; the worker it started (pid 101) used 3 of the host's 4 busy seconds: 3/4 of 10 J.
    children[100] = [101]
    assert slow_pass(2.0, 10_400, {100: 1_000, 101: 300}, 10_000_000) == {("a", "cpu"): 7.5}
    # Then 4 of 5 busy seconds: 4/5 of 10 J more.
    assert slow_pass(3.0, 10_900, {100: 1_000, 101: 700}, 20_000_000) == {("a", "cpu"): 15.5}


def test_with_the_jobs_collector_on_too_the_trees_are_walked_once_a_slow_sample(tmp_path):
    proc, powercap, job_dir = tmp_path / "proc", tmp_path / "powercap", tmp_path / "jobs"
    walks = []
    write_proc(proc, host_busy=10_000, host_idle=50_000, processes={100: 1_000})
    write_zone(powercap, "intel-rapl:0", "package-0", 0)
    write_job_mapping(job_dir, JobMapping(job_id="a", pid=100, start_ticks=1100))
    tracker = JobTracker(job_dir, proc_root=proc, descendants=lambda pid: walks.append(pid) or [], clock_ticks=100)
    exporter = Exporter([JobsCollector(tracker), EnergyCollector(JobEnergy(), tracker, proc, powercap, clock_ticks=100)])
    exporter.sample(1.0)
    exporter.sample_slow(1.0)
    walks.clear()
    exporter.sample(2.0)
    exporter.sample_slow(2.0)
    assert walks == [100]


def test_a_package_that_cannot_be_read_for_a_while_leaves_the_others_counting(tmp_path):
    """One failed read of one package threw away every package's energy until a rescan a minute later, and a
    package unreadable at the first scan was never added (990 J read as 400 J and 205 J)."""
    proc, powercap, job_dir = tmp_path / "proc", tmp_path / "powercap", tmp_path / "jobs"
    write_job_mapping(job_dir, JobMapping(job_id="a", pid=100, start_ticks=1100))
    tracker = JobTracker(job_dir, proc_root=proc, descendants=lambda pid: [], clock_ticks=100)
    energy = JobEnergy()
    exporter = Exporter([EnergyCollector(energy, tracker, proc, powercap, clock_ticks=100)])
    unreadable = {"intel-rapl:1"}              # at the first scan, package 1 cannot be read (then it can)

    def second(t: int) -> float:
        """Each package adds 5 J a second; job a is all of the host's busy CPU time."""
        write_proc(proc, host_busy=10_000 + 100 * t, host_idle=50_000, processes={100: 1_000 + 100 * t})
        for zone in ("intel-rapl:0", "intel-rapl:1"):
            counter = powercap / zone / "energy_uj"
            if counter.is_dir():
                counter.rmdir()
            write_zone(powercap, zone, f"package-{zone[-1]}", 5_000_000 * t)
            if zone in unreadable:
                counter.unlink()
                counter.mkdir()                              # read() fails, as for a non-root user
        tracker.update(float(t))
        exporter.sample_slow(float(t))
        return energy_series(exporter.render())[("a", "cpu")]

    assert second(0) == 0.0
    assert second(1) == 5.0                              # package 0 alone
    unreadable.clear()
    assert second(2) == 10.0                             # package 1 is found at the next scan only
    assert second(61) == 10.0 + 59 * 5                   # found: its first reading is its baseline
    assert second(62) == 305.0 + 10
    unreadable.add("intel-rapl:0")                       # one failed read of package 0
    assert second(63) == 315.0 + 5                       # package 1 counts on
    unreadable.clear()
    assert second(64) == 320.0 + 5                       # package 0's new baseline
    assert second(65) == 325.0 + 10


def test_without_rapl_or_gpu_energy_there_are_no_energy_series_and_no_failure(tmp_path):
    unreadable = tmp_path / "powercap"
    write_zone(unreadable, "intel-rapl:0", "package-0", 1)
    (unreadable / "intel-rapl:0" / "energy_uj").unlink()
    (unreadable / "intel-rapl:0" / "energy_uj").mkdir()    # read() fails, as for a non-root user since 5.10
    gpus = two_gpus()
    for gpu in gpus:
        gpu.energy_millijoules = None
    for powercap, nvml in ((tmp_path / "missing", FakeNvml(two_gpus(), missing=True)), (unreadable, FakeNvml(gpus))):
        host = build_fixture_host(nvml=nvml, powercap_root=powercap)
        host.sample_twice()
        host.exporter.sample_slow(101.0)
        text = host.exporter.render()
        assert energy_series(text) == {}, powercap      # absent, not zero
        assert success(text)["energy"] == 1
        assert "process_cpu_time_seconds_total" in parse_exposition(text)   # the job is there


class Clock:
    """A clock the test moves: JobEnergy's monotonic clock, or its wall clock."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_job_gone_is_published_for_the_hold_then_kept_until_the_retention_ends():
    clock = Clock()
    energy = JobEnergy(clock=clock)
    energy.add("a", "gpu", 2.0)
    energy.publish()
    assert energy.published == {("a", "gpu"): 2.0}
    clock.now += HOLD_SECONDS
    energy.publish()
    assert energy.published == {("a", "gpu"): 2.0}
    clock.now += 1
    energy.publish()
    assert energy.published == {}
    energy.add("a", "gpu", 0.5)     # resumed on this host: the count carries on
    energy.publish()
    assert energy.published == {("a", "gpu"): 2.5}
    clock.now += RETENTION_SECONDS + 1
    energy.publish()
    energy.add("a", "gpu", 0.5)
    energy.publish()
    assert energy.published == {("a", "gpu"): 0.5}


def test_the_jobs_seen_longest_ago_go_first_beyond_the_limit():
    clock = Clock()
    energy = JobEnergy(clock=clock)
    for index in range(MAX_JOBS + 2):
        clock.now += 1
        energy.add(f"job-{index}", "cpu", 1.0)
    clock.now += HOLD_SECONDS + 1   # none is published any more: what is left shows when a job comes back
    energy.publish()
    for index in (0, 1, 2):
        energy.add(f"job-{index}", "cpu", 1.0)
    energy.publish()
    assert energy.published == {("job-0", "cpu"): 1.0, ("job-1", "cpu"): 1.0, ("job-2", "cpu"): 2.0}


def test_a_restarted_exporter_carries_the_counts_on_without_counting_anything_twice(tmp_path):
    state = tmp_path / "jobs.energy.json"
    powercap = tmp_path / "powercap"
    write_zone(powercap, "intel-rapl:0", "package-0", 81_234_567)
    first = build_fixture_host(powercap_root=powercap, energy=JobEnergy(state))
    gpu0 = first.nvml.gpus[0]
    first.sample_twice()
    gpu0.energy_millijoules += 2_000
    write_zone(powercap, "intel-rapl:0", "package-0", 82_234_567)
    first.exporter.sample_slow(100.5)
    before = energy_series(first.exporter.render())
    assert before == {("mnist-1", "gpu"): 2.0, ("mnist-1", "cpu"): 1.0}
    # What was published was saved first.
    saved = json.loads(state.read_text())["jobs"]["mnist-1"]
    assert (saved["gpu"], saved["cpu"]) == (2.0, 1.0)
    first.exporter.stop()

    # Energy used while no exporter runs is not counted: the new exporter's first readings are baselines.
    gpu0.energy_millijoules += 50_000
    write_zone(powercap, "intel-rapl:0", "package-0", 99_234_567)
    second = build_fixture_host(nvml=first.nvml, powercap_root=powercap, energy=JobEnergy(state))
    assert energy_series(second.sample_twice()) == before
    gpu0.energy_millijoules += 1_000
    write_zone(powercap, "intel-rapl:0", "package-0", 99_734_567)
    second.exporter.sample_slow(100.5)
    assert energy_series(second.exporter.render()) == {("mnist-1", "gpu"): 3.0, ("mnist-1", "cpu"): 1.5}


def test_a_bad_state_file_is_ignored_and_replaced(tmp_path, caplog):
    state = tmp_path / "jobs.energy.json"
    # A number past a float (OverflowError stopped the exporter at its start), infinite, NaN, or true (1.0).
    odd_numbers = [f'{{"jobs": {{"a": {{"gpu": {number}, "seen": 0}}}}}}' for number in ("1" + "0" * 400, "1e999",
                                                                                      "NaN", "true")]
    for text in ('{"jobs": {"no spaces allowed": {"gpu": 1, "seen": 0}}}', '{"jobs": {"a": {"gpu": -1, "seen": 0}}}',
                 '{"jobs": []}', "[" * 100_000, "not json", *odd_numbers):
        state.write_text(text)
        with caplog.at_level(logging.WARNING):
            energy = JobEnergy(state)
        assert "ignoring the energy state file" in caplog.text
        caplog.clear()
        energy.add("a", "cpu", 1.0)
        energy.publish()
        assert json.loads(state.read_text())["jobs"]["a"]["cpu"] == 1.0
    state.unlink()
    state.symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text('{"jobs": {"a": {"gpu": 5, "seen": 0}}}')
    energy = JobEnergy(state)
    energy.add("a", "gpu")
    energy.publish()
    assert energy.published == {("a", "gpu"): 0.0}         # a symlink is not followed


def test_a_job_last_seen_in_the_future_by_the_state_file_is_not_held_for_ever(tmp_path):
    """A state file saved before the clock was set back (or written by hand): a `seen` after now held the job's
    series published, and its account kept, for ever."""
    clock = Clock()
    state = tmp_path / "jobs.energy.json"
    state.write_text(json.dumps({"jobs": {"gone": {"gpu": 5.0, "seen": 1e15}}}))
    energy = JobEnergy(state, clock=clock)
    energy.publish()
    assert energy.published == {("gone", "gpu"): 5.0}
    clock.now += HOLD_SECONDS + 1
    energy.publish()
    assert energy.published == {}


def test_a_job_that_ended_before_the_clock_was_set_back_goes_after_the_hold():
    """The wall clock set back an hour (an NTP step) while the exporter ran, just after a job ended: its `seen`,
    then an hour ahead, held its series published for that hour and more, as a job still on the host."""
    clock, wall = Clock(), Clock(1_700_000_000.0)
    energy = JobEnergy(clock=clock, wall_clock=wall)
    energy.add("ended", "gpu", 2.0)
    energy.publish()
    wall.now -= 3600
    energy.publish()
    assert energy.published == {("ended", "gpu"): 2.0}
    clock.now += HOLD_SECONDS + 1
    wall.now += HOLD_SECONDS + 1
    energy.publish()
    assert energy.published == {}
    energy.add("ended", "gpu", 0.5)     # its account is kept: a resume carries the count on
    energy.publish()
    assert energy.published == {("ended", "gpu"): 2.5}


def test_an_ended_jobs_account_outlives_a_wall_clock_step_past_the_retention():
    """An NTP step of 40 days forward (a host whose clock was far behind), a second after a job ended: its
    account, 30 days past by the wall clock, was dropped at the next slow pass, and the job resumed here counted
    from 0. The retention runs on the monotonic clock; only a month of it drops the account."""
    clock, wall = Clock(), Clock(1_700_000_000.0)
    energy = JobEnergy(clock=clock, wall_clock=wall)
    energy.add("ended", "gpu", 1234.0)
    energy.publish()
    clock.now += 1
    wall.now += 1 + 40 * 86400
    energy.publish()
    clock.now += HOLD_SECONDS
    wall.now += HOLD_SECONDS
    energy.publish()
    assert energy.published == {}       # the hold is over: by the monotonic clock too
    energy.add("ended", "gpu", 0.5)     # resumed on this host
    energy.publish()
    assert energy.published == {("ended", "gpu"): 1234.5}
    clock.now += RETENTION_SECONDS + 1
    energy.publish()
    energy.add("ended", "gpu", 0.5)
    energy.publish()
    assert energy.published == {("ended", "gpu"): 0.5}


def test_an_ended_jobs_account_outlives_a_wall_clock_step_across_a_restart(tmp_path):
    """The state file kept each job's `seen` as a wall time: an exporter restarted after a step of 40 days forward
    (the clock corrected at boot) dropped every ended job's account. The file carries the seconds idle; the time
    since its save counts, by the wall clock, an hour at most."""
    state = tmp_path / "jobs.energy.json"
    wall = Clock(1_700_000_000.0)
    first = JobEnergy(state, clock=Clock(5_000.0), wall_clock=wall)
    first.add("ended", "gpu", 1234.0)
    first.add("ended", "cpu", 56.0)
    first.publish()
    saved = json.loads(state.read_text())["jobs"]["ended"]
    assert (saved["gpu"], saved["cpu"], saved["seen"], saved["idle"]) == (1234.0, 56.0, wall.now, 0.0)

    wall.now += 40 * 86400
    clock = Clock(20.0)                 # a new boot's monotonic clock
    second = JobEnergy(state, clock=clock, wall_clock=wall)
    second.publish()
    assert second.published == {}       # ended more than the hold ago: not published again
    second.add("ended", "gpu", 0.5)     # resumed on this host: the count carries on
    second.publish()
    assert second.published == {("ended", "gpu"): 1234.5, ("ended", "cpu"): 56.0}
    clock.now += RETENTION_SECONDS + 1
    second.publish()
    assert "ended" not in json.loads(state.read_text())["jobs"]


def test_the_state_file_is_rewritten_hourly_so_a_restart_loses_at_most_an_hour_of_retention(tmp_path):
    """Written only when an account changed, a host without jobs kept every ended job's `idle` at its save: each
    restart took the retention back to it."""
    state = tmp_path / "jobs.energy.json"
    clock, wall = Clock(), Clock(1_700_000_000.0)
    energy = JobEnergy(state, clock=clock, wall_clock=wall)
    energy.add("ended", "gpu", 1.0)
    energy.publish()
    for _ in range(3):
        clock.now += RESAVE_SECONDS / 2
        wall.now += RESAVE_SECONDS / 2
        energy.publish()
    assert json.loads(state.read_text())["jobs"]["ended"]["idle"] == RESAVE_SECONDS


def test_a_restart_counts_the_time_since_the_save_up_to_an_hour(tmp_path):
    """Jobs seen 10 s and 0 s before the save: an exporter restarted 20 s later publishes both for the rest of the
    hold, 55 s later the second alone, two hours later neither; after the wall clock went back two hours, both
    (the time between taken as none, the seconds idle at the save kept)."""
    state = tmp_path / "jobs.energy.json"
    wall = Clock(1_700_000_000.0)
    clock = Clock(100.0)
    first = JobEnergy(state, clock=clock, wall_clock=wall)
    first.add("a", "gpu", 1.0)
    first.publish()
    clock.now += 10
    wall.now += 10
    first.add("b", "gpu", 1.0)
    first.publish()
    assert json.loads(state.read_text())["jobs"]["a"]["idle"] == 10.0
    for step, published in ((20, {"a", "b"}), (HOLD_SECONDS - 5, {"b"}), (7200, set()), (-7200, {"a", "b"})):
        later = Clock(wall.now + step)
        energy = JobEnergy(state, clock=Clock(7.0), wall_clock=later)
        energy.publish()
        assert {job_id for job_id, _ in energy.published} == published, step


def test_a_running_job_keeps_its_gpu_energy_series_while_its_gpu_cannot_be_read(tmp_path):
    """No readable RAPL (an exporter not run as root) and the job's GPU lost (an XID 79) for two minutes while the
    job runs on: its gpu series went after the hold (nothing added to it), and the analytics, which read a job's
    energy in the minute before its end, found none: no GPU energy for the whole run."""
    clock = Clock()
    host = build_fixture_host(powercap_root=tmp_path / "no-powercap", energy=JobEnergy(clock=clock))
    gpu0 = host.nvml.gpus[0]
    host.sample_twice()
    gpu0.energy_millijoules += 300_000
    host.exporter.sample_slow(101.0)
    assert energy_series(host.exporter.render()) == {("mnist-1", "gpu"): 300.0}
    gpu0.lost = True
    for step in range(1, 25):
        clock.now += 5
        host.exporter.sample(101.0 + 5 * step)
        host.exporter.sample_slow(101.0 + 5 * step)
    assert energy_series(host.exporter.render()) == {("mnist-1", "gpu"): 300.0}


def ten_joules_then_sample(host, gpu, now: float) -> None:
    """The GPU uses 10 J, then the exporter samples (the fast loop and the slow one) at `now`."""
    gpu.energy_millijoules += 10_000
    host.exporter.sample(now)
    host.exporter.sample_slow(now)


def test_the_interval_a_job_joins_a_shared_gpu_counts_whole_for_those_counting_it(tmp_path):
    """docs/metrics.md: the interval in which a job starts counts whole for the jobs holding the GPU at its end;
    the newcomer's series starts at 0. The interval was split between both and the newcomer's half dropped."""
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    (job_dir / "mnist-1.rank0.json").write_text((FIXTURE_JOB_DIR / "mnist-1.rank0.json").read_text())
    host = build_fixture_host(job_dir=job_dir, powercap_root=tmp_path / "no-powercap")
    gpu0 = host.nvml.gpus[0]
    for now in (100.0, 101.0):
        ten_joules_then_sample(host, gpu0, now)
    assert energy_series(host.exporter.render()) == {("mnist-1", "gpu"): 10.0}
    write_job_mapping(job_dir, JobMapping(job_id="eval-2", pid=5100, gpus=[0], start_ticks=8))
    ten_joules_then_sample(host, gpu0, 102.0)
    assert energy_series(host.exporter.render()) == {("mnist-1", "gpu"): 20.0, ("eval-2", "gpu"): 0.0}


def test_an_unwritable_state_file_is_logged_once_and_the_counts_go_on(tmp_path, caplog):
    energy = JobEnergy(tmp_path / "missing-dir" / "jobs.energy.json")
    with caplog.at_level(logging.WARNING):
        for joules in (1.0, 2.0):
            energy.add("a", "gpu", joules)
            energy.publish()
    assert energy.published == {("a", "gpu"): 3.0}
    assert len([record for record in caplog.records if "cannot write" in record.getMessage()]) == 1


def test_a_state_file_that_could_not_be_written_is_written_at_the_next_publication(tmp_path):
    """A failed save was tried again only at the next change or an hour later: a job whose last counts were
    published while the directory was gone, and that added nothing after, had them missing from the file, and an
    exporter restarted within the hour took its counter back (a reset to Prometheus, a figure too low)."""
    directory = tmp_path / "state"
    directory.mkdir()
    state = directory / "jobs.energy.json"
    energy = JobEnergy(state)
    energy.add("a", "gpu", 5.0)
    energy.publish()
    directory.rename(tmp_path / "moved")            # gone for a moment: this save fails
    energy.add("a", "gpu", 7.0)
    energy.publish()
    directory.mkdir()                               # back; the job ended, nothing more is added
    energy.publish()
    assert energy.published == {("a", "gpu"): 12.0}
    assert JobEnergy(state)._joules == {"a": {"gpu": 12.0}}


class LateAddClock(Clock):
    """A clock that, at the read it is armed for, lets another thread's add land first when JobEnergy's lock is
    free: the watchdog's abandoned slow sample returning in the middle of a publication."""

    def __init__(self):
        super().__init__()
        self.energy: JobEnergy | None = None
        self.armed = False

    def __call__(self) -> float:
        self.now += 1.0
        read = self.now
        if self.armed and not self.energy._lock.locked():
            self.armed = False
            self.energy.add("late", "gpu", 1.0)    # seen at a later reading than the one returned here
        return read


def test_an_add_from_another_thread_during_a_publication_never_spoils_the_state_file(tmp_path):
    """publish() read its clock before taking the lock: an add landing between saw the job at a later time, the
    file held a negative `idle`, and a restarted exporter refused the whole file: every job's count from 0."""
    state = tmp_path / "jobs.energy.json"
    clock = LateAddClock()
    energy = clock.energy = JobEnergy(state, clock=clock)
    energy.add("a", "gpu", 5.0)
    energy.add("late", "gpu", 2.0)
    energy.publish()
    energy.add("a", "gpu", 5.0)
    clock.armed = True
    energy.publish()
    assert all(account["idle"] >= 0 for account in json.loads(state.read_text())["jobs"].values())
    assert JobEnergy(state)._joules["a"] == {"gpu": 10.0}


def test_an_interval_whose_process_list_failed_counts_with_the_next_not_for_the_declared_jobs_alone(tmp_path):
    """A process list that fails once (NVML_ERROR_UNKNOWN) left only the jobs declaring the GPU as its holders:
    eval-2 took the whole interval, mnist-1 (on it by its process) nothing. The GPU now keeps its reading."""
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    write_job_mapping(job_dir, JobMapping(job_id="mnist-1", pid=4242, start_ticks=200000))    # by its process
    write_job_mapping(job_dir, JobMapping(job_id="eval-2", pid=5100, gpus=[0], start_ticks=8))
    host = build_fixture_host(job_dir=job_dir, powercap_root=tmp_path / "no-powercap")
    gpu0 = host.nvml.gpus[0]
    for now in (100.0, 101.0):
        ten_joules_then_sample(host, gpu0, now)
    assert energy_series(host.exporter.render()) == {("mnist-1", "gpu"): 5.0, ("eval-2", "gpu"): 5.0}
    gpu0.errors["nvmlDeviceGetComputeRunningProcesses"] = pynvml.NVML_ERROR_UNKNOWN
    ten_joules_then_sample(host, gpu0, 102.0)
    del gpu0.errors["nvmlDeviceGetComputeRunningProcesses"]
    ten_joules_then_sample(host, gpu0, 103.0)
    assert energy_series(host.exporter.render()) == {("mnist-1", "gpu"): 15.0, ("eval-2", "gpu"): 15.0}
