"""`trainmetrics train`: one job in the foreground."""

import argparse
import importlib.util
import logging
import os

from trainmetrics.command import FlagError
from trainmetrics.trainer import config as train_config
from trainmetrics.trainer.outcome import bad_input, launched_rank
from trainmetrics.trainer.stopping import StopFlag


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the train flags (imports nothing heavy)."""
    train_config.configure(parser)


def rank_tag(environ=os.environ) -> str:
    """" rank N" in every log line of a multi-rank job's process (the ranks share one log: their lines were
    alike), "" otherwise."""
    rank = launched_rank(environ)
    return "" if rank is None else f" rank {rank}"


def run(args: argparse.Namespace) -> int:
    """Run the job. The stop signals are caught from here on: a SIGTERM while torch is still importing ends
    the job as cancelled, with its result, like one at any later moment."""
    stop = StopFlag.for_process()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s{rank_tag()}: %(message)s")
    config = train_config.from_args(args)
    try:
        train_config.check_flags(config)        # before torch's import: a bad flag is said at once
    except (ValueError, FlagError) as error:
        return bad_input(config, str(error))
    if importlib.util.find_spec("torch") is None:
        return bad_input(config, "training needs PyTorch: pip install 'trainmetrics[train]'")
    from trainmetrics.trainer.runner import run_job

    return run_job(config, stop)
