"""`trainmetrics analytics`: the analytics HTTP service over a Prometheus-API backend. Its flags are shared with
`trainmetrics server`, which serves the same analytics beside the job API."""

import argparse
import logging
import math

from trainmetrics.command import (DEFAULT_ANALYTICS_PORT, DEFAULT_LOOKBACK_DAYS, DEFAULT_MAX_ANSWER_BYTES,
                                  DEFAULT_PROMETHEUS_PORT, FlagError, listen_flag, listening_socket, say_listening)
from trainmetrics.contract import http_url_problem
from trainmetrics.webconfig import web_config_flag


def add_analytics_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that set how the analytics reach Prometheus (both commands take them)."""
    group = parser.add_argument_group("analytics")
    group.add_argument("--prometheus-url", default=f"http://127.0.0.1:{DEFAULT_PROMETHEUS_PORT}",
                       help="base URL of Prometheus or any Prometheus-API backend")
    group.add_argument("--prometheus-bearer-token-file", metavar="FILE", default=None,
                       help="send 'Authorization: Bearer' with the token in FILE, read again when it changes (a "
                            "rotated service account token); basic auth: user:password@ in --prometheus-url")
    group.add_argument("--prometheus-ca-file", metavar="FILE", default=None,
                       help="verify an https backend's certificate against the CA certificates in FILE (PEM) "
                            "instead of the usual ones")
    group.add_argument("--prometheus-header", metavar="'NAME: VALUE'", action="append", default=None,
                       help="a header sent with every request to the backend, e.g. 'X-Scope-OrgID: team-a' for a "
                            "Mimir or Cortex tenant (repeatable)")
    group.add_argument("--lookback", default=f"{DEFAULT_LOOKBACK_DAYS}d", help="how far back a job is found by id")
    group.add_argument("--prometheus-timeout", type=float, default=8.0,
                       help="seconds per request to Prometheus (below --request-timeout)")
    group.add_argument("--request-timeout", type=float, default=10.0,
                       help="seconds per request to the analytics")
    group.add_argument("--max-concurrency", type=int, default=4,
                       help="requests in flight to Prometheus, shared by all callers (a query runs on one "
                            "Prometheus core; raise it for a Prometheus with many cores and many callers)")
    group.add_argument("--max-answer-bytes", type=int, default=DEFAULT_MAX_ANSWER_BYTES,
                       help="the largest answer read from Prometheus, in bytes (a query answered with more is a 502 "
                            "naming this flag)")
    group.add_argument("--cache-entries", type=int, default=1024,
                       help="finished jobs' analytics kept in memory (0: no cache)")
    group.add_argument("--recorded-series", action=argparse.BooleanOptionalAction, default=True,
                       help="the summary and the job list read the analytics recording rules' series where they "
                            "cover the range (--no-recorded-series: raw series only)")


def analytics_settings(args: argparse.Namespace):
    """Settings from the flags; FlagError naming the first bad one."""
    from trainmetrics.analytics.app import Settings
    from trainmetrics.analytics.backend_auth import bearer_token_flag, ca_file_flag, header_flags
    from trainmetrics.analytics.endpoints import BadParameter, parse_duration

    try:
        lookback = parse_duration("lookback", args.lookback)
    except BadParameter as error:
        raise FlagError("--lookback", error.message.split(": ", 1)[-1]) from None
    if not 0 < args.request_timeout < math.inf:
        raise FlagError("--request-timeout", f"must be a positive number of seconds, got {args.request_timeout:g}")
    if not args.prometheus_timeout > 0:
        raise FlagError("--prometheus-timeout", f"must be positive, got {args.prometheus_timeout:g}")
    if not args.prometheus_timeout < args.request_timeout:
        raise FlagError("--prometheus-timeout", f"must be below --request-timeout ({args.request_timeout:g})")
    if args.max_concurrency < 1:
        raise FlagError("--max-concurrency", f"must be at least 1, got {args.max_concurrency}")
    if args.max_answer_bytes < 1:
        raise FlagError("--max-answer-bytes", f"must be at least 1, got {args.max_answer_bytes}")
    if args.cache_entries < 0:
        raise FlagError("--cache-entries", f"must not be negative, got {args.cache_entries}")
    if problem := http_url_problem(args.prometheus_url):
        raise FlagError("--prometheus-url", problem)
    return Settings(prometheus_url=args.prometheus_url, lookback_seconds=lookback,
                    prometheus_auth=bearer_token_flag(args.prometheus_bearer_token_file),
                    prometheus_ca=ca_file_flag(args.prometheus_ca_file),
                    prometheus_headers=header_flags(args.prometheus_header or []),
                    prometheus_deadline=args.prometheus_timeout, service_deadline=args.request_timeout,
                    max_concurrency=args.max_concurrency, max_answer_bytes=args.max_answer_bytes,
                    cache_entries=args.cache_entries,
                    recorded_series=args.recorded_series)


def add_web_flags(parser: argparse.ArgumentParser, port: int = DEFAULT_ANALYTICS_PORT) -> None:
    """--listen and --web.config.file, as every trainmetrics server takes them."""
    parser.add_argument("--listen", default=f"127.0.0.1:{port}", help="HOST:PORT to serve on")
    parser.add_argument("--web.config.file", dest="web_config_file", default=None, metavar="FILE",
                        help="TLS (optionally client certificates) and basic-auth settings, in Prometheus "
                             "exporter-toolkit's web-config format")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the analytics flags (imports nothing heavy)."""
    add_web_flags(parser)
    add_analytics_flags(parser)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; bad flags raise FlagError (exit 2)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # one INFO line per Prometheus request otherwise
    host, port = listen_flag("--listen", args.listen)
    settings = analytics_settings(args)
    web_config = web_config_flag(args.web_config_file)
    sock = listening_socket("--listen", host, port)

    from trainmetrics.analytics.app import create_app
    from trainmetrics.analytics.prometheus import shown_url
    from trainmetrics.edge import serve

    scheme = "https" if web_config.ssl_context else "http"
    serve(create_app(settings, web_config), sock, web_config, lambda: say_listening(
        "analytics", scheme, host, sock.getsockname()[1], extra=f" (Prometheus {shown_url(settings.prometheus_url)})"))
    return 0
