"""The one entry point: `trainmetrics COMMAND`. Each command lives in its component's cli module.

A command module provides ``configure(parser)`` (imports nothing heavy, so ``--help`` is fast) and
``run(args) -> int`` (the exit code). A new command is one line in COMMANDS.
"""

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("trainer.cli", "run one training job in the foreground, publishing its metrics"),
    "exporter": ("exporters.cli", "run the node exporter (CPU, memory, disk, network, processes, GPUs per job)"),
    "analytics": ("analytics.cli", "serve job analytics, fleet summary and comparisons over the Prometheus API"),
    "server": ("trainer.server_cli", "run the job server: upload datasets, submit, pause/resume/cancel, download"),
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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.configure(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns its exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
