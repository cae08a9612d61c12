"""The entrypoint of a Ray job run by the Ray executor: one Ray actor per rank, placed by Ray (spread over the
cluster's nodes), each running `trainmetrics train` with torch.distributed's rendezvous variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and serving its /metrics on its node's address.

It watches the job's control file and turns "paused"/"cancelled" into SIGUSR1/SIGTERM for every rank, and its
stacks request file into SIGUSR2 for every rank; a SIGTERM to itself (Ray's stop; SIGINT where the cluster sets
RAY_JOB_STOP_SIGNAL=SIGINT) becomes a cancel. Each rank
asks Ray for one CPU, and one GPU when the job may use one (gpus_per_rank). A stop that comes while Ray cannot
place the ranks yet (a busy cluster, or more ranks than it has CPUs or GPUs) ends the run at once. The ranks
still running LOST_RANK_GRACE_SECONDS after a rank's actor died (its node lost), or after a rank failed, are
killed. It exits with
rank 0's exit code, or dies of the signal that killed rank 0 (the job's outcome is in the result file rank 0
writes).

    python -m trainmetrics.jobserver.ray_launch --nproc N --job-dir DIR -- TRAIN_ARGS...
"""

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from trainmetrics.contract import (RESULT_PUBLISHED, RESULT_STARTED, SPAWN_BLOCKED_SIGNALS, STACKS_SIGNAL,
                                  STOP_SIGNALS, ExitCode, exit_code_for)
from trainmetrics.jobfiles import (LOG_NAME, PLACEMENT_WAIT_NAME, RESULT_FILE_NAME, STACKS_REQUEST_NAME,
                                   control_request, read_small_text, replace_atomically, write_result)

