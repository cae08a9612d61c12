"""`trainmetrics analytics`: the analytics HTTP service over a Prometheus-API backend."""

import argparse
import logging
import sys

from trainmetrics.names import DEFAULT_ANALYTICS_PORT, DEFAULT_PROMETHEUS_PORT, parse_listen
from trainmetrics.webconfig import load_web_config, serve_uvicorn


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the analytics flags (imports nothing heavy)."""
    parser.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_ANALYTICS_PORT}", help="HOST:PORT to serve on")
    parser.add_argument("--prometheus-url", default=f"http://127.0.0.1:{DEFAULT_PROMETHEUS_PORT}",
                        help="base URL of Prometheus or any Prometheus-API backend")
    parser.add_argument("--lookback", default="30d", help="how far back a job is found by id")
    parser.add_argument("--prometheus-timeout", type=float, default=8.0,
                        help="seconds per request to Prometheus (below --request-timeout)")
    parser.add_argument("--request-timeout", type=float, default=10.0, help="seconds per request to this service")
    parser.add_argument("--max-concurrency", type=int, default=4,
                        help="requests in flight to Prometheus, shared by all callers (default 4: a query runs on "
                             "one Prometheus core; raise it for a Prometheus with many cores and many callers)")
    parser.add_argument("--web.config.file", dest="web_config_file", default=None,
                        help="TLS (optionally client certificates) and basic-auth settings, in Prometheus "
                             "exporter-toolkit's web-config format")
    parser.add_argument("--cache-entries", type=int, default=1024,
                        help="finished jobs' analytics kept in memory (0: no cache)")
    parser.add_argument("--no-recorded-series", dest="recorded_series", action="store_false",
                        help="summary and job list read raw series only, never the analytics recording rules'")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; 2 on bad flags."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # one INFO line per Prometheus request otherwise
    from analytics.endpoints import BadParameter, parse_duration

    try:
        host, port = parse_listen(args.listen)
        lookback = parse_duration("lookback", args.lookback)
        if not 0 < args.prometheus_timeout < args.request_timeout:
            raise ValueError("--prometheus-timeout must be positive and below --request-timeout")
        if args.max_concurrency < 1 or args.cache_entries < 0:
            raise ValueError("--max-concurrency must be at least 1 and --cache-entries not negative")
        if not args.prometheus_url.startswith(("http://", "https://")):
            raise ValueError(f"--prometheus-url must be an http(s) URL, got {args.prometheus_url!r}")
        web_config = load_web_config(args.web_config_file)
    except (ValueError, BadParameter) as error:
        print(f"trainmetrics analytics: error: {error}", file=sys.stderr)
        return 2

    from analytics.app import Settings, create_app

    app = create_app(Settings(prometheus_url=args.prometheus_url, lookback_seconds=lookback,
                              prometheus_deadline=args.prometheus_timeout,
                              service_deadline=args.request_timeout, max_concurrency=args.max_concurrency,
                              cache_entries=args.cache_entries, recorded_series=args.recorded_series))
    serve_uvicorn(app, host, port, web_config)
    return 0
