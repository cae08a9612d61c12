"""`trainmetrics server`: the job server (and the analytics routes on the same base URL)."""

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path

from trainmetrics.names import DEFAULT_ANALYTICS_PORT, parse_listen


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the server flags (imports nothing heavy)."""
    parser.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_ANALYTICS_PORT}", help="HOST:PORT to serve on")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="where datasets, jobs (checkpoints, logs) and the SQLite database live")
    parser.add_argument("--prometheus-url", default="http://127.0.0.1:9090",
                        help="Prometheus (or any Prometheus-API backend) for the analytics routes")
    parser.add_argument("--tokens", type=Path, default=None,
                        help="file of 'TOKEN OWNER' lines: every request then needs 'Authorization: Bearer TOKEN' "
                             "and sees only its owner's jobs")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow a non-loopback --listen without --tokens (anyone reaching it controls jobs)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="jobs running at once; more wait queued (default: one per GPU, 1 without)")
    parser.add_argument("--targets-dir", type=Path, default=None,
                        help="Prometheus file_sd directory the jobs announce themselves in")
    parser.add_argument("--job-dir", type=Path, default=None, help="job-mapping directory read by the exporter")
    parser.add_argument("--web.config.file", dest="web_config_file", type=Path, default=None,
                        help="TLS (optionally client certificates) and basic-auth settings, in Prometheus "
                             "exporter-toolkit's web-config format")
    parser.add_argument("--max-upload-bytes", type=int, default=256 * 1024 * 1024, help="largest dataset upload")
    parser.add_argument("--linger-timeout", type=float, default=15.0,
                        help="how long a finished job waits for Prometheus to scrape its final state")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fail(message: str) -> int:
    print(f"trainmetrics server: error: {message}", file=sys.stderr)
    return 2


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


def run(args: argparse.Namespace) -> int:
    """Validate the flags, then serve until SIGINT/SIGTERM (running jobs are paused and resume next start)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_listen(args.listen)
    except ValueError as error:
        return _fail(str(error))
    tokens = None
    if args.tokens is not None:
        from trainer.server import load_tokens

        try:
            tokens = load_tokens(args.tokens)
        except (OSError, ValueError) as error:
            return _fail(f"--tokens: {error}")
    elif not _is_loopback(host) and not args.insecure_no_auth:
        return _fail(f"refusing to serve on {host} without --tokens (add --insecure-no-auth to allow it)")
    max_concurrent = args.max_concurrent if args.max_concurrent is not None else max(1, _gpu_count())
    if max_concurrent < 1:
        return _fail("--max-concurrent must be at least 1")
    try:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return _fail(f"--data-dir {args.data_dir}: {error.strerror or error}")
    from trainmetrics.webconfig import load_web_config

    try:
        web_config = load_web_config(args.web_config_file)
    except ValueError as error:
        return _fail(str(error))
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            return _fail(f"cannot listen on {args.listen}: {error.strerror or error}")

    from trainer.server import ServerSettings, build_app
    from trainmetrics.webconfig import serve_uvicorn

    settings = ServerSettings(data_dir=args.data_dir, targets_dir=args.targets_dir, job_dir=args.job_dir,
                              tokens=tokens, max_concurrent=max_concurrent, max_upload_bytes=args.max_upload_bytes,
                              linger_timeout=args.linger_timeout)
    from analytics.app import Settings, create_app

    analytics = create_app(Settings(prometheus_url=args.prometheus_url))
    serve_uvicorn(build_app(settings, analytics), host, port, web_config)
    return 0
