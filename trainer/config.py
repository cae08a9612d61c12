"""The training job's configuration: one dataclass, its command-line flags and their validation."""

import argparse
import os
import secrets
import time
from dataclasses import dataclass, fields
from pathlib import Path

# The built-in catalogue, here rather than in models.py/data.py so that `--help` does not import torch.
MODELS = ("mlp", "cnn", "transformer")
BUILTIN_DATASETS = ("blobs", "digits", "corpus")


@dataclass
class TrainConfig:
    """Everything one training job needs; built from the command line or by the job server."""

    job_id: str
    model: str = "mlp"
    dataset: str = "blobs"
    target: str = "label"
    job_name: str | None = None
    owner: str = ""
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: bool = False
    log_every: int = 50
    eval_every: int = 0
    metrics_listen: str | None = "127.0.0.1:0"
    targets_dir: Path | None = None
    job_dir: Path | None = None
    linger_timeout: float = 15.0
    upload_seconds: float | None = None
    peak_flops: float | None = None
    web_config_file: Path | None = None
    progress: bool = False

    def check(self) -> None:
        """Raise ValueError naming the first option out of range."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "log_every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        non_negative = {"checkpoint_every": self.checkpoint_every, "eval_every": self.eval_every,
                        "workers": self.workers, "keep_checkpoints": self.keep_checkpoints,
                        "linger_timeout": self.linger_timeout}
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {value}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")


def default_job_id() -> str:
    """A fresh, valid job id: job-<UTC time>-<random hex>."""
    return f"job-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `trainmetrics train` flags."""
    job = parser.add_argument_group("job")
    job.add_argument("--job-id", default=None,
                     help="job id, ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ (default: job-<time>-<random>)")
    job.add_argument("--job-name", default=None, help="human-readable name (default: the job id)")
    job.add_argument("--owner", default="", help="owner label on trainer_job_info")
    job.add_argument("--model", default="mlp", help=f"one of {', '.join(MODELS)}")
    job.add_argument("--dataset", default="blobs",
                     help=f"built-in ({', '.join(BUILTIN_DATASETS)}) or a path to a .csv, .npz or .txt file")
    job.add_argument("--target", default="label", help="target column of a CSV dataset")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=3)
    training.add_argument("--batch-size", type=int, default=64)
    training.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    training.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    training.add_argument("--eval-every", type=int, default=0,
                          help="evaluate every N steps as well as at each epoch end (0: epoch ends only)")
    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint-dir", type=Path, default=None,
                      help="where checkpoints and the final model.pt go (default: no checkpoints)")
    ckpt.add_argument("--checkpoint-every", type=int, default=0,
                      help="checkpoint every N steps (0: at each epoch end)")
    ckpt.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept (0: all)")
    ckpt.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    telemetry = parser.add_argument_group("telemetry")
    telemetry.add_argument("--log-every", type=int, default=50,
                           help="steps per log interval (loss read, log line, MFU)")
    telemetry.add_argument("--metrics-listen", default="127.0.0.1:0",
                           help="HOST:PORT to serve /metrics on (port 0: pick a free one)")
    telemetry.add_argument("--targets-dir", type=Path, default=_env_path("TRAINMETRICS_TARGETS_DIR"),
                           help="Prometheus file_sd directory to announce the job in "
                                "[env TRAINMETRICS_TARGETS_DIR]")
    telemetry.add_argument("--job-dir", type=Path, default=_env_path("TRAINMETRICS_JOB_DIR"),
                           help="job-mapping directory read by the exporter [env TRAINMETRICS_JOB_DIR]")
    telemetry.add_argument("--linger-timeout", type=float, default=15.0,
                           help="after the end, wait up to this many seconds for Prometheus to scrape the "
                                "final state (only with --targets-dir)")
    telemetry.add_argument("--upload-seconds", type=float, default=None,
                           help="dataset upload time to publish (the job server sets it; default: the load time)")
    telemetry.add_argument("--peak-flops", type=float, default=None,
                           help="device peak FLOP/s for MFU (default: known GPUs only)")
    telemetry.add_argument("--web.config.file", dest="web_config_file", type=Path, default=None,
                           help="TLS and basic auth for /metrics, in Prometheus exporter-toolkit's web-config "
                                "format (the file_sd target then says https)")
    parser.add_argument("--progress", action="store_true", help="progress bar on a terminal (log lines otherwise)")


def from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a TrainConfig from parsed arguments."""
    names = {f.name for f in fields(TrainConfig)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values["job_id"] = values.get("job_id") or default_job_id()
    return TrainConfig(**values)
