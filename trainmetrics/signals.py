"""The signals that stop a trainmetrics process, and the rule every one of them follows about SIGHUP. Imports
nothing but `signal`: `python -m trainmetrics train` installs its stop handlers (trainer/stopping.py) before
anything else is imported, and a stop signal before then kills the job with no result."""

import signal

# The signals that stop a long-running trainmetrics command cleanly (the server, the analytics, the exporter,
# the demo): SIGHUP too, as a closed terminal sends it (its default action killed the server, its running jobs
# left unsupervised).
SERVICE_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signals_to_take(signals) -> tuple:
    """The stop signals a process takes of `signals`: SIGHUP only when it did not start with it ignored (`nohup`:
    whoever started it asked it to outlive the terminal, and a handler would undo that)."""
    return tuple(signum for signum in signals
                 if not (signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN))
