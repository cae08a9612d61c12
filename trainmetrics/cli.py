"""The one entry point: `trainmetrics COMMAND`. Each command lives in its part's cli module.

A command module provides ``configure(parser)`` (imports nothing heavy, so ``--help`` is fast) and
``run(args) -> int`` (the exit code). A new command is one line in COMMANDS. Every command reports bad input
the same way: one line on stderr naming the flag as typed, exit code 2 (trainmetrics.command).
"""

import argparse
import importlib
import sys

from trainmetrics.command import FlagError, HelpFormatter, fail

COMMANDS = {
    "train": ("trainmetrics.trainer.cli", "run one training job in the foreground, publishing its metrics"),
    "exporter": ("trainmetrics.exporters.cli",
                 "run the node exporter (CPU, memory, disk, network, processes, GPUs per job)"),
    "analytics": ("trainmetrics.analytics.cli",
                  "serve job analytics, fleet summary and comparisons over the Prometheus API"),
    "server": ("trainmetrics.service",
               "run the job server (upload datasets, submit, pause/resume/cancel, download) with the analytics"),
    "demo": ("trainmetrics.demo", "start Prometheus and the stack, run a demo job, print its URLs"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags are reported in one line (no usage dump), exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = OneLineErrorParser(
        prog="trainmetrics",
        description="Prometheus-native metrics for PyTorch training jobs and the machines under them.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=OneLineErrorParser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        module.configure(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns its exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FlagError as error:
        return fail(args.command, str(error))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
