"""The job server's flags and settings (`trainmetrics server`, composed with the analytics in
trainmetrics/service.py)."""

import argparse
import importlib.util
import math
import ipaddress
import logging
import os
from pathlib import Path

from trainmetrics.command import (FlagError, check_directory, check_directory_writable, lock_directory,
                                  path_argument)
from trainmetrics.contract import http_url_problem

# The file in the data dir a server holds an exclusive lock on for its life: one server per data dir.
LOCK_NAME = "server.lock"

log = logging.getLogger("trainmetrics.jobserver")


def add_jobserver_flags(parser: argparse.ArgumentParser) -> None:
    """The job server's own flags."""
    group = parser.add_argument_group("jobs")
    group.add_argument("--data-dir", type=path_argument, required=True,
                       help="where datasets, jobs (checkpoints, logs, results) and the SQLite database live")
    group.add_argument("--tokens", type=path_argument, default=None, metavar="FILE",
                       help="file of 'TOKEN OWNER' lines: every request then needs 'Authorization: Bearer TOKEN', "
                            "sees only its owner's jobs, and job ids start with 'OWNER-' (default: no owners); "
                            "read again within a second of a change, no restart needed")
    group.add_argument("--insecure-no-auth", action="store_true",
                       help="allow a non-loopback --listen without --tokens (anyone reaching it controls jobs)")
    group.add_argument("--max-concurrent", type=int, default=None,
                       help="jobs running at once; more wait queued (default: one per GPU, 1 without). Local GPU "
                            "jobs are given GPUs of their own, one per rank, from the server's CUDA_VISIBLE_DEVICES "
                            "(else every GPU), and wait for free ones")
    group.add_argument("--advertise-url", default=None, metavar="URL",
                       help="how jobs reach this server to report their /metrics endpoints for Prometheus' HTTP "
                            "service discovery (default: from --listen; give it when jobs run on other hosts)")
    group.add_argument("--job-dir", type=path_argument, default=None,
                       help="job-mapping directory the node exporter reads (default: none)")
    group.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="where jobs run: local child processes, or a Ray cluster through its Jobs API "
                            "(pip install 'trainmetrics[ray]'; the data dir must be on storage the nodes share)")
    group.add_argument("--ray-address", default=None, metavar="URL",
                       help="the Ray cluster's dashboard, e.g. http://HEAD:8265 (with --executor ray; a gateway's "
                            "headers: RAY_JOB_HEADERS, as for `ray job submit`)")
    group.add_argument("--ray-python", default=None, metavar="PATH",
                       help="the Python with trainmetrics[train] on the Ray nodes (default: this one's)")
    group.add_argument("--max-upload-bytes", type=int, default=256 * 1024 * 1024, help="largest dataset upload")
    group.add_argument("--linger-timeout", type=float, default=15.0,
                       help="how long a job waits for Prometheus' first scrape before its first step, and once "
                            "it ended for every scraper to read its final state")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:   # no NVML, no driver, no GPU: a CPU machine
        return 0


def local_gpus(count=_gpu_count) -> tuple[str, ...]:
    """The GPUs local jobs are given, each under one spelling (jobmap.gpu_spelling): what the server's own
    CUDA_VISIBLE_DEVICES lists where it has one (the GPUs it was given), read as CUDA reads it, else every GPU
    `count()` says NVML counts. CUDA stops at the first entry that is neither an index nor a UUID, and at an index
    past the host's GPUs (where NVML counts them), and sees no GPU at all where one is listed twice: each had been
    given to a job ('0,0', or '0,00', gave GPU 0 to two jobs at once; '0,7' on a two-GPU host gave a job GPU 7,
    where it saw no GPU and trained on the CPU)."""
    from trainmetrics.jobmap import HOST_INDEX, gpu_spelling, same_gpu

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return tuple(str(index) for index in range(count()))
    gpus: list[str] = []
    host_gpus = None
    for entry in (entry.strip() for entry in visible.split(",")):
        gpu = gpu_spelling(entry)
        if gpu is None:
            break
        if HOST_INDEX.fullmatch(gpu):
            host_gpus = count() if host_gpus is None else host_gpus
            if host_gpus and (len(gpu) > len(str(host_gpus)) or int(gpu) >= host_gpus):
                break
        if any(same_gpu(gpu, given) for given in gpus):
            log.warning("CUDA_VISIBLE_DEVICES=%r names a GPU twice (%s): CUDA sees no GPU, and local jobs are "
                        "given none", visible, entry)
            return ()
        gpus.append(gpu)
    return tuple(gpus)


