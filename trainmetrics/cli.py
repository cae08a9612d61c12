"""The one entry point: `trainmetrics COMMAND`. Each command lives in its part's cli module.

A command module provides ``configure(parser)`` (imports nothing heavy, so ``--help`` is fast) and
``run(args) -> int`` (the exit code). A new command is one line in COMMANDS. Every command reports bad input
the same way: one line on stderr naming the flag as typed, exit code 2 (trainmetrics.command).
"""

import argparse
import importlib
import importlib.metadata
import re
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
    """Bad flags are reported in one line (no usage dump), exit code 2, as `trainmetrics COMMAND: error: ...`
    like every other bad input (trainmetrics.command.fail)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}     # the top level's: each command's parser
        # A word of a minus and a digit is a value: argparse's own rule took `-1d` and `-1e-3` for flags ("--lookback:
        # expected one argument"), so the flag's own check never said what is wrong with them. No flag of ours
        # starts with a digit. (argparse reads this attribute where it tells flags from values.)
        self._negative_number_matcher = re.compile(r"^-[0-9]")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a flag the command does not know is reported by the command's parser (argparse
        leaves unknown arguments to the top-level one, whose prog is plain `trainmetrics`)."""
        args = sys.argv[1:] if args is None else list(args)
        if self.commands and args and args[0].startswith("-") and args[0] not in ("-h", "--help", "--version"):
            # The top level has no option: `trainmetrics --bogus` said only "required: COMMAND".
            self.error(f"unrecognized arguments: {args[0]} (options go after the command)")
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.commands.get(getattr(parsed, "command", None), self).error(
                f"unrecognized arguments: {' '.join(unknown)}")
        return parsed


def _version() -> str:
    """The installed package's version (a source tree never installed has none to say)."""
    try:
        return importlib.metadata.version("trainmetrics")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = OneLineErrorParser(
        prog="trainmetrics",
        description="Prometheus-native metrics for PyTorch training jobs and the machines under them.",
    )
    parser.add_argument("--version", action="version", version=f"trainmetrics {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=OneLineErrorParser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        module.configure(sub)
        sub.set_defaults(run=module.run)
        parser.commands[name] = sub
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns its exit code."""
    train = (sys.argv[1:2] if argv is None else list(argv)[:1]) == ["train"]
    if train:
        # A job's stop signals are caught before every command's module is imported: the console script
        # (`trainmetrics train`) comes in here, not through __main__, and a SIGTERM meanwhile killed the job by
        # the default action (exit 143, no result) where `python -m trainmetrics train` ended it cancelled.
        from trainmetrics.trainer.stopping import StopFlag

        StopFlag.for_process()
    try:
        # In the try: building the parser imports every command's module, most of a start-up, and a Ctrl-C then
        # ended in a traceback.
        args = build_parser().parse_args(argv)
        return args.run(args)
    except FlagError as error:
        return fail(args.command, str(error))
    except KeyboardInterrupt:
        # A Ctrl-C before the command took the stop signals itself ends it as one after: a server stopped (0,
        # contract.ExitCode), a job cancelled. (It was 130, which no command's exit codes have.) The contract is
        # imported here: before StopFlag, it delayed a job's stop handlers (tests/test_architecture.py).
        from trainmetrics.contract import ExitCode

        return ExitCode.CANCELLED if train else 0


if __name__ == "__main__":
    sys.exit(main())
