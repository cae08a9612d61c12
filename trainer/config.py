"""A training job's configuration: `TrainConfig` and the `trainmetrics train` flags, both made from the
contract's option table (trainmetrics.contract.TRAIN_OPTIONS), so the flags, the job server's spec and the
arguments the job server builds cannot drift apart."""

import argparse
import os
import re
from dataclasses import field, fields, make_dataclass
from pathlib import Path

from trainmetrics.command import (FlagError, check_directory, check_directory_writable, check_writable,
                                  path_argument)
from trainmetrics.contract import TRAIN_OPTIONS, Option, device_for_ranks_problem, new_job_id, validate_job_id
from trainmetrics.webconfig import web_config_flag


def _check(self) -> None:
    """Raise ValueError naming the first option, as its flag, whose value is not allowed."""
    for option in TRAIN_OPTIONS:
        try:
            option.check(getattr(self, option.name))
        except ValueError as error:
            raise ValueError(f"{option.cli_flag}: {error}") from None    # (every command's style: FLAG: why)
    if self.resume and self.checkpoint_dir is None:
        raise ValueError("--resume needs --checkpoint-dir")
    if self.checkpoint_every and self.checkpoint_dir is None:     # taken, no checkpoint was written, unsaid
        raise ValueError("--checkpoint-every needs --checkpoint-dir (without one no checkpoint is written)")


TrainConfig = make_dataclass(
    "TrainConfig",
    [("job_id", str)] + [(option.name, object, field(default=option.default))
                         for option in TRAIN_OPTIONS if option.name != "job_id"],
    namespace={"check": _check,
               # True when no --job-id was given and from_args made one up: a resume then takes any job's
               # checkpoint in the directory as this job's (each run makes up another id).
               "job_id_made_up": False,
               "__doc__": "Everything one training job needs; one field per option of the contract's table."})


def _flag_default(option: Option):
    value = os.environ.get(option.env) if option.env else None
    if value:
        return option.kind(value)
    return option.default


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `trainmetrics train` flags, one per option of the contract, grouped as --help shows them."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in TRAIN_OPTIONS:
        group = groups.get(option.group) or groups.setdefault(option.group, parser.add_argument_group(option.group))
        help_text = option.help + (f" [env {option.env}]" if option.env else "")
        if option.kind is bool:
            group.add_argument(option.cli_flag, dest=option.name, action="store_true", help=help_text)
        else:
            kind = path_argument if option.kind is Path else option.kind
            group.add_argument(option.cli_flag, dest=option.name, type=kind, default=_flag_default(option),
                               help=help_text, metavar=option.name.upper())


def made_up_job_id(environ=os.environ) -> str:
    """The job id of a run given none: a fresh one, or under torchrun (WORLD_SIZE over 1) the one its rendezvous
    run id gives, which every rank shares (each rank made up its own: one job showed as several, its rank 1 with
    no state of its own). A layout with no run id gets a fresh one per rank: the runner refuses it."""
    run_id = environ.get("TORCHELASTIC_RUN_ID", "")
    if environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1") and run_id and run_id != "none":
        shared = "job-" + re.sub(r"[^A-Za-z0-9._-]", "-", run_id)[:60]
        try:
            return validate_job_id(shared)
        except ValueError:
            pass
    return new_job_id()


def from_args(args: argparse.Namespace) -> "TrainConfig":
    """A TrainConfig from parsed arguments (a fresh job id when none was given)."""
    names = {f.name for f in fields(TrainConfig)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    made_up = not values.get("job_id")
    values["job_id"] = values.get("job_id") or made_up_job_id()
    config = TrainConfig(**values)
    config.job_id_made_up = made_up
    return config


# The options naming a directory the job writes into, checked before anything is written: a file in the way is
# bad input naming its flag, not an error blamed on another flag (the target file) or found at the very end
# (the result file).
OUTPUT_DIRECTORIES = ("checkpoint_dir", "targets_dir", "job_dir", "diagnostics_dir")


def check_output_paths(config: TrainConfig) -> None:
    """FlagError unless every output directory is one or can be created, the targets and job-mapping
    directories are two, and the result file's directory exists and takes a file (it is written there,
    atomically, at the end: a job that could not write it trained to the end and exited 0 without it)."""
    flags = {option.name: option.cli_flag for option in TRAIN_OPTIONS}
    for name in OUTPUT_DIRECTORIES:
        if getattr(config, name) is not None:
            check_directory(flags[name], Path(getattr(config, name)))
    if config.diagnostics_dir is not None:
        # The others are written at the start; this one only when a hang's or a signal's stacks are, and an
        # unwritable one lost them then.
        check_directory_writable(flags["diagnostics_dir"], Path(config.diagnostics_dir))
    if config.targets_dir is not None and config.job_dir is not None and \
            Path(config.targets_dir).resolve() == Path(config.job_dir).resolve():
        raise FlagError(flags["job_dir"], f"{str(config.job_dir)!r} is also {flags['targets_dir']}: the two need "
                                          "directories of their own (each holds a JOB_ID.rankN.json)")
    if config.result_file is not None:
        result_file = Path(config.result_file)
        if result_file.is_dir():
            raise FlagError(flags["result_file"], f"{str(result_file)!r} is a directory")
        if not result_file.parent.is_dir():
            raise FlagError(flags["result_file"], f"{str(result_file)!r}: no directory {str(result_file.parent)!r}")
        check_writable(flags["result_file"], result_file, result_file.parent)


def _launcher_count(name: str) -> int:
    """A launcher's count from the environment; 1 when unset or no number (distributed.from_environment names a
    bad WORLD_SIZE; "²" passed str.isdigit and failed int())."""
    text = os.environ.get(name, "1")
    return int(text) if text.isdecimal() else 1


def check_flags(config: TrainConfig) -> None:
    """Every check of the flags that needs neither torch nor the data (ValueError or FlagError naming the flag):
    `trainmetrics train` runs them before it imports torch, so a bad flag is said at once (in 0.2 s, not 1.5 s)."""
    config.check()
    # Gated by WORLD_SIZE, as distributed.rank_device is: a rank of several takes its local rank's GPU, with
    # LOCAL_WORLD_SIZE ranks on its machine (torchrun's; one without it, as Ray's), and a single process the
    # GPU it names, whatever LOCAL_WORLD_SIZE its environment holds.
    problem = device_for_ranks_problem(config.device, _launcher_count("LOCAL_WORLD_SIZE"),
                                       _launcher_count("WORLD_SIZE"))
    if problem:
        raise FlagError("--device", problem)
    check_output_paths(config)
    web_config_flag(config.web_config_file)
    validate_job_id(config.job_id)