def lock_data_dir(data_dir: Path):
    """The data dir's lock file, locked for as long as it stays open (the server's life); FlagError when
    another server holds it (a second one would adopt the first one's jobs and pause them when it stops), or
    when it cannot be opened (a data dir this user cannot write, a directory at its name)."""
    return lock_directory("--data-dir", data_dir, LOCK_NAME, "trainmetrics server")


def jobserver_settings(args: argparse.Namespace, host: str, web_config):
    """(ServerSettings, TokenAuth or None) from the flags; FlagError naming the first bad one. Touches no file:
    claim_data_dir makes the data dir."""
    from trainmetrics.jobserver.auth import TokenAuth, exposure, load_tokens
    from trainmetrics.jobserver.jobs import ServerSettings

    auth = None
    if args.tokens is not None:
        try:
            auth = TokenAuth(load_tokens(args.tokens), args.tokens.absolute())
            exposed = exposure(args.tokens)
        except (OSError, ValueError) as error:
            raise FlagError("--tokens", str(error)) from None
        if exposed:
            log.warning("%s", exposed)
        if web_config.users:
            raise FlagError("--tokens", "cannot be used with basic_auth_users in --web.config.file: both take the "
                                        "Authorization header")
    elif not _is_loopback(host) and not args.insecure_no_auth:
        raise FlagError("--listen", f"refusing to serve on {host} without --tokens (add --insecure-no-auth to "
                                    "allow it)")
    # (Ray places each rank on a GPU itself: its jobs are given none here.)
    gpus = local_gpus() if args.executor == "local" else ()
    default_concurrent = max(1, len(gpus) if args.executor == "local" else _gpu_count())
    max_concurrent = args.max_concurrent if args.max_concurrent is not None else default_concurrent
    if max_concurrent < 1:
        raise FlagError("--max-concurrent", f"must be at least 1, got {max_concurrent}")
    if args.max_upload_bytes < 1:
        raise FlagError("--max-upload-bytes", f"must be at least 1, got {args.max_upload_bytes}")
    if not math.isfinite(args.linger_timeout) or args.linger_timeout < 0:
        # (passed on to every job, whose trainer refuses it: every job would fail as bad input)
        raise FlagError("--linger-timeout", f"must be a finite number >= 0, got {args.linger_timeout:g}")
    check_directory("--data-dir", args.data_dir)
    check_text_path("--data-dir", args.data_dir.absolute())
    if args.job_dir is not None:
        check_directory("--job-dir", args.job_dir)
        check_text_path("--job-dir", args.job_dir.absolute())
        if args.executor == "local":
            # Every local job writes its mapping file there (a Ray job on its node): one this user cannot write
            # in started a server whose every job failed as bad input.
            check_directory_writable("--job-dir", args.job_dir)
    if args.executor == "ray":
        if not args.ray_address:
            raise FlagError("--ray-address", "--executor ray needs the cluster's dashboard URL, e.g. http://HEAD:8265")
        if problem := http_url_problem(args.ray_address):
            raise FlagError("--ray-address", f"{problem}: the cluster's dashboard, e.g. http://HEAD:8265")
        if importlib.util.find_spec("ray") is None:
            raise FlagError("--executor", "ray needs Ray: pip install 'trainmetrics[ray]'")
        from trainmetrics.jobserver.ray_executor import headers_from_environment
        try:
            headers_from_environment()
        except ValueError as error:
            raise FlagError("", str(error)) from None
    elif args.ray_address or args.ray_python:
        raise FlagError("--ray-address" if args.ray_address else "--ray-python", "only with --executor ray")
    if args.advertise_url is not None and (problem := http_url_problem(args.advertise_url)):
        raise FlagError("--advertise-url", problem)
    settings = ServerSettings(data_dir=args.data_dir, job_dir=args.job_dir.absolute() if args.job_dir else None,
                              advertise_url=args.advertise_url,
                              executor=args.executor, ray_address=args.ray_address, ray_python=args.ray_python,
                              owners=auth is not None, max_concurrent=max_concurrent, gpus=gpus,
                              max_upload_bytes=args.max_upload_bytes, linger_timeout=args.linger_timeout)
    return settings, auth


