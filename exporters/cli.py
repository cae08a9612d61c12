"""`trainmetrics exporter`: flags (generated from the COLLECTORS table) and the entry point.

configure() imports nothing heavy so `trainmetrics --help` stays fast; run() checks the flags, binds the port,
starts the samplers and serves until SIGINT/SIGTERM/SIGHUP. Bad input raises FlagError naming the flag: one line on
stderr, exit code 2.
"""

import argparse
import errno
import logging
import os
import re
import signal
import sys
from pathlib import Path

from trainmetrics.command import (DEFAULT_EXPORTER_PORT, FlagError, check_directory, listen_flag, path_argument,
                                  say_listening)
from trainmetrics.contract import DEFAULT_JOB_DIR
from trainmetrics.signals import SERVICE_STOP_SIGNALS, signals_to_take
from trainmetrics.exporters.collectors import COLLECTORS
from trainmetrics.webconfig import web_config_flag

DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m)?\s*$")
UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}
STOP_SIGNALS = set(signals_to_take(SERVICE_STOP_SIGNALS))
# The intervals' bounds (docs/metrics.md, "How values are sampled"). A fast pass and its render took ~2 ms of CPU
# here with no job (more with jobs): every 10 ms is a fifth of a core, every 1 ms more than the loop can keep
# up with. No interval past the longest scrape interval the alerts allow (15 s, docs/alerts.md): values would
# be older than a scrape, and a hung sample is found after 5 intervals. The peak window holds at least one sample
# and at most 2 x that scrape interval (every scrape sees every spike at >= 2 x its interval; a longer window
# only holds a spike over more scrapes, and every sample in it is kept and summed at each render).
MIN_INTERVAL, MAX_INTERVAL, MAX_PEAK_WINDOW = 0.01, 15.0, 30.0