CONTROL_POLL_SECONDS = 0.2
# prctl(2): the signal a process gets when the thread that started it ends (Linux).
PR_SET_PDEATHSIG = 1
# A placement Ray has not made this long is said in the job's log (once), with what the cluster has.
PLACEMENT_SAY_SECONDS = 10.0
# The ranks still running this long after a rank's Ray actor died are killed: a rank lost with its node (power,
# network) closed no connection, and its peers waited in their collective for gloo's timeout, 30 minutes. Not at
# once: a peer whose connection did close fails by itself within it, with its own error and result. And after a
# rank failed: one that failed before it joined the others (its node without the job's data) left them waiting
# in the rendezvous for its timeout, 30 minutes, where torchrun stops a job's workers when one fails.
LOST_RANK_GRACE_SECONDS = 10.0
# The signals Ray's stop of a submission sends its entrypoint: SIGTERM, or SIGINT where the cluster sets
# RAY_JOB_STOP_SIGNAL=SIGINT (Ray's job supervisor then unblocks it for the entrypoint). Unhandled, SIGINT was a
# KeyboardInterrupt: the launcher died with a traceback, its ranks killed with their actors, without a checkpoint.
RAY_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@ray.remote(num_cpus=1, max_concurrency=4)
class Rank:
    """One rank's `trainmetrics train` process, on whichever node Ray placed this actor."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        # Signals that came before `run` started the process (the launcher passes each stop on once): sent to it
        # as it starts, where they wait, blocked, for its handlers. Dropped, a pause or cancel right after Ray
        # placed the ranks was never carried out.
        self.held: list[int] = []
        self.lock = threading.Lock()

    def where(self) -> tuple[str, str, list]:
        """(node IP, node id, the GPU ids Ray gave it) of this actor."""
        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

    def free_port(self) -> int:
        """A port free on this node a moment ago (rank 0's, for the rendezvous)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def run(self, command: list[str], env: dict[str, str], log_path: str) -> int:
        """Run the rank to its end; its exit code (negative: the signal that ended it). The rank starts with
        the stop and stacks signals blocked (a child inherits its spawning thread's mask) and unblocks them once
        its handlers exist, so one that comes early is not fatal.

        Its stops come from this actor alone: the rank runs in a process group of its own and is killed
        (SIGKILL) when this actor's worker dies (this thread waits on it to its end). In the worker's group, a
        rank whose actor was killed (Ray's memory monitor, its node's raylet gone, the launcher dead) got Ray's
        SIGTERM to what the worker left, took it for a cancel, and the lost job ended `cancelled`."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SPAWN_BLOCKED_SIGNALS)
        try:
            with open(log_path, "ab") as log_file, self.lock:
                self.process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log_file,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                process_group=0, preexec_fn=_die_with(os.getpid()))
                for signum in self.held:
                    self.process.send_signal(signum)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return self.process.wait()

    def signal(self, signum: int) -> bool:
        """Pass a stop or stacks signal to the rank's process (held until it exists); False once it ended."""
        with self.lock:
            if self.process is None:
                self.held.append(signum)
                return True
            if self.process.poll() is not None:
                return False
            self.process.send_signal(signum)
            return True


def _die_with(parent: int):
    """What a rank's process runs before its program: SIGKILL to it when its actor's spawning thread ends (and
    at once when the actor's worker died before that was set)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl       # loaded here, not between the fork and the exec

    def die_with_parent() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    return die_with_parent


def stacks_request(job_dir: Path) -> str | None:
    """The job server's latest stacks request (a number it raises), if any."""
    return (read_small_text(job_dir / STACKS_REQUEST_NAME) or "").strip() or None


def ended_before_start(job_dir: Path, outcome: str) -> int:
    """A stop that came before any rank started: its result written, its exit code."""
    code = int(exit_code_for(outcome))
    # No rank ran: the server publishes the end, that of the job's wait.
    write_result(job_dir / RESULT_FILE_NAME, {"state": outcome, "exit_code": code, "error": None, "error_type": None,
                                              RESULT_PUBLISHED: False, RESULT_STARTED: False})
    return code


def requested_device(train_args: list[str]) -> str:
    """The job's --device ("auto" when it sets none)."""
    for index, arg in enumerate(train_args):
        if arg == "--device" and index + 1 < len(train_args):
            return train_args[index + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return "auto"


def gpus_per_rank(device: str, cluster_gpus: float) -> int:
    """The GPUs each rank asks Ray for: one for a CUDA job, none for a CPU one, and for `auto` one when the
    cluster has GPUs. Ray gives an actor only the GPUs it asked for (its CUDA_VISIBLE_DEVICES names them): a
    rank that asked for none trained on the CPU of a GPU node, or failed its `--device cuda`."""
    if device == "cpu":
        return 0
    if device.startswith("cuda"):
        return 1
    return 1 if cluster_gpus >= 1 else 0


def wait_for_placement(group, nproc: int, gpus: int, stop_requested, job_dir: Path) -> str | None:
    """Wait until Ray has placed the ranks' bundles; the stop requested meanwhile, if one is (the wait had no
    end: a pause was never carried out, a cancel waited out the server's grace and its kill). Past
    PLACEMENT_SAY_SECONDS, what it waits for is said in the log and in the job's PLACEMENT_WAIT_NAME file (the
    caller removes it): the job server showed such a job `running`, with nothing behind it."""
    ready = group.ready()
    began, said = time.monotonic(), False
    while not ray.wait([ready], timeout=CONTROL_POLL_SECONDS)[0]:
        outcome = stop_requested()
        if outcome is not None:
            return outcome
        if not said and time.monotonic() - began >= PLACEMENT_SAY_SECONDS:
            said = True
            resources = ray.cluster_resources()
            cpus, gpu_count = resources.get("CPU", 0), resources.get("GPU", 0)
            short = cpus < nproc or gpu_count < nproc * gpus
            waiting_for = (f"Ray to place {nproc} rank(s), one CPU{' and one GPU' if gpus else ''} each: the cluster "
                           f"has {cpus:g} CPU(s) and {gpu_count:g} GPU(s) in all"
                           f"{', fewer than the job needs' if short else ''}")
            print(f"waiting for {waiting_for}; pause or cancel the job to stop waiting", flush=True)
            replace_atomically(job_dir / PLACEMENT_WAIT_NAME, waiting_for)
    return None


def rank_codes(runs: list) -> list[int]:
    """Each rank's exit code; a rank whose actor died (Ray's memory monitor, its node lost) was killed with it
    (Rank.run): said in the log, naming the rank, and counted killed by SIGKILL (the launcher died of the actor's
    error, a traceback, and the job said "exit code 1 without a result")."""
    codes = []
    for index, run in enumerate(runs):
        try:
            codes.append(ray.get(run))
        except ray.exceptions.RayActorError as error:
            print(f"rank {index}: its Ray actor died, and the rank with it: {' '.join(str(error).split())[:500]}",
                  flush=True)
            codes.append(-int(signal.SIGKILL))
    return codes


def lost_or_failed(index: int, run) -> str | None:
    """Why rank `index`'s run (ended) may leave its peers waiting for ever: its Ray actor died, or the rank failed
    (its peers do not stop as they do when it completed, paused or was cancelled), its run's own error included;
    None otherwise."""
    try:
        code = ray.get(run)
    except ray.exceptions.RayActorError:
        return "a rank's Ray actor died (a peer lost with its node holds them in a collective)"
    except ray.exceptions.RayError as error:     # the run itself raised (rank_codes raises it again)
        # Before its process started (its node without the job's directory: the log not opened): it never joins them.
        cause = getattr(error, "cause", None) or error
        return (f"rank {index} failed (its run raised {type(cause).__name__}: one that never joined them holds them "
                "in the rendezvous)")
    if code in (ExitCode.COMPLETED, ExitCode.CANCELLED, ExitCode.PAUSED):
        return None
    how = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
    return f"rank {index} failed ({how}: one that never joined them holds them in the rendezvous)"


def exit_as(code: int) -> None:
    """Exit with rank 0's exit code; die of the signal that killed it when it was killed (sys.exit(-9) exits
    247, and the job server said "exit code 247" where a local job says "killed by SIGKILL")."""
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):     # (these two have no handler to take back)
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def take_ray_stops(handler) -> None:
    """Route each of RAY_STOP_SIGNALS to `handler`."""
    for signum in RAY_STOP_SIGNALS:
        signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    """Place the ranks, run them, pass stops on, and return rank 0's exit code."""
    parser = argparse.ArgumentParser(prog="trainmetrics.jobserver.ray_launch")
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    train_args = [a for a in args.train_args if a != "--"] if args.train_args[:1] == ["--"] else args.train_args
    stopped: list[str] = []

    def on_ray_stop(*_) -> None:             # Ray's stop_job
        stopped.append("cancelled")

    take_ray_stops(on_ray_stop)
    (args.job_dir / PLACEMENT_WAIT_NAME).unlink(missing_ok=True)     # an earlier launcher's, killed while it waited
    already = control_request(args.job_dir)
    if already is not None:              # stopped before anything started: the outcome at once
        return ended_before_start(args.job_dir, already)

    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    # Again: ray.init put its own failure-signal handler over ours, and Ray's stop killed the launcher (the job
    # failed without a result, its ranks killed without a checkpoint) instead of cancelling the job.
    take_ray_stops(on_ray_stop)
    gpus = gpus_per_rank(requested_device(train_args), ray.cluster_resources().get("GPU", 0))
    group = placement_group([{"CPU": 1, "GPU": gpus} if gpus else {"CPU": 1}] * args.nproc, strategy="SPREAD")
    try:
        outcome = wait_for_placement(group, args.nproc, gpus,
                                     lambda: control_request(args.job_dir) or next(iter(stopped), None), args.job_dir)
    finally:
        (args.job_dir / PLACEMENT_WAIT_NAME).unlink(missing_ok=True)
    if outcome is not None:
        remove_placement_group(group)
        return ended_before_start(args.job_dir, outcome)
    ranks = [Rank.options(num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(group, index)).remote()
             for index in range(args.nproc)]
    places = ray.get([rank.where.remote() for rank in ranks])
    for index, (node_ip, node, gpu_ids) in enumerate(places):
        print(f"rank {index}: node {node} ({node_ip}){f', GPU {gpu_ids}' if gpus else ''}", flush=True)
    master_port = ray.get(ranks[0].free_port.remote())
    # A rank with a GPU of Ray's sees that one alone, as cuda:0; the others number the ranks on each node.
    local_ranks, seen = [], {}
    for _, node, _ in places:
        local_ranks.append(0 if gpus else seen.get(node, 0))
        seen[node] = seen.get(node, 0) + 1
    runs = []
    for index, (rank, (node_ip, _, _)) in enumerate(zip(ranks, places)):
        env = {"RANK": str(index), "WORLD_SIZE": str(args.nproc), "LOCAL_RANK": str(local_ranks[index]),
               "MASTER_ADDR": places[0][0], "MASTER_PORT": str(master_port)}
        listen = f"[{node_ip}]:0" if ":" in node_ip else f"{node_ip}:0"      # an IPv6 node in brackets
        command = [sys.executable, "-m", "trainmetrics", "train", *train_args, "--metrics-listen", listen]
        runs.append(rank.run.remote(command, env if args.nproc > 1 else {}, str(args.job_dir / LOG_NAME)))

    passed: set[str] = set()
    lock = threading.Lock()

    def pass_on(outcome: str) -> None:
        with lock:
            if outcome in passed:
                return
            passed.add(outcome)
        for rank in ranks:
            rank.signal.remote(int(STOP_SIGNALS[outcome]))

    answered_stacks = stacks_request(args.job_dir)      # a request from an earlier run is not this run's
    pending, lost_at, why, killed = list(runs), None, None, False
    while pending:
        ended, pending = ray.wait(pending, timeout=CONTROL_POLL_SECONDS)
        if lost_at is None:
            why = next(filter(None, (lost_or_failed(runs.index(run), run) for run in ended)), None)
            lost_at = time.monotonic() if why is not None else None
        if pending and not killed and lost_at is not None and time.monotonic() - lost_at >= LOST_RANK_GRACE_SECONDS:
            killed, running = True, [index for index, run in enumerate(runs) if run in pending]
            print(f"rank(s) {running}: still running {LOST_RANK_GRACE_SECONDS:g} s after {why}: killed", flush=True)
            for index in running:
                ranks[index].signal.remote(int(signal.SIGKILL))
        for outcome in [control_request(args.job_dir), *stopped]:
            if outcome is not None:
                pass_on(outcome)
        request = stacks_request(args.job_dir)
        if request != answered_stacks:
            answered_stacks = request
            for rank in ranks:
                rank.signal.remote(int(STACKS_SIGNAL))
    codes = rank_codes(runs)
    return codes[0] if codes[0] != 0 or all(code == 0 for code in codes) else int(ExitCode.FAILED)


if __name__ == "__main__":
    exit_as(main())
