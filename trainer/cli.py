"""`trainmetrics train`: one job in the foreground."""

import argparse
import logging

from trainer import config as train_config


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the train flags (imports nothing heavy)."""
    train_config.configure(parser)


def run(args: argparse.Namespace) -> int:
    """Run the job; torch is imported only now."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainer.runner import run_job

    return run_job(train_config.from_args(args))
