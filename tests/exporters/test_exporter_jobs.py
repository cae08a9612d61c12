"""Job attribution on real processes: the mapping file, the process tree, CPU time of reaped children."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainmetrics.exporters.collectors.energy import EnergyCollector
from trainmetrics.exporters.collectors.jobs import (MAX_MAPPING_BYTES, MAX_SCAN_PAUSE, SETTLE_SECONDS, JobsCollector,
                                                   JobTracker, parse_mapping, read_mapping_file)
from trainmetrics.exporters.exporter import Exporter
from trainmetrics.exporters.job_energy import JobEnergy
from tests.exporters.exporter_fixtures import parse_exposition, write_proc, write_zone
from trainmetrics.exporters.collectors.base import stat_fields
from trainmetrics.jobmap import JobMapping, process_start_ticks, write_job_mapping

# A job process that spawns a long-lived worker (like a DataLoader worker), optionally burns CPU in
# short-lived helper processes it reaps, then waits for stdin to close.
JOB_SCRIPT = r"""
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("worker", worker.pid, flush=True)
burn = float(sys.argv[1])
if burn:
    helper = subprocess.Popen([sys.executable, "-c",
        "import time\nend = time.process_time() + %f\nwhile time.process_time() < end: pass" % burn])
    helper.wait()
    print("reaped", flush=True)
sys.stdin.read()
worker.kill()
worker.wait()
"""


def write_pid_stat(proc: Path, pid: int, parent: int, start_ticks: int, utime: int = 0, rss_pages: int = 10) -> None:
    """A planted /proc/PID/stat: its parent, its start and user time (clock ticks), its resident pages."""
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    fields = ["S", parent, pid, pid, 0, -1, 0, 0, 0, 0, 0, utime, 0, 0, 0, 20, 0, 1, 0, start_ticks, 0, rss_pages]
    (proc / str(pid) / "stat").write_text(f"{pid} (p{pid}) " + " ".join(map(str, fields)) + "\n")



@pytest.fixture
def start_job():
    """start_job(burn_seconds) -> (Popen, worker pid); every job is ended after the test."""
    jobs = []

    def start(burn: float = 0.0):
        process = subprocess.Popen([sys.executable, "-c", JOB_SCRIPT, str(burn)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        jobs.append(process)
        worker_pid = int(process.stdout.readline().split()[1])
        return process, worker_pid

    yield start
    for process in jobs:
        process.communicate(timeout=10)  # closes stdin (the job exits) and stdout


def test_job_tree_is_attributed_and_dropped_when_its_file_goes(tmp_path, start_job):
    job, worker_pid = start_job()
    tracker = JobTracker(tmp_path)
    assert tracker.update(1.0).usage == {}
    path = write_job_mapping(tmp_path, JobMapping(job_id="tree-1", pid=job.pid, gpus=[0], started=time.time()))
    snapshot = tracker.update(1.1)  # picked up within one sample
    assert snapshot.usage["tree-1"].processes == 2
    assert snapshot.job_of_pid == {job.pid: "tree-1", worker_pid: "tree-1"}
    assert snapshot.gpus == {"tree-1": frozenset({0})}
    assert snapshot.usage["tree-1"].rss_bytes > 1 << 20
    path.unlink()
    # Dropped at the next listing. Finding the tree read every process's stat: on a busy host that costs over
    # SCAN_SHARE of the next 0.1 s, which holds the next listing back (up to MAX_SCAN_PAUSE); and a removal in
    # the write's clock tick leaves the directory's mtime as it was (a listing SETTLE_SECONDS later).
    assert tracker.update(1.1 + max(MAX_SCAN_PAUSE, SETTLE_SECONDS)).usage == {}


def test_cpu_time_of_reaped_children_stays_in_the_counter(tmp_path, start_job):
    job, _ = start_job(burn=0.4)
    write_job_mapping(tmp_path, JobMapping(job_id="burner", pid=job.pid, started=time.time()))
    exporter = Exporter([JobsCollector(JobTracker(tmp_path))])
    exporter.sample(1.0)
    exporter.sample_slow(1.0)
    assert job.stdout.readline().strip() == "reaped"  # the helper burned 0.4 s of CPU and is gone
    exporter.sample(2.0)
    metrics = parse_exposition(exporter.render())
    assert metrics["process_cpu_time_seconds_total"][(("job_id", "burner"),)] >= 0.38
    assert metrics["process_tree_processes"][(("job_id", "burner"),)] == 2  # job + worker; the helper has exited


# Burns 0.3 s of CPU, then again for each line it reads, until its stdin closes.
BURNER = """
import sys, time
def burn():
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    print("burned", flush=True)
burn()
for line in sys.stdin:
    burn()