def claim_data_dir(settings) -> None:
    """Make the data dir and take its lock (FlagError naming --data-dir). After every other flag is checked and
    the listening socket bound: a refusal after it would leave a data dir and a lock file no server used."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # Absolute: the paths it makes (datasets, jobs) hold after a restart from another directory.
        settings.data_dir = settings.data_dir.resolve()
    except OSError as error:
        raise FlagError("--data-dir", f"{settings.data_dir}: {error.strerror or error}") from None
    settings.data_dir_lock = lock_data_dir(settings.data_dir)
    try:
        check_data_dir_contents(settings.data_dir, settings.executor)
    except FlagError:
        settings.data_dir_lock.close()
        raise


def check_text_path(flag: str, path: Path) -> None:
    """FlagError unless the path is text (UTF-8): the server keeps its paths and the errors naming them in SQLite,
    which refuses a name whose bytes are not UTF-8 (an upload answered 500, a run's end was never recorded)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise FlagError(flag, f"{str(path)!r} is not UTF-8: give a path whose name is text") from None


def check_data_dir_contents(data_dir: Path, executor: str) -> None:
    """What the server keeps in the data dir can be used, else FlagError: its datasets and jobs directories
    (made here), its database (opened once), and the jobs the last server left running (`executor` can adopt
    them: check_running_jobs_executor). Before, a file where a directory belongs or a database that is none
    failed the server's start with a traceback, or (jobs) every job it started."""
    from trainmetrics.jobserver.store import DATABASE_NAME, JobStore, StoreUnreadable

    for name in ("datasets", "jobs"):
        path = data_dir / name
        try:
            path.mkdir(exist_ok=True)
        except FileExistsError:
            raise FlagError("--data-dir", f"{path}: not a directory (the server keeps its {name} there)") from None
        except OSError as error:
            raise FlagError("--data-dir", f"{path}: {error.strerror or error}") from None
    try:
        store = JobStore(data_dir / DATABASE_NAME)
    except StoreUnreadable as error:
        raise FlagError("--data-dir", str(error)) from None
    try:
        check_running_jobs_executor(store, executor)
    finally:
        store.close()


def check_running_jobs_executor(store, executor: str) -> None:
    """FlagError naming --executor when a job the last server left running (killed, or its job slow to pause) was
    started by another executor: this one cannot adopt it (a Ray server took a local pid for a Ray submission, a
    local one a Ray submission for a process gone) and would resume it beside the run that goes on, which nothing
    watched. Jobs that were paused or ended can move to another executor; a running one only once it has ended."""
    others = [job for job in store.list_jobs(states=("running",)) if job.run_by not in (None, executor)]
    if others:
        shown = ", ".join(f"{job.id} ({job.run_by})" for job in others[:5]) + (", ..." if len(others) > 5 else "")
        raise FlagError("--executor", f"{executor} cannot adopt the jobs the last server left running on another "
                                      f"executor: {shown}; start the server with that executor until they ended")
