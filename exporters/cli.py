"""`trainmetrics exporter`: flags (generated from the COLLECTORS table) and the entry point.

configure() imports nothing heavy so `trainmetrics --help` stays fast; run() builds the collectors,
binds the port, starts the samplers and serves until SIGINT/SIGTERM. Bad input exits 2 with one line on
stderr.
"""

import argparse
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

from exporters.collectors import COLLECTORS
from trainmetrics.names import DEFAULT_EXPORTER_PORT, DEFAULT_JOB_DIR, parse_listen
from trainmetrics.webconfig import load_web_config

DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*$")
UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


class BadInput(Exception):
    """Input the exporter cannot run with: reported as one line on stderr, exit code 2."""


def parse_duration(value: str) -> float:
    """Seconds from '0.1', '100ms', '1s' or '1m'."""
    match = DURATION.match(value)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {value!r}: use seconds (0.1) or 100ms, 1s, 1m")
    return float(match.group(1)) * UNIT_SECONDS[match.group(2)]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the exporter's flags to parser."""
    parser.add_argument("--web.config.file", dest="web_config_file", type=Path, default=None,
                        help="TLS and basic-auth settings, in Prometheus exporter-toolkit's web-config format")
    parser.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_EXPORTER_PORT}",
                        help="HOST:PORT to serve /metrics on")
    parser.add_argument("--sample-interval", type=parse_duration, default=0.1, metavar="DURATION",
                        help="how often the fast loop samples (CPU, memory, disk, network, jobs, GPU "
                             "utilisation and memory)")
    parser.add_argument("--slow-interval", type=parse_duration, default=1.0, metavar="DURATION",
                        help="how often the slow loop samples (process counts, filesystems, GPU power, "
                             "energy, clocks, errors and process lists)")
    parser.add_argument("--peak-window", type=parse_duration, default=1.0, metavar="DURATION",
                        help="window of the *_peak_* and mean utilisation series; keep it >= 2 x the "
                             "scrape interval so every scrape sees every spike")
    parser.add_argument("--job-dir", default=None, metavar="DIR",
                        help=f"job-mapping directory the trainer writes (default {DEFAULT_JOB_DIR}; "
                             "an explicit DIR must be readable)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    for name, spec in COLLECTORS.items():   # the help formatter adds "(default: True/False)"
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
            match = re.match(r"^--(?:no-)?collector\.([^=]*)", extra)
            if match:
                _exit_bad_input(f"unknown collector {match.group(1)!r} (known: {', '.join(COLLECTORS)})")
        return namespace, extras

    parser.parse_known_args = checked
    parser.error = lambda message: _exit_bad_input(message)


def _exit_bad_input(message: str) -> None:
    print(f"trainmetrics exporter: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_job_dir(value: str | None) -> Path:
    """The job dir to use; an explicit one is created when missing and must be listable."""
    if value is None:
        return Path(DEFAULT_JOB_DIR)  # missing is fine: no jobs until the trainer creates it
    path = Path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.listdir(path)
    except OSError as error:
        raise BadInput(f"job dir {value!r} is not readable: {error.strerror or error}") from error
    return path


def validate(args: argparse.Namespace) -> tuple[str, int]:
    """Check the flags that argparse cannot; returns the listen address."""
    try:
        host, port = parse_listen(args.listen)
    except ValueError as error:
        raise BadInput(str(error)) from error
    if args.sample_interval <= 0:
        raise BadInput(f"--sample-interval must be > 0, got {args.sample_interval:g}s")
    if args.slow_interval <= 0:
        raise BadInput(f"--slow-interval must be > 0, got {args.slow_interval:g}s")
    if args.peak_window < args.sample_interval:
        raise BadInput(f"--peak-window ({args.peak_window:g}s) must be >= --sample-interval "
                       f"({args.sample_interval:g}s): a window shorter than one sample holds nothing")
    return host, port


def run(args: argparse.Namespace) -> int:
    """Run the exporter until SIGINT/SIGTERM; returns the exit code (2 on bad input)."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        host, port = validate(args)
        job_dir = check_job_dir(args.job_dir)
    except BadInput as error:
        _exit_bad_input(str(error))

    from exporters.collectors.base import CollectorContext
    from exporters.collectors.jobs import JobTracker
    from exporters.exporter import Exporter, MetricsServer

    context = CollectorContext(peak_window=args.peak_window, job_tracker=JobTracker(job_dir))
    collectors = [spec.load().build(context) for name, spec in COLLECTORS.items()
                  if getattr(args, f"collector_{name}")]
    try:
        web_config = load_web_config(args.web_config_file)
    except ValueError as error:
        _exit_bad_input(str(error))
    exporter = Exporter(collectors, sample_interval=args.sample_interval, slow_interval=args.slow_interval)
    try:
        server = MetricsServer((host, port), exporter, web_config)
    except OSError as error:
        _exit_bad_input(f"cannot listen on {host}:{port}: {error.strerror or error}")
    # A short GIL switch interval lets a scrape's thread in while the sampler parses /proc.
    sys.setswitchinterval(0.0002)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    exporter.start()
    server.serve_in_background()
    logging.getLogger(__name__).info("serving http://%s:%d/metrics (collectors: %s)", host, server.server_port,
                                     ", ".join(runner.name for runner in exporter.runners))
    stopping.wait()
    server.shutdown()
    server.server_close()
    exporter.stop()
    return 0