"""


@pytest.mark.parametrize("its_file", ["left behind", "removed"])
def test_a_rank_that_ends_first_keeps_its_cpu_time_in_the_jobs_counter(tmp_path, its_file):
    """Two ranks (processes of one job side by side, as torchrun starts them): rank 1 burns 0.3 s and exits,
    rank 0 burns 0.3 s more; the job's counter holds all 0.9 s (rank 1's dropped out of the sum before). Killed,
    a rank leaves its mapping file behind; ending normally, it removes it first (its time was lost then: the
    counter stayed flat while rank 0 made it up)."""
    ranks = [subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        paths = [write_job_mapping(tmp_path, JobMapping(job_id="two-ranks", pid=process.pid, rank=rank,
                                                        started=time.time())) for rank, process in enumerate(ranks)]
        tracker = JobTracker(tmp_path)
        tracker.update(1.0)
        assert [process.stdout.readline().strip() for process in ranks] == ["burned", "burned"]
        assert tracker.update(2.0).usage["two-ranks"].cpu_seconds >= 0.58
        if its_file == "removed":
            paths[1].unlink()
        ranks[1].communicate(timeout=10)             # rank 1 exits
        tracker.update(3.0 + max(MAX_SCAN_PAUSE, SETTLE_SECONDS))
        ranks[0].stdin.write("again\n")
        ranks[0].stdin.flush()
        assert ranks[0].stdout.readline().strip() == "burned"
        after = tracker.update(4.0 + max(MAX_SCAN_PAUSE, SETTLE_SECONDS)).usage["two-ranks"]
        assert after.processes == 1 and after.cpu_seconds >= 0.88
    finally:
        for process in ranks:
            if process.poll() is None:
                process.communicate(timeout=10)


def test_a_process_that_serves_a_job_then_another_counts_in_each_once(tmp_path):
    """A long-lived worker (a pool's, a Ray worker's) that ran rank 1 of job A, then rank 1 of job B, already counted
    by its rank 0: its A file went and its B file came within one listing. Taken for one file rewritten, A lost the
    worker's time (no departure) and B, carrying A's base of 0, took the worker's whole time in one sample."""
    ranks = [subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    a0, worker, b0 = ranks
    try:
        write_job_mapping(tmp_path, JobMapping(job_id="a", pid=a0.pid, rank=0))
        a1 = write_job_mapping(tmp_path, JobMapping(job_id="a", pid=worker.pid, rank=1))
        write_job_mapping(tmp_path, JobMapping(job_id="b", pid=b0.pid, rank=0))
        tracker = JobTracker(tmp_path)
        tracker.update(1.0)
        assert [process.stdout.readline().strip() for process in ranks] == ["burned"] * 3
        before = tracker.update(2.0).usage
        a1.unlink()
        write_job_mapping(tmp_path, JobMapping(job_id="b", pid=worker.pid, rank=1))
        moved = tracker.update(3.0 + max(MAX_SCAN_PAUSE, SETTLE_SECONDS)).usage
        a0.stdin.write("again\n")
        a0.stdin.flush()
        assert a0.stdout.readline().strip() == "burned"
        after = tracker.update(4.0 + max(MAX_SCAN_PAUSE, SETTLE_SECONDS)).usage
    finally:
        for process in ranks:
            process.communicate(timeout=10)
    assert moved["b"].processes == 2 and moved["b"].cpu_seconds - before["b"].cpu_seconds < 0.1, (before, moved)
    assert after["a"].cpu_seconds - before["a"].cpu_seconds >= 0.28, (before, after)      # a0's second burn


def test_stale_malformed_and_reused_pid_files_are_ignored(tmp_path, start_job):
    job, _ = start_job()
    ticks = process_start_ticks(job.pid)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_job_mapping(tmp_path, JobMapping(job_id="dead", pid=dead.pid, start_ticks=ticks))
    # The pid is alive, but its process started at another time than the mapping says: a reused pid.
    write_job_mapping(tmp_path, JobMapping(job_id="reused", pid=job.pid, start_ticks=ticks - 1))
    (tmp_path / "half-written.rank0.json").write_text('{"job_id": "x", "pid"')
    (tmp_path / "bad-id.rank0.json").write_text(json.dumps({"job_id": "no spaces allowed", "pid": job.pid,
                                                            "start_ticks": ticks}))
    (tmp_path / "no-ticks.rank0.json").write_text(json.dumps({"job_id": "no-ticks", "pid": job.pid}))
    (tmp_path / "deep.rank0.json").write_text("[" * 60_000)
    write_job_mapping(tmp_path, JobMapping(job_id="live", pid=job.pid, started=time.time()))
    assert set(JobTracker(tmp_path).update(1.0).usage) == {"live"}


def test_the_writer_records_the_start_ticks_of_the_process_it_names(tmp_path, start_job):
    job, _ = start_job()
    path = write_job_mapping(tmp_path, JobMapping(job_id="ticks", pid=job.pid))
    assert json.loads(path.read_text())["start_ticks"] == process_start_ticks(job.pid) > 0
    own = write_job_mapping(tmp_path, JobMapping(job_id="self", pid=os.getpid()))
    assert json.loads(own.read_text())["start_ticks"] == process_start_ticks("self")


def test_unreadable_job_dir_fails_the_jobs_collector_only(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    exporter = Exporter([JobsCollector(JobTracker(not_a_dir))])
    exporter.sample(1.0)
    metrics = parse_exposition(exporter.render())
    assert metrics["exporter_collector_success"] == {(("collector", "jobs"),): 0}
    assert "process_tree_processes" not in metrics


def test_a_mapping_file_is_read_without_blocking_following_links_or_reading_much(tmp_path):
    """What the tracker opens after listing may have been swapped since: the read itself refuses a FIFO (without
    waiting for a writer), a symlink and an oversized file."""
    fifo, link, big = tmp_path / "fifo.json", tmp_path / "link.json", tmp_path / "big.json"
    os.mkfifo(fifo)
    link.symlink_to("/dev/zero")
    big.write_text(json.dumps({"job_id": "big", "pid": 1, "start_ticks": 1, "pad": "x" * MAX_MAPPING_BYTES}))
    with pytest.raises(ValueError, match="not a regular file"):
        read_mapping_file(str(fifo))
    with pytest.raises(OSError):                    # ELOOP: O_NOFOLLOW
        read_mapping_file(str(link))
    with pytest.raises(ValueError, match="larger than"):
        read_mapping_file(str(big))
    good = write_job_mapping(tmp_path, JobMapping(job_id="good", pid=os.getpid()))
    assert read_mapping_file(str(good)) == (JobMapping(job_id="good", pid=os.getpid(),
                                                       start_ticks=process_start_ticks("self")), os.geteuid())


def test_a_mapping_names_its_gpus_by_host_index_or_uuid_and_by_nothing_else(tmp_path):
    """A trainer given its GPU by UUID (CUDA_VISIBLE_DEVICES=GPU-..., Kubernetes' device plugin) names it so: the
    exporter refused such a mapping whole, and the job lost its CPU, memory and energy series too."""
    uuid, mig = "GPU-8a4c1f3e-1111-2222-3333-444455556666", "MIG-1b2c3d4e-0000-1111-2222-333344445555"
    path = write_job_mapping(tmp_path, JobMapping(job_id="by-uuid", pid=os.getpid(), gpus=[3, uuid, mig]))
    assert read_mapping_file(str(path))[0].gpus == [3, uuid, mig]
    tracker = JobTracker(tmp_path, descendants=lambda pid: [])
    assert tracker.update(1.0).gpus == {"by-uuid": frozenset({3, uuid, mig})}
    for bad in ([True], ["0"], ["gpu0"], ["GPU-12"], [uuid + "\n"], [f"{mig}/1/0"], [[0]], [0.0], "0", {"0": 0}):
        with pytest.raises(ValueError, match="gpus must be"):
            parse_mapping(json.dumps({"job_id": "x", "pid": 1, "start_ticks": 1, "gpus": bad}).encode())
        with pytest.raises(ValueError, match="gpus must be"):    # the trainer never writes what is refused
            write_job_mapping(tmp_path, JobMapping(job_id="x", pid=os.getpid(), gpus=bad))


def test_a_rank_that_joins_a_job_already_counted_is_counted_from_its_first_sample(tmp_path):
    """Rank 1's mapping appeared after rank 0's was counted (its imports took longer): all the CPU time it had
    used so far came into the job's counter in one sample, a rate of several times the host's cores. Counted
    from its first sample now, as rank 0 is (its series' increase starts there); what it uses after, in full."""
    ranks = [subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        assert [process.stdout.readline().strip() for process in ranks] == ["burned", "burned"]
        write_job_mapping(tmp_path, JobMapping(job_id="late-rank", pid=ranks[0].pid, rank=0, started=time.time()))
        tracker = JobTracker(tmp_path)
        first = tracker.update(1.0).usage["late-rank"].cpu_seconds
        write_job_mapping(tmp_path, JobMapping(job_id="late-rank", pid=ranks[1].pid, rank=1, started=time.time()))
        joined = tracker.update(2.0 + max(MAX_SCAN_PAUSE, SETTLE_SECONDS)).usage["late-rank"]
        assert joined.processes == 2 and joined.cpu_seconds < first + 0.1      # not rank 1's 0.3 s and more
        ranks[1].stdin.write("again\n")
        ranks[1].stdin.flush()
        assert ranks[1].stdout.readline().strip() == "burned"
        after = tracker.update(3.0 + max(MAX_SCAN_PAUSE, SETTLE_SECONDS)).usage["late-rank"].cpu_seconds
        assert after - joined.cpu_seconds >= 0.28
    finally:
        for process in ranks:
            process.communicate(timeout=10)


# A rank that starts the job's other rank (BURNER) itself and asks it to burn 0.3 s per line of its own stdin.
SPAWNING_RANK = f"""
import subprocess, sys
rank1 = subprocess.Popen([sys.executable, "-c", {BURNER!r}], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
rank1.stdout.readline()
print(rank1.pid, flush=True)
for line in sys.stdin:
    rank1.stdin.write(line); rank1.stdin.flush()
    print(rank1.stdout.readline().strip(), flush=True)
rank1.stdin.close(); rank1.wait()
"""


def tree_cpu_seconds(*pids: int) -> float:
    """utime + stime + cutime + cstime of the given processes, from /proc."""
    return sum(sum(int(field) for field in stat_fields(Path(f"/proc/{pid}/stat").read_bytes())[11:15])
               for pid in pids) / os.sysconf("SC_CLK_TCK")


def test_a_rank_the_job_already_counted_in_another_ranks_tree_keeps_its_time_when_its_file_is_read(tmp_path):
    """Rank 0 starts rank 1, counted in rank 0's tree until rank 1's own file was read: rank 1 then joined as a new
    rank, counted from that sample, and the time the job had counted for it was taken off again, the job's counter
    held flat until its ranks had used as much again (0.3 s of rank 1's CPU after it joined never showed)."""
    rank0 = subprocess.Popen([sys.executable, "-c", SPAWNING_RANK], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        rank1_pid = int(rank0.stdout.readline())
        write_job_mapping(tmp_path, JobMapping(job_id="spawned", pid=rank0.pid, rank=0))
        sample = cpu_sampler(JobTracker(tmp_path))
        assert sample()["spawned"] == pytest.approx(tree_cpu_seconds(rank0.pid, rank1_pid), abs=0.02)
        write_job_mapping(tmp_path, JobMapping(job_id="spawned", pid=rank1_pid, rank=1))
        joined = sample()["spawned"]
        rank0.stdin.write("burn\n")
        rank0.stdin.flush()
        assert rank0.stdout.readline().strip() == "burned"
        after = sample()["spawned"]
        assert after - joined >= 0.28
        assert after == pytest.approx(tree_cpu_seconds(rank0.pid, rank1_pid), abs=0.02)
    finally:
        rank0.communicate(timeout=10)


@pytest.mark.parametrize("rank0_file", ["left behind", "removed"])
def test_a_rank_whose_spawning_rank_ended_in_the_same_pass_is_counted_once(rank0_file, tmp_path):
    """Rank 0 started rank 1 and ended in the pass that first read rank 1's own file: rank 0's time as of its last
    sample (rank 1's 20 s in it) stays the job's, and rank 1, counted by the job at that sample, kept its whole time
    too. The job's counter went from 30 s to 51 s: rank 1's 20 s twice, a rate of many cores, held for good."""
    proc, jobs = tmp_path / "proc", tmp_path / "jobs"
    jobs.mkdir()

    write_pid_stat(proc, 100, 1, 500, 1000)           # rank 0: 10 s
    write_pid_stat(proc, 101, 100, 600, 2000)         # rank 1, which rank 0 started: 20 s
    rank0 = write_job_mapping(jobs, JobMapping(job_id="spawned", pid=100, rank=0, start_ticks=500))
    tracker = JobTracker(jobs, proc_root=proc, descendants=lambda pid: [101] if pid == 100 else [], clock_ticks=100)
    assert tracker.update(0.0).usage["spawned"].cpu_seconds == 30.0
    shutil.rmtree(proc / "100")             # rank 0 ended; rank 1 goes on (1 s more) and its own file is read
    if rank0_file == "removed":
        Path(rank0).unlink()
    write_pid_stat(proc, 101, 1, 600, 2100)
    write_job_mapping(jobs, JobMapping(job_id="spawned", pid=101, rank=1, start_ticks=600))
    assert tracker.update(1.0).usage["spawned"].cpu_seconds == 31.0


def test_a_mapping_naming_a_thread_of_a_process_counts_nothing(tmp_path):
    """/proc/TID/stat of a thread holds its whole process's CPU time and memory, with a start of its own: a file naming
    a thread of a process another job counts was taken as a process of its own, and the process counted in both."""
    process = subprocess.Popen([sys.executable, "-c", "import sys, threading\nthread = threading.Thread(target="
                                "sys.stdin.read)\nthread.start()\nprint(thread.native_id, flush=True)"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        thread_id = int(process.stdout.readline())
        write_job_mapping(tmp_path, JobMapping(job_id="owner", pid=process.pid))
        write_job_mapping(tmp_path, JobMapping(job_id="by-thread", pid=thread_id))
        assert set(JobTracker(tmp_path).update(1.0).usage) == {"owner"}
    finally:
        process.communicate(timeout=10)


@pytest.mark.parametrize("status", ["Name:\tp100\nTgid:\t?\n", "Name:\tp100\nTgid:\t100"],
                         ids=["not a number", "no end of line"])
def test_a_status_file_whose_tgid_cannot_be_read_fails_no_listing(status, tmp_path):
    """A /proc/PID/status whose Tgid line was no number, or had no end of line, raised ValueError out of the
    listing: every update failed, and no job was counted."""
    proc, jobs = tmp_path / "proc", tmp_path / "jobs"
    (proc / "100").mkdir(parents=True)
    fields = ["S", 1, 100, 100, 0, -1, 0, 0, 0, 0, 0, 1000, 0, 0, 0, 20, 0, 1, 0, 500, 0, 10]
    (proc / "100" / "stat").write_text("100 (p100) " + " ".join(map(str, fields)) + "\n")
    (proc / "100" / "status").write_text(status)
    write_job_mapping(jobs, JobMapping(job_id="job", pid=100, start_ticks=500))
    tracker = JobTracker(jobs, proc_root=proc, descendants=lambda pid: [], clock_ticks=100)
    assert tracker.update(0.0).usage["job"].cpu_seconds == 10.0


def test_a_mapping_file_rewritten_for_the_same_process_is_no_departure(tmp_path):
    """Its new tree counts the process from its start: keeping the old tree's time too would count it twice."""
    process = subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        mapping = JobMapping(job_id="rewritten", pid=process.pid, started=time.time())
        write_job_mapping(tmp_path, mapping)
        tracker = JobTracker(tmp_path)
        tracker.update(1.0)
        assert process.stdout.readline().strip() == "burned"
        before = tracker.update(2.0).usage["rewritten"].cpu_seconds
        time.sleep(0.02)
        write_job_mapping(tmp_path, JobMapping(job_id="rewritten", pid=process.pid, gpus=[1], started=time.time()))
        after = tracker.update(3.0 + max(MAX_SCAN_PAUSE, SETTLE_SECONDS))
        assert after.gpus["rewritten"] == frozenset({1})            # the new file was read
        assert before >= 0.28 and after.usage["rewritten"].cpu_seconds < before + 0.2
        # What the process uses after the rewrite counts: its new tree is no rank that joined late.
        process.stdin.write("again\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "burned"
        again = tracker.update(4.0 + max(MAX_SCAN_PAUSE, SETTLE_SECONDS)).usage["rewritten"].cpu_seconds
        assert again - after.usage["rewritten"].cpu_seconds >= 0.28
    finally:
        process.communicate(timeout=10)


def test_one_pass_over_several_jobs_reads_the_hosts_processes_once(tmp_path, start_job, monkeypatch):
    """The tree walk asked psutil for each mapped process's children, and each ask read every process on the
    host: a pass cost mapped processes x host processes. One reading of /proc serves a pass now, the trees as
    before."""
    from trainmetrics.exporters.collectors import jobs as jobs_module

    jobs = [start_job() for _ in range(3)]
    for index, (job, _) in enumerate(jobs):
        write_job_mapping(tmp_path, JobMapping(job_id=f"family-{index}", pid=job.pid, started=time.time()))
    readings = []
    real_scandir = jobs_module.os.scandir
    monkeypatch.setattr(jobs_module.os, "scandir", lambda path=".": (readings.append(1) if str(path) == "/proc" else None)
                        or real_scandir(path))
    tracker = JobTracker(tmp_path)
    snapshot = tracker.update(1.0)
    assert {job_id: usage.processes for job_id, usage in snapshot.usage.items()} == \
        {f"family-{index}": 2 for index in range(3)}                    # each job and its worker
    assert {pid: job_id for pid, job_id in snapshot.job_of_pid.items()} == \
        {**{job.pid: f"family-{i}" for i, (job, _) in enumerate(jobs)},
         **{worker: f"family-{i}" for i, (_, worker) in enumerate(jobs)}}
    readings.clear()
    time.sleep(jobs_module.PARENTS_MAX_AGE + 0.05)
    tracker.refresh_trees(2.0)
    assert len(readings) == 1


@pytest.mark.parametrize("planted", [
    {"job_id": "evil", "pid": 1, "start_ticks": 1, "started": 10**400},     # float(): OverflowError
    {"job_id": "evil", "pid": 10**4200, "start_ticks": 1},                  # its /proc path: ENAMETOOLONG
], ids=["started-past-float", "pid-past-any-path"])
def test_a_number_no_mapping_can_hold_is_that_files_fault_only(planted, tmp_path):
    """JSON's numbers have no end: such a file failed the whole listing (not one file), on every sample, so the
    jobs collector and the gpu and energy collectors that use its attribution all reported success 0, and
    every job's series went."""
    from tests.exporters.exporter_fixtures import FIXTURE_JOB_DIR, build_fixture_host

    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    for mapping in FIXTURE_JOB_DIR.iterdir():
        (job_dir / mapping.name).write_bytes(mapping.read_bytes())
    (job_dir / "evil.rank0.json").write_text(json.dumps(planted))
    with pytest.raises(ValueError):
        parse_mapping(json.dumps(planted).encode())
    metrics = parse_exposition(build_fixture_host(job_dir=job_dir).sample_twice())
    success = {labels[0][1]: value for labels, value in metrics["exporter_collector_success"].items()}
    assert success["jobs"] == success["gpu"] == success["energy"] == 1
    jobs = {dict(labels)["job_id"] for labels in metrics["process_cpu_time_seconds_total"]}
    assert "mnist-1" in jobs and "evil" not in jobs


# Burns 1 s of CPU at its first line, says so, and ends at its second (or at the end of its stdin).
BURNING_TRIAL = ("import sys, time\nsys.stdin.readline()\nend = time.process_time() + 1.0\n"
                 "while time.process_time() < end: pass\nprint('burnt', flush=True)\nsys.stdin.readline()")
# The same, its CPU time burnt by a worker it started (a DataLoader's persistent worker, a compile worker), alive
# until the trial ends, which stops and reaps it.
WORKER_TRIAL = f"""
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", {BURNING_TRIAL!r}], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
sys.stdin.readline()
worker.stdin.write("go\\n"); worker.stdin.flush()
print(worker.stdout.readline().strip(), flush=True)
sys.stdin.readline()
worker.stdin.close(); worker.wait()
"""
# Runs the trial given as its argument.
NESTED_DRIVER = r"""
import subprocess, sys
trial = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
print(trial.pid, flush=True)
sys.stdin.readline()
trial.stdin.write("go\n"); trial.stdin.flush()
print(trial.stdout.readline().strip(), flush=True)
sys.stdin.readline()
trial.stdin.write("end\n"); trial.stdin.flush()
trial.wait()
print("reaped", flush=True)
sys.stdin.readline()
"""


def tell(driver: subprocess.Popen, line: str, answer: str) -> None:
    """Send a driver its next line and read that it answered `answer`."""
    driver.stdin.write(line + "\n")
    driver.stdin.flush()
    assert driver.stdout.readline().strip() == answer


def burn_and_reap(driver: subprocess.Popen, sample, remove_first: Path | None) -> tuple:
    """NESTED_DRIVER's child burns 1 s of CPU, `remove_first` goes (as a JobMetrics removes its file at its
    end) when given, then the driver reaps the child: the samples before, after the burn, and after the reap."""
    before = sample()
    tell(driver, "go", "burnt")
    burnt = sample()
    if remove_first is not None:
        remove_first.unlink()
        sample()
    tell(driver, "end", "reaped")
    return before, burnt, [sample() for _ in range(3)][-1]


def cpu_sampler(tracker: JobTracker):
    """sample(): the tracker's trees refreshed and measured 0.1 s after the last time, each job's CPU seconds."""
    clock = [0.0]

    def sample() -> dict[str, float]:
        clock[0] += 0.1
        tracker.refresh_trees(clock[0])
        return {job_id: usage.cpu_seconds for job_id, usage in tracker.update(clock[0]).usage.items()}

    return sample


def start_driver(trial: str = BURNING_TRIAL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", NESTED_DRIVER, trial], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def stop_driver(driver: subprocess.Popen) -> None:
    driver.stdin.close()
    driver.kill()
    driver.wait()
    driver.stdout.close()


@pytest.mark.parametrize("outer_id,inner_id,file_removed_first", [("sweep", "trial", False), ("x2", "x1", True)])
def test_a_job_run_by_another_job_counts_in_its_own_job_only(outer_id, inner_id, file_removed_first, tmp_path):
    """A sweep driver that runs its trials as jobs: depending on the directory's order, the trial's process counted
    in the driver's job (the trial's had no series), or in the trial's and then again in the driver's, once the
    driver reaped it (its time in the driver's cutime) or once the trial's file went as it ended: a 1 s trial
    added ~1 s to the driver's job within one sample."""
    driver = start_driver()
    try:
        trial_pid = int(driver.stdout.readline())
        write_job_mapping(tmp_path, JobMapping(job_id=outer_id, pid=driver.pid, start_ticks=process_start_ticks(
            driver.pid)))
        inner_file = write_job_mapping(tmp_path, JobMapping(job_id=inner_id, pid=trial_pid,
                                                            start_ticks=process_start_ticks(trial_pid)))
        tracker = JobTracker(tmp_path)
        sample = cpu_sampler(tracker)

        # (the trial's JobMetrics removes its file, then the process ends)
        before, burnt, after = burn_and_reap(driver, sample, inner_file if file_removed_first else None)
    finally:
        stop_driver(driver)
    assert set(before) == {outer_id, inner_id} and burnt[inner_id] >= 0.9
    assert after[outer_id] - before[outer_id] < 0.3, (before, burnt, after)       # the driver itself did little



@pytest.mark.parametrize("file_removed_first", [False, True])
def test_a_rank_started_by_another_rank_of_its_job_counts_once_when_it_ends(file_removed_first, tmp_path):
    """Rank 0 spawns rank 1 (one job id): rank 1's 1 s of CPU stayed in the job as the time of a rank that ended,
    and came back in rank 0's cutime once rank 0 reaped it (or directly, once its file went): 2 s in the counter."""
    driver = start_driver()
    try:
        rank1_pid = int(driver.stdout.readline())
        write_job_mapping(tmp_path, JobMapping(job_id="ddp", pid=driver.pid, rank=0))
        rank1_file = write_job_mapping(tmp_path, JobMapping(job_id="ddp", pid=rank1_pid, rank=1))
        tracker = JobTracker(tmp_path)
        now = 0.0

        def sample() -> float:
            nonlocal now
            now += 0.1
            tracker.refresh_trees(now)
            return tracker.update(now).usage["ddp"].cpu_seconds

        before, burnt, after = burn_and_reap(driver, sample, rank1_file if file_removed_first else None)
    finally:
        stop_driver(driver)
    assert burnt - before >= 0.9
    assert after - burnt < 0.3, (before, burnt, after)      # rank 0 itself did little


@pytest.mark.parametrize("file_removed_first", [False, True])
@pytest.mark.parametrize("kind", ["nested job", "rank"])
def test_the_time_of_an_inner_jobs_live_workers_counts_once_when_it_ends(kind, file_removed_first, tmp_path):
    """The two tests above with the trial's (rank 1's) second burnt by a worker of its own, alive until the trial
    ends (a persistent DataLoader worker): only the trial's own time was taken off the driver's job, which then
    counted the worker's again, directly once the trial's file went, or in the trial's time once the trial reaped
    it and ended within one sample: the sweep driver's job (or the ranks' job, a second time) grew by ~1 s."""
    driver = start_driver(WORKER_TRIAL)
    outer, inner = ("sweep", "trial") if kind == "nested job" else ("ddp", "ddp")
    try:
        trial_pid = int(driver.stdout.readline())
        write_job_mapping(tmp_path, JobMapping(job_id=outer, pid=driver.pid))
        inner_file = write_job_mapping(tmp_path, JobMapping(job_id=inner, pid=trial_pid, rank=int(kind == "rank")))
        tracker = JobTracker(tmp_path)
        sample = cpu_sampler(tracker)

        before, burnt, after = burn_and_reap(driver, sample, inner_file if file_removed_first else None)
    finally:
        stop_driver(driver)
    assert burnt[inner] - before[inner] >= 0.9
    assert after[outer] - burnt[outer] < 0.3, (before, burnt, after)     # the driver itself did little


def test_a_pid_reused_since_the_walks_parents_reading_is_not_the_jobs(tmp_path):
    """The tree walk reads every process's parent once per pass (up to PARENTS_MAX_AGE old): a worker that
    exited in between and whose pid another user's process took was counted in the job, the stranger's
    memory and CPU time with it."""
    from trainmetrics.exporters.collectors.jobs import ProcessFamilies

    proc, jobs = tmp_path / "proc", tmp_path / "jobs"
    proc.mkdir()
    jobs.mkdir()

    write_pid_stat(proc, 1, 0, 1, rss_pages=100)
    write_pid_stat(proc, 100, 1, 500, rss_pages=1000)           # the job's process
    write_pid_stat(proc, 101, 100, 600, rss_pages=1000)         # its worker
    write_job_mapping(jobs, JobMapping(job_id="job-a", pid=100, start_ticks=500))
    clock = [0.0]
    tracker = JobTracker(jobs, proc_root=proc, descendants=ProcessFamilies(str(proc), clock=lambda: clock[0]),
                         clock_ticks=100, page_bytes=4096)
    assert tracker.update(0.0).usage["job-a"].processes == 2
    write_pid_stat(proc, 101, 1, 900, rss_pages=10_000_000)  # the worker gone, its pid a later process's
    clock[0] = 0.3
    tracker.refresh_trees(0.3)              # the walk from the parents read 0.3 s ago
    usage = tracker.update(0.4).usage["job-a"]
    assert 101 not in tracker.snapshot.job_of_pid and usage.rss_bytes == 1000 * 4096


class Listing:
    """What os.scandir returns (a context manager and an iterator), over entries in a set order."""

    def __init__(self, entries: list):
        self.entries = entries

    def __enter__(self):
        return iter(self.entries)

    def __exit__(self, *exc_info) -> None:
        return None

    def __iter__(self):
        return iter(self.entries)


@pytest.mark.parametrize("listed_first", ["the ended rank's file", "the new job's file"])
def test_a_ranks_pid_taken_by_another_jobs_root_ends_the_rank(listed_first, tmp_path, monkeypatch):
    """Rank 1 of job a was killed (its file left behind) and job b's process took its pid. A process in two trees
    counts once, so a tree listed after b's skipped the pid as counted without checking it was its own process:
    the rank never ended, job a lost its 20 s (the counter stayed flat until rank 0 made them up), and its tree
    went on walking b's processes."""
    real_scandir, reverse = os.scandir, listed_first == "the new job's file"     # a.rank1.json < b.rank0.json

    def scandir_in_order(path):
        with real_scandir(path) as entries:
            return Listing(sorted(entries, key=lambda entry: entry.name, reverse=reverse))

    monkeypatch.setattr(os, "scandir", scandir_in_order)
    proc, jobs = tmp_path / "proc", tmp_path / "jobs"
    jobs.mkdir()

    write_pid_stat(proc, 100, 1, 500, 1000)      # job a's rank 0: 10 s
    write_pid_stat(proc, 101, 1, 600, 2000)      # job a's rank 1: 20 s
    write_job_mapping(jobs, JobMapping(job_id="a", pid=100, rank=0, start_ticks=500))
    write_job_mapping(jobs, JobMapping(job_id="a", pid=101, rank=1, start_ticks=600))
    tracker = JobTracker(jobs, proc_root=proc, descendants=lambda pid: [], clock_ticks=100)
    assert tracker.update(0.0).usage["a"].cpu_seconds == 30.0
    write_pid_stat(proc, 101, 1, 900, 500)       # rank 1 killed; job b's process, 5 s in, has its pid
    write_pid_stat(proc, 100, 1, 500, 1100)      # rank 0 used 1 s more
    write_job_mapping(jobs, JobMapping(job_id="b", pid=101, start_ticks=900))
    tracker.refresh_trees(20.0)
    usage = tracker.update(20.0).usage
    assert (usage["a"].cpu_seconds, usage["a"].processes) == (31.0, 1)
    assert (usage["b"].cpu_seconds, usage["b"].processes) == (5.0, 1)
    assert [(tree.mapping.job_id, tree.mapping.pid) for tree in tracker._live] in (
        [("a", 100), ("b", 101)], [("b", 101), ("a", 100)])


@pytest.fixture
def out_of_fds(monkeypatch):
    """A set of paths whose reads by the job tracker fail with EMFILE (out of file descriptors) while listed."""
    from trainmetrics.exporters.collectors import jobs

    failing: set[str] = set()

    def failing_too(read):
        def read_or_fail(path):
            if str(path) in failing:
                raise OSError(errno.EMFILE, "Too many open files", str(path))
            return read(path)
        return read_or_fail

    monkeypatch.setattr(jobs, "read_bytes", failing_too(jobs.read_bytes))                  # /proc/PID/stat
    monkeypatch.setattr(jobs, "read_mapping_file", failing_too(jobs.read_mapping_file))    # the job's mapping
    return failing


class NodeOfOneJob:
    """A fake /proc and RAPL package, the jobs and energy collectors over them; the job's ranks are pids 100, 101,
    102... (started at tick 1000 + pid)."""

    def __init__(self, tmp_path: Path):
        self.proc, self.powercap, self.job_dir = tmp_path / "proc", tmp_path / "powercap", tmp_path / "jobs"
        self.tracker = JobTracker(self.job_dir, proc_root=self.proc, descendants=lambda pid: [], clock_ticks=100)
        energy = EnergyCollector(JobEnergy(), self.tracker, self.proc, self.powercap, clock_ticks=100)
        self.exporter = Exporter([JobsCollector(self.tracker), energy])

    def map_rank(self, pid: int) -> Path:
        return write_job_mapping(self.job_dir, JobMapping(job_id="a", pid=pid, rank=pid - 100, start_ticks=1000 + pid))

    def sample(self, now: float, host_busy: int, utime: dict[int, int], package_uj: int) -> dict:
        """A fast and a slow sample of this state: the jobs collector's success, job a's CPU seconds, processes
        and CPU energy (None: no series)."""
        write_proc(self.proc, host_busy=host_busy, host_idle=50_000, processes=utime)
        write_zone(self.powercap, "intel-rapl:0", "package-0", package_uj)
        self.exporter.sample(now)
        self.exporter.sample_slow(now)
        metrics = parse_exposition(self.exporter.render())
        job = (("job_id", "a"),)
        return {"success": metrics["exporter_collector_success"][(("collector", "jobs"),)],
                "cpu": metrics.get("process_cpu_time_seconds_total", {}).get(job),
                "processes": metrics.get("process_tree_processes", {}).get(job),
                "energy": metrics.get("process_energy_joules_total", {}).get((("job_id", "a"), ("source", "cpu")))}


@pytest.mark.parametrize("unreadable", ["mapping file", "process stat"])
def test_a_new_mapping_read_while_out_of_fds_is_read_again(tmp_path, out_of_fds, unreadable):
    """Reading a new mapping file, or its process's /proc/PID/stat, failed with EMFILE: the file was cached as
    refused, or as stale (its process taken for gone), and kept so while unchanged: the job was never counted.
    The error says nothing of the file or the process: the file is read again at the next sample."""
    node = NodeOfOneJob(tmp_path)
    path = node.map_rank(100)
    out_of_fds.add(str(path) if unreadable == "mapping file" else f"{node.proc}/100/stat")
    failed = node.sample(1.0, 10_000, {100: 1_000}, 0)
    assert failed["success"] == 0 and failed["cpu"] is None
    out_of_fds.clear()
    assert node.sample(2.0, 10_000, {100: 1_000}, 0) == {"success": 1, "cpu": 10.0, "processes": 1, "energy": 0.0}
    # 1 of the host's 4 busy seconds: a quarter of the package's 10 J.
    assert node.sample(3.0, 10_400, {100: 1_100}, 10_000_000) == {"success": 1, "cpu": 11.0, "processes": 1,
                                                                    "energy": 2.5}


def test_a_job_counted_while_out_of_fds_is_counted_again_exactly(tmp_path, out_of_fds):
    """A read of a live rank's /proc/PID/stat failed with EMFILE: the rank was taken for ended, for good (its job
    counted without it, or the job's series ended with its one rank). The sample fails instead, and leaves the
    tracker as it was: the rank that ended in the meantime (its file removed) keeps its time, once."""
    node = NodeOfOneJob(tmp_path)
    for pid in (100, 101, 102):
        node.map_rank(pid)
    assert node.sample(1.0, 10_000, {100: 1_000, 101: 2_000, 102: 3_000}, 0)["cpu"] == 60.0
    # 3 of the host's 4 busy seconds: 3/4 of 16 J.
    assert node.sample(2.0, 10_400, {100: 1_100, 101: 2_100, 102: 3_100}, 16_000_000) == {
        "success": 1, "cpu": 63.0, "processes": 3, "energy": 12.0}
    (node.job_dir / JobMapping(job_id="a", pid=102, rank=2).file_name()).unlink()      # rank 2 ended (31 s)
    shutil.rmtree(node.proc / "102")
    out_of_fds.add(f"{node.proc}/101/stat")
    failed = node.sample(3.0, 10_800, {100: 1_200, 101: 2_100}, 24_000_000)
    assert failed == {"success": 0, "cpu": None, "processes": None, "energy": 12.0}  # no series while it fails
    out_of_fds.clear()
    # Ranks 0 and 1 used 3 s since the last sample counted: nothing lost, nothing counted twice. The energy
    # collector shares them out with this interval's 8 J (4 busy seconds) as it shared the failed sample's
    # without them: 6 J, here what each interval's own share would have been (2 J + 4 J).
    assert node.sample(4.0, 11_200, {100: 1_300, 101: 2_200}, 32_000_000) == {
        "success": 1, "cpu": 13.0 + 22.0 + 31.0, "processes": 2, "energy": 18.0}


@pytest.mark.parametrize("kind", ["nested job", "rank"])
def test_a_nested_root_reaped_between_its_reading_and_its_reapers_counts_once(kind, tmp_path):
    """Inner trees are read first (the innermost job claims a process): a trial reaped by its driver after the
    trial's reading and before the driver's was counted twice in that pass, in its job and in the driver's cutime,
    and the driver job's counter floor held the extra second for good (until the driver's own time caught up)."""
    driver = start_driver()
    outer, inner = ("sweep", "trial") if kind == "nested job" else ("ddp", "ddp")
    try:
        trial_pid = int(driver.stdout.readline())
        write_job_mapping(tmp_path, JobMapping(job_id=outer, pid=driver.pid))
        write_job_mapping(tmp_path, JobMapping(job_id=inner, pid=trial_pid, rank=int(kind == "rank")))
        tracker = JobTracker(tmp_path)
        sample = cpu_sampler(tracker)

        before = sample()
        tell(driver, "go", "burnt")
        burnt = sample()
        read_stat, measure, racing, measuring = tracker._read_stat, tracker._measure, [True], [False]

        def measured():
            measuring[0] = True
            try:
                return measure()
            finally:
                measuring[0] = False

        def reaped_after_its_reading(pid: int):
            fields = read_stat(pid)
            if racing[0] and measuring[0] and pid == trial_pid:     # its reading: its driver reaps it now
                racing[0] = False
                tell(driver, "end", "reaped")
            return fields

        tracker._read_stat, tracker._measure = reaped_after_its_reading, measured
        after = [sample() for _ in range(3)][-1]
    finally:
        stop_driver(driver)
    assert not racing[0] and burnt[inner] - before[inner] >= 0.9
    assert after[outer] - burnt[outer] < 0.3, (before, burnt, after)     # the driver itself did little


# Waits for a line, then runs a trial through a shell that outlives it (`sh -c "trial; true"`), as a sweep driver
# that starts each trial by a command line does, and says when it has reaped the shell.
SHELL_DRIVER = r"""
import shlex, subprocess, sys
sys.stdin.readline()
subprocess.run(["sh", "-c", shlex.join([sys.executable, "-c", sys.argv[1]]) + "; true"])
print("reaped", flush=True)
sys.stdin.readline()
"""
# A trial that maps itself as a job (as its JobMetrics does), then burns 1 s of CPU when told to and ends.
SELF_MAPPING_TRIAL = """
import os, sys
from pathlib import Path
from trainmetrics.jobmap import JobMapping, write_job_mapping
write_job_mapping(Path(sys.argv[1]), JobMapping(job_id="trial", pid=os.getpid()))
print("mapped", flush=True)
""" + BURNING_TRIAL


def test_a_short_job_run_through_a_shell_by_another_job_counts_in_its_own_job_only(tmp_path):
    """A trial run by a sweep's driver through a shell, that began and ended between two walks of the driver's
    tree: its root's parent (the shell) was in no job's tree yet, so the trial was not seen as nested, and once the
    shell had reaped it and the driver the shell, its 1 s came back in the driver's job (in its cutime)."""
    trial = SELF_MAPPING_TRIAL.replace("sys.argv[1]", repr(str(tmp_path)))
    driver = subprocess.Popen([sys.executable, "-c", SHELL_DRIVER, trial], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        write_job_mapping(tmp_path, JobMapping(job_id="sweep", pid=driver.pid))
        tracker = JobTracker(tmp_path)
        tracker.refresh_trees(0.1)          # the last walk before the shell starts
        before = tracker.update(0.1).usage["sweep"].cpu_seconds
        for line, now in (("go", 0.2), ("go", 0.3)):        # start the trial (through the shell), then its burn
            driver.stdin.write(line + "\n")
            driver.stdin.flush()
            assert driver.stdout.readline().strip() in ("mapped", "burnt")
            tracker.update(now)
        burnt = tracker.snapshot.usage["trial"].cpu_seconds
        tell(driver, "end", "reaped")
        for now in (0.4, 0.5, 0.6):
            tracker.refresh_trees(now)
            after = tracker.update(now).usage["sweep"].cpu_seconds
    finally:
        stop_driver(driver)
    assert burnt >= 0.9
    assert after - before < 0.3, (before, burnt, after)        # the driver itself did little


# Runs the trial given as its argument through a launcher of its own (a shell, torchrun), then waits; the trial says
# its pid and shares the driver's stdin and stdout.
LAUNCHING_DRIVER = r"""
import subprocess, sys, time
launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
                             sys.executable, "-c", "import os; print(os.getpid(), flush=True)\n" + sys.argv[1]])
launcher.wait()
time.sleep(600)
"""


def parent_of(pid: int) -> int:
    return int(stat_fields(Path(f"/proc/{pid}/stat").read_bytes())[1])


def test_a_trial_orphaned_by_its_launcher_is_not_counted_again_in_the_job_that_ran_it(tmp_path):
    """A sweep driver's trial whose launcher died (a shell killed by the driver's cancel, which the trial outlives to
    end cleanly): until the next walk of the driver's tree the trial was still one of its members, so once its file
    went as it ended (its JobMetrics removes it first), the driver's job counted the trial's whole time, for good
    (its counter floor), and took nothing off (the trial's parent was no longer the driver's)."""
    driver = subprocess.Popen([sys.executable, "-c", LAUNCHING_DRIVER, BURNING_TRIAL], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        trial_pid = int(driver.stdout.readline())
        launcher_pid = parent_of(trial_pid)
        write_job_mapping(tmp_path, JobMapping(job_id="sweep", pid=driver.pid))
        trial_file = write_job_mapping(tmp_path, JobMapping(job_id="trial", pid=trial_pid))
        tracker = JobTracker(tmp_path)
        sample = cpu_sampler(tracker)
        before = sample()
        tell(driver, "go", "burnt")
        burnt = sample()                    # the last walk of the trees: the trial is in the driver's tree
        os.kill(launcher_pid, signal.SIGKILL)
        while parent_of(trial_pid) == launcher_pid:
            time.sleep(0.01)
        trial_file.unlink()
        after = {job_id: usage.cpu_seconds for job_id, usage in tracker.update(10.0).usage.items()}  # no walk
    finally:
        stop_driver(driver)
    assert burnt["trial"] - before["trial"] >= 0.9
    assert set(after) == {"sweep"} and after["sweep"] - burnt["sweep"] < 0.3, (before, burnt, after)


def test_files_naming_a_process_already_named_cost_nothing_per_sample_and_move_nothing(tmp_path, monkeypatch):
    """Any user who can write to the job dir may name a process of their own in as many files as they like: each
    file was a live tree, read and walked on every fast sample (10,000 of them took 25 ms of each 100 ms sample,
    a quarter of a core; 100,000, more than the interval), and whichever the listing gave first took the process,
    and its time, from the job that counted it. One tree per process now: the one already counting it."""
    from trainmetrics.exporters.collectors import jobs as jobs_module

    proc, jobs = tmp_path / "proc", tmp_path / "jobs"
    jobs.mkdir()

    write_pid_stat(proc, 100, 1, 500, 1000)           # the job's process: 10 s
    write_pid_stat(proc, 101, 100, 600, 200)          # its worker: 2 s
    write_job_mapping(jobs, JobMapping(job_id="real", pid=100, start_ticks=500))
    tracker = JobTracker(jobs, proc_root=proc, descendants=lambda pid: [101] if pid == 100 else [],
                         clock_ticks=100)
    assert tracker.update(0.0).usage["real"].cpu_seconds == 12.0
    for index in range(300):                # names before and after "real" in any listing order
        for job_id in (f"a{index}", f"z{index}"):
            write_job_mapping(jobs, JobMapping(job_id=job_id, pid=100, start_ticks=500))
    stat_reads = []
    real_read_bytes = jobs_module.read_bytes
    monkeypatch.setattr(jobs_module, "read_bytes", lambda path: stat_reads.append(path) or real_read_bytes(path))
    tracker.update(20.0)                    # lists the directory: reads the new files once
    tracker.refresh_trees(20.0)
    stat_reads.clear()
    usage = tracker.update(21.0).usage      # a fast sample
    assert list(usage) == ["real"] and usage["real"].cpu_seconds == 12.0
    assert sorted(stat_reads) == [f"{proc}/100/stat", f"{proc}/101/stat"]
