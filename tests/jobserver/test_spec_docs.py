"""The job spec is written once (trainmetrics/contract.py): every `trainmetrics train` option is a field of the
API or listed in docs/api.md as deliberately not one, and the docs' tables say exactly that."""

import re
from pathlib import Path

import pytest

from trainmetrics.contract import SPEC_ALIASES, SPEC_EXTRAS, TRAIN_OPTIONS, parse_spec, spec_fields, train_args

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def section() -> str:
    return DOCS.read_text().split("## POST /api/training/jobs\n", 1)[1].split("\n## ", 1)[0]


def test_every_train_option_is_a_field_or_documented_as_not_one():
    text = section()
    fields = set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))
    refused = {flag for row in re.findall(r"^\| (`--[^|]+) \|", text, re.M) for flag in re.findall(r"`(--[a-z.-]+)`", row)}
    assert fields == set(spec_fields()), "the field table and the contract differ"
    assert refused == {o.cli_flag for o in TRAIN_OPTIONS if o.api is not True}, "the refused table and the contract differ"
    covered = {SPEC_ALIASES.get(name, name) for name in fields} | {o.name for o in TRAIN_OPTIONS if o.cli_flag in refused}
    assert covered >= {o.name for o in TRAIN_OPTIONS} | {o.name for o in SPEC_EXTRAS}


def test_a_spec_becomes_the_flags_the_cli_parses_back():
    from trainmetrics.cli import build_parser
    from trainmetrics.trainer.config import from_args

    values = parse_spec({"model": "cnn", "epochs": 7, "lr": 0.5, "eval_every": 3, "workers": 2, "keep_checkpoints": 0,
                         "name": "a b", "peak_flops": 1e12, "device": "cpu"})
    config = from_args(build_parser().parse_args(["train", "--job-id", "x-1", *train_args(values)]))
    assert (config.model, config.epochs, config.lr, config.eval_every, config.workers, config.keep_checkpoints,
            config.job_name, config.peak_flops, config.device) == ("cnn", 7, 0.5, 3, 2, 0, "a b", 1e12, "cpu")


def test_a_value_that_starts_with_a_dash_is_passed_as_that_value():
    from trainmetrics.cli import build_parser
    from trainmetrics.trainer.config import from_args

    values = parse_spec({"target": "--resume", "name": "-x", "dataset": "-data.csv"})
    config = from_args(build_parser().parse_args(["train", "--job-id", "x-1", *train_args(values)]))
    assert (config.target, config.job_name, config.dataset, config.resume) == ("--resume", "-x", "-data.csv", False)


@pytest.mark.parametrize("field", ["lr", "peak_flops", "hang_seconds", "loss_spike_z"])
def test_an_integer_past_every_float_is_refused_as_not_finite(field):
    """`float()` of a 400-digit integer raises OverflowError, which went past the spec check as a 500."""
    from trainmetrics.contract import SpecError

    with pytest.raises(SpecError, match=f"{field}.*finite"):
        parse_spec({field: 10 ** 400})