def parse_duration(value: str) -> float:
    """Seconds from '0.1', '100ms', '1s' or '1m'; ValueError otherwise."""
    match = DURATION.match(value)
    if not match:
        raise ValueError(f"invalid duration {value!r}: use seconds (0.1) or 100ms, 1s, 1m")
    return float(match.group(1)) * UNIT_SECONDS[match.group(2)]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the exporter's flags to parser (the help formatter adds each default)."""
    parser.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_EXPORTER_PORT}", metavar="HOST:PORT",
                        help="address to serve /metrics on")
    parser.add_argument("--web.config.file", dest="web_config_file", type=path_argument, default=None, metavar="FILE",
                        help="TLS and basic-auth settings, in Prometheus exporter-toolkit's web-config format")
    parser.add_argument("--sample-interval", default="100ms", metavar="DURATION",
                        help="how often the fast loop samples (CPU, memory, disk, network, jobs, GPU "
                             "utilisation and memory), from 10ms to 15s")
    parser.add_argument("--slow-interval", default="1s", metavar="DURATION",
                        help="how often the slow loop samples (process counts, filesystems, GPU power, "
                             "energy, clocks, errors and process lists, CPU package energy, energy per job), "
                             "from the sample interval to 15s")
    parser.add_argument("--peak-window", default="1s", metavar="DURATION",
                        help="window of the *_peak_* and mean utilisation series, from the sample interval to 30s; "
                             "keep it >= 2 x the scrape interval so every scrape sees every spike")
    parser.add_argument("--job-dir", type=path_argument, default=None, metavar="DIR",
                        help=f"job-mapping directory the trainer writes (default: {DEFAULT_JOB_DIR}, which "
                             "may be missing; an explicit DIR is created and must be readable)")
    parser.add_argument("--path.rootfs", dest="rootfs", type=path_argument, default=Path("/"), metavar="DIR",
                        help="where the host's root filesystem is mounted (in a container: mount / at /host "
                             "and give /host; with the host's PID namespace the filesystems are then the "
                             "host's, as its init sees them)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="least severe log messages shown")
    for name, spec in COLLECTORS.items():
        parser.add_argument(f"--collector.{name}", dest=f"collector_{name}", action=argparse.BooleanOptionalAction,
                            default=spec.enabled_by_default, help=spec.help)
    _report_unknown_collectors(parser)


def _report_unknown_collectors(parser: argparse.ArgumentParser) -> None:
    """Name an unknown --collector.X in one line: argparse would only say "unrecognized arguments".

    Unrecognised arguments of a sub-command surface in the top-level parser, which we do not own, so
    the check runs on this parser's leftovers before they get there.
    """
    parse_known_args = parser.parse_known_args

    def checked(args=None, namespace=None):
        namespace, extras = parse_known_args(args, namespace)
        for extra in extras:
            match = re.match(r"^(--(?:no-)?collector\.([^=]*))", extra)
            if match:
                parser.error(f"{match.group(1)}: unknown collector {match.group(2)!r} "
                             f"(known: {', '.join(COLLECTORS)})")
        return namespace, extras

    parser.parse_known_args = checked


def durations(args: argparse.Namespace) -> tuple[float, float, float]:
    """--sample-interval, --slow-interval and --peak-window in seconds; FlagError naming a bad one and the range
    allowed. (Each was only > 0: --slow-interval 1ms ran the slow scans a hundred times as often as the fast loop,
    and a window or interval of years grew a window's samples without end or overflowed a thread's wait.)"""
    def seconds(flag: str, value: str, low: float, low_text: str, high: float, high_text: str) -> float:
        try:
            parsed = parse_duration(value)
        except ValueError as error:
            raise FlagError(flag, str(error)) from None
        if not low <= parsed <= high:
            raise FlagError(flag, f"must be from {low_text} to {high_text}, got {value[:40]!r}")
        return parsed

    sample_interval = seconds("--sample-interval", args.sample_interval, MIN_INTERVAL, "10ms", MAX_INTERVAL, "15s")
    # The slow loop's scans no more often than the fast loop's reads; a window holds one sample at least.
    fast = f"--sample-interval ({args.sample_interval})"
    slow_interval = seconds("--slow-interval", args.slow_interval, sample_interval, fast, MAX_INTERVAL, "15s")
    peak_window = seconds("--peak-window", args.peak_window, sample_interval, fast, MAX_PEAK_WINDOW, "30s")
    return sample_interval, slow_interval, peak_window


def job_dir_flag(value: str | Path | None) -> Path:
    """The job dir to use; an explicit one is created when missing and must be listable (FlagError). (An empty
    one is refused by path_argument, the flag's type.)"""
    if value is None:
        return Path(DEFAULT_JOB_DIR)  # missing is fine: no jobs until the trainer creates it
    path, given = Path(value), str(value)
    check_directory("--job-dir", path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FlagError("--job-dir", f"{given!r} cannot be created: {error.strerror or error}") from None
    try:
        os.listdir(path)
    except OSError as error:
        raise FlagError("--job-dir", f"{given!r} is not readable: {error.strerror or error}") from None
    # Resolved: the energy accounts are kept next to the directory (job_energy.state_file_for), which `.` has
    # no name to be next to (a traceback), and `jobs/sub/..` put them in a subdirectory any job's user may write.
    path = path.resolve()
    if path.parent == path:
        raise FlagError("--job-dir", f"{given!r} is the root directory: give the job directory a directory of its "
                                     "own (the exporter keeps its energy accounts beside it)")
    return path


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM/SIGHUP and return 0; bad flags raise FlagError (exit 2)."""
    # The stop signals are blocked before any thread starts (threads inherit the mask) and taken with
    # sigwait() at the end: no signal handler ever runs, so none can block on a lock the code it
    # interrupted holds (once, Event.set() in a handler hung SIGTERM for 15 minutes).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = listen_flag("--listen", args.listen)
    sample_interval, slow_interval, peak_window = durations(args)
    job_dir = job_dir_flag(args.job_dir)
    web_config = web_config_flag(args.web_config_file)
    if not args.rootfs.is_dir():
        raise FlagError("--path.rootfs", f"{str(args.rootfs)!r} is not a directory")

    from trainmetrics.exporters.collectors.base import CollectorContext
    from trainmetrics.exporters.collectors.jobs import JobTracker
    from trainmetrics.exporters.exporter import Exporter, metrics_server
    from trainmetrics.exporters.job_energy import JobEnergy, shared_state_directory, state_file_for

    state_file = state_file_for(job_dir)
    if args.collector_energy and (shared := shared_state_directory(state_file)) is not None:
        raise FlagError("--job-dir", f"other users can create files in {str(shared)!r}, where the energy state file "
                                     f"{str(state_file)!r} would be (one of theirs there would block its saves): "
                                     "give a job directory in a directory only the exporter's user or root can "
                                     "write, or --no-collector.energy")

    context = CollectorContext(peak_window=peak_window, rootfs=args.rootfs, job_tracker=JobTracker(job_dir),
                               job_energy=JobEnergy(state_file) if args.collector_energy else None)
    collectors = [spec.load().build(context) for name, spec in COLLECTORS.items()
                  if getattr(args, f"collector_{name}")]
    exporter = Exporter(collectors, sample_interval=sample_interval, slow_interval=slow_interval)
    try:
        server = metrics_server(exporter, (host, port), web_config)
    except OSError as error:
        reason = "address already in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
        raise FlagError("--listen", f"cannot listen on {host}:{port}: {reason}") from None
    # A short GIL switch interval lets a scrape's thread in while a sampler parses /proc.
    sys.setswitchinterval(0.0002)
    exporter.start()
    server.serve_in_background(name="exporter-http")
    scheme = "https" if web_config.ssl_context else "http"
    say_listening("exporter", scheme, host, server.port, "/metrics",
                  f" (collectors: {', '.join(runner.name for runner in exporter.runners)})")
    signal.sigwait(STOP_SIGNALS)
    server.close()
    exporter.stop()
    return 0
