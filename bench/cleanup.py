"""What every benchmark that starts processes does first: SIGTERM and SIGHUP end it as Ctrl-C does, so its
`finally` blocks stop what it started (a SIGTERM killed a benchmark alone and left its Prometheus, exporters
or a 32-process Ray cluster running); and a binary it needs is checked before anything starts."""

import os
import signal
import sys


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as SIGINT does."""
    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def require_binary(path: str, variable: str) -> None:
    """Exit with one line (status 2) unless `path` is an executable file; `variable` names the environment
    variable that chooses it."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        print(f"{os.path.basename(sys.argv[0])}: error: {path} is not an executable file (install it, or set "
              f"{variable})", file=sys.stderr)
        sys.exit(2)
