"""`python -m exporters`: the exporter alone, the same flags and errors as `trainmetrics exporter`."""

import sys

from trainmetrics.cli import OneLineErrorParser
from trainmetrics.command import FlagError, HelpFormatter, fail
from trainmetrics.exporters import cli


def main(argv: list[str] | None = None) -> int:
    """Parse the exporter's flags and run it."""
    parser = OneLineErrorParser(prog="trainmetrics exporter", description=__doc__, formatter_class=HelpFormatter)
    cli.configure(parser)
    args = parser.parse_args(argv)
    try:
        return cli.run(args)
    except FlagError as error:
        return fail("exporter", str(error))


if __name__ == "__main__":
    sys.exit(main())
