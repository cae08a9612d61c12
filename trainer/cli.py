"""`trainmetrics train`: one job in the foreground."""

import argparse
import importlib.util
import logging
import os

from trainmetrics.command import FlagError
from trainmetrics.trainer import config as train_config
from trainmetrics.trainer.outcome import bad_input, launched_rank
from trainmetrics.trainer.stopping import StopFlag


# The [train] extra's packages, by import name: torch for every job, scikit-learn for the digits dataset, tqdm for
# --progress. A check of torch alone let the core package with a user's own torch through, and `--dataset digits`
# then failed the job at its start with a ModuleNotFoundError traceback.
TRAIN_EXTRA = {"torch": "PyTorch", "sklearn": "scikit-learn", "tqdm": "tqdm"}


def missing_training_packages() -> list[str]:
    """The [train] extra's packages that are not installed, named as their projects name themselves."""
    return [name for module, name in TRAIN_EXTRA.items() if importlib.util.find_spec(module) is None]


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
    missing = missing_training_packages()
    if missing:
        return bad_input(config, f"training needs {', '.join(missing)}: pip install 'trainmetrics[train]'")
    from trainmetrics.trainer.runner import run_job

    return run_job(config, stop)
