"""`trainmetrics server`: the job server and the analytics on one URL, behind one edge.

Neither part knows the other: the job server contributes its routes and supervision, the analytics theirs,
and the edge authenticates each request once. With --tokens the analytics are given the caller's owner as
their scope, and check it against each job's own `owner` label in Prometheus.
"""

import argparse
import logging

from trainmetrics.analytics.cli import add_analytics_flags, add_web_flags, analytics_settings
from trainmetrics.command import listen_flag, listening_socket, reachable_address, say_listening
from trainmetrics.jobserver.cli import add_jobserver_flags, claim_data_dir, jobserver_settings
from trainmetrics.hangs import HangFeed
from trainmetrics.reports import ReportArchive
from trainmetrics.webconfig import web_config_flag


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the server flags (imports nothing heavy)."""
    add_web_flags(parser)
    add_jobserver_flags(parser)
    add_analytics_flags(parser)


def caller_owner(request) -> str | None:
    """The analytics' owner scope: the owner the edge authenticated (None without tokens: everyone)."""
    return getattr(request.state, "owner", None)


def settings(args: argparse.Namespace, host: str):
    """(web config, job server settings, auth, analytics settings) from the flags; FlagError on a bad one.
    Touches no file."""
    web_config = web_config_flag(args.web_config_file)
    server_settings, auth = jobserver_settings(args, host, web_config)
    analytics = analytics_settings(args)
    analytics.owner_scope = caller_owner
    # Reports of ended jobs: the job server keeps them, the analytics compute them and fall back to them.
    server_settings.archive = analytics.archive = ReportArchive()
    # Hung jobs: the analytics read TrainerHang from Prometheus, the job server takes their stacks.
    server_settings.hangs = analytics.hangs = HangFeed()
    return web_config, server_settings, auth, analytics


def build(web_config, server_settings, auth, analytics):
    """The app: the job server's component (its data dir claimed) and the analytics', behind one edge."""
    from trainmetrics.analytics.app import build_component as analytics_component
    from trainmetrics.edge import build_app
    from trainmetrics.jobserver.app import build_component as jobs_component

    return build_app([jobs_component(server_settings), analytics_component(analytics)], web_config=web_config,
                     authenticator=auth)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM/SIGHUP (running jobs are paused and resume at the next start)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    host, port = listen_flag("--listen", args.listen)
    web_config, server_settings, auth, analytics = settings(args, host)
    sock = listening_socket("--listen", host, port)
    claim_data_dir(server_settings)     # last of the checks: a refusal before it leaves no data dir behind
    app = build(web_config, server_settings, auth, analytics)
    scheme = "https" if web_config.ssl_context else "http"
    if server_settings.advertise_url is None:     # the port is known now (--listen :0 picks one)
        server_settings.advertise_url = f"{scheme}://{reachable_address(host, sock.getsockname()[1])}"

    from trainmetrics.analytics.prometheus import shown_url
    from trainmetrics.edge import serve

    serve(app, sock, web_config, lambda: say_listening(
        "server", scheme, host, sock.getsockname()[1], extra=f" (Prometheus {shown_url(analytics.prometheus_url)})"))
    return 0
