"""`python -m exporters`: the exporter alone, the same flags as `trainmetrics exporter`."""

import argparse
import sys

from exporters import cli


def main(argv: list[str] | None = None) -> int:
    """Parse the exporter's flags and run it."""
    parser = argparse.ArgumentParser(prog="trainmetrics exporter", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.configure(parser)
    return cli.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
