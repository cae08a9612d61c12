"""The built-in training loop: real PyTorch training, instrumented through JobMetrics.

Exit codes (trainmetrics.contract.ExitCode): 0 completed, 1 failed, 2 bad input (nothing left behind),
3 cancelled (SIGINT/SIGTERM/SIGHUP), 4 paused (SIGUSR1, the job server's pause); both stops write a checkpoint at
the next step boundary. With --result-file the outcome is also written there, atomically, as JSON.
"""

import importlib
import inspect
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from trainmetrics.command import FlagError
from trainmetrics.contract import STOP_VERBS, exit_code_for
from trainmetrics.datafiles import EVAL_BATCH_SIZE, DatasetError, regression_target_problem
from trainmetrics.jobfiles import ClaimedElsewhere, claim, unclaim
from trainmetrics.jobmap import host_gpu
from trainmetrics.trainer import distributed, faults
from trainmetrics.trainer.checkpoint import (FINAL_MODEL_NAME, atomic_save, ensure_writable_dir, list_checkpoints,
                                             load_latest, save_checkpoint)
from trainmetrics.trainer.config import TrainConfig, check_flags, made_up_job_id
from trainmetrics.trainer.data import Dataset, load_dataset
from trainmetrics.trainer.metrics import Diagnostics, IntervalStats, JobInfo, JobMetrics
from trainmetrics.trainer.phases import CHECKPOINT, COLLECTIVE, EVAL, OPTIMIZER
from trainmetrics.trainer.models import ModelError, build_model, device_peak_flops
from trainmetrics.trainer.outcome import Outcome, bad_input
from trainmetrics.trainer.stopping import StopFlag
from trainmetrics.trainer.telemetry import Publish
from trainmetrics.webconfig import load_web_config

log = logging.getLogger("trainmetrics.trainer")


class BadInput(Exception):
    """A problem with the job's input or environment, reported in one line with exit code 2."""


def resolve_device(requested: str) -> torch.device:
    """auto → cuda when available, else cpu; an unavailable cuda request is bad input."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInput(f"--device {requested}: CUDA is not available on this machine")
        device = torch.device(requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInput(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    return torch.device(requested)


def physical_gpus(device: torch.device) -> list[int | str]:
    """The job's GPU for its mapping file, as the host's NVML knows it: a host index, else a UUID (torch's
    numbering is remapped by CUDA_VISIBLE_DEVICES, and in a container by NVIDIA_VISIBLE_DEVICES)."""
    if device.type != "cuda":
        return []
    index = device.index if device.index is not None else torch.cuda.current_device()
    cuda_visible, nvidia_visible = os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("NVIDIA_VISIBLE_DEVICES")
    gpu = host_gpu(index, cuda_visible, nvidia_visible)
    if gpu is None:     # better no GPU declared than another job's: the exporter still finds the job's processes
        log.warning("cuda:%d names no host GPU index or UUID by CUDA_VISIBLE_DEVICES=%r, NVIDIA_VISIBLE_DEVICES=%r: "
                    "the job mapping declares no GPU", index, cuda_visible, nvidia_visible)
        return []
    return [gpu]


# What restore() reads of every checkpoint, in the order it reads them: a file under a checkpoint's name without one
# of them (the final weights saved there) is none to resume from.
RESTORED_KEYS = ("step", "samples", "epoch", "batch_in_epoch", "model", "optimizer")


# DDP's "no buffer sync at each forward": torch 2.13 deprecates broadcast_buffers=False for this (a FutureWarning in
# every multi-rank job's log); older torch, within [train]'s range, has no forward_sync_buffers.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


class Trainer:
    """One job: data, model, optimizer, checkpoints and the loop."""

    def __init__(self, config: TrainConfig, dataset: Dataset, model: nn.Module, device: torch.device,
                 metrics: JobMetrics, stop: StopFlag, dist: distributed.Distributed | None = None):
        self.config, self.dataset, self.device, self.metrics, self.stop = config, dataset, device, metrics, stop
        self.dist = dist or distributed.Distributed()
        self.net = model.to(device)          # the bare module: checkpoints, evaluation
        self.model = self.net                # what the loop calls: DDP-wrapped in a multi-process job
        if self.dist.enabled:
            # No buffer broadcast at each forward (one at the start, as DDP syncs its parameters, is harmless): the
            # models' buffers (the MLP's input and target scales) are fit on the whole training split, the same on
            # every rank, and never change; broadcast at every forward, they put a collective inside it, where a
            # rank waiting for a slow peer read as `compute`, not `collective`.
            self.model = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None, **NO_BUFFER_SYNC)
            distributed.mark_collectives(self.model, metrics.phases)
        self.faults = faults.from_environment(self.dist.rank, config.job_id)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr)
        self.loss_fn = nn.CrossEntropyLoss() if dataset.task != "regression" else nn.MSELoss()
        self.epoch = 0
        self.batch_in_epoch = 0
        self.eval_accuracy: float | None = None
        self.eval_loss: float | None = None

    # ----- checkpoints -------------------------------------------------------------------------------
    def state(self, metrics_by_rank: list[dict]) -> dict:
        """A weights-only checkpoint: model, optimizer, the exact position in the data and every rank's
        metrics state (this checkpoint counted in, as it will have been written when a resume reads it)."""
        # In rank 0's alone: it writes the checkpoint, the other ranks count none (trainer_checkpoints_total).
        metrics_by_rank[0]["checkpoints"] += 1
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.metrics.steps, "samples": self.metrics.samples, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "batch_size": self.config.batch_size,
                "job_id": self.config.job_id, "model_name": self.config.model, "dataset": self.dataset.name,
                "dataset_digest": self.dataset.digest, "seed": self.config.seed, "metrics_by_rank": metrics_by_rank}

    def foreign(self, state: dict) -> str | None:
        """Why a checkpoint is not this job's to resume from (another job's, or another model's: its weights
        would not load, or would be the other job's; one without what restore() reads), or None. A checkpoint from
        before the job_id and model_name keys: the job's, if its weights fit this model. Said before restore() takes
        anything of it, so the resume falls back to the checkpoint before it, as from a damaged one: restore()
        failed the job (`KeyError: 'step'`, torch's many-line size mismatch), the counters already taken."""
        missing = [key for key in RESTORED_KEYS if key not in state]
        if missing:
            return f"it has no {', '.join(map(repr, missing))}"
        # Refused, the metrics state took none of its counters: the run went on at the checkpoint's position in the
        # data from step 0, and wrote its next checkpoints under steps the older ones already held.
        for key in ("epoch", "batch_in_epoch"):     # (one that is not failed the job, its weights already taken)
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                return f"its {key} is {str(state[key])[:40]!r}, not a whole number >= 0"
        by_rank = state.get("metrics_by_rank")     # (none: a checkpoint from before the ranks' states)
        if by_rank and not isinstance(by_rank, (list, tuple)):     # (one that is not failed the job: no len(), [0])
            return f"its metrics_by_rank is {str(by_rank)[:40]}, not a list of states"
        # Every rank's, not this rank's alone: ranks that took different checkpoints would train on from different
        # places in the data.
        for rank in range(self.dist.world_size):
            refusal = self.metrics.refusal(self._carried_metrics(state, rank))
            if refusal is not None:
                whose = f"rank {rank}'s" if self.dist.world_size > 1 else "its"
                return f"{whose} metrics state is none ({refusal})"
        for key, own in (("job_id", self.config.job_id), ("model_name", self.config.model)):
            if key == "job_id" and self.config.job_id_made_up:     # no --job-id: any job id is this job's
                continue
            if key in state and state[key] != own:
                return f"its {key} is {str(state[key])[:80]!r}, not {own!r}"
        return self._misfit(state)

    def _carried_metrics(self, state: dict, rank: int | None = None) -> dict:
        """A rank's metrics state in a checkpoint (this rank's by default), with the job's steps and samples (the
        states are not counted here: at another world size restore() refuses the checkpoint, naming the nproc to
        resume with)."""
        rank = self.dist.rank if rank is None else rank
        by_rank = state.get("metrics_by_rank") or []
        if len(by_rank) != self.dist.world_size:
            by_rank = []
        own = by_rank[rank] if by_rank else {"checkpoints": 1 if rank == 0 else 0}
        if not isinstance(own, dict):
            return own      # no state: refused as one
        return {**own, "steps": state["step"], "samples": state["samples"]}

    def _misfit(self, state: dict) -> str | None:
        """Why a checkpoint's weights do not load into this model (as strictly as restore() loads them), or None.
        Weights of other data do not fit either: restore() refuses those, naming the --dataset to resume with."""
        if any(state.get(key) not in (None, own) for key, own in (("dataset", self.dataset.name),
                                                                 ("dataset_digest", self.dataset.digest))):
            return None
        weights, own_weights = state["model"], self.net.state_dict()
        if not isinstance(weights, dict) or set(weights) != set(own_weights):
            return "its model weights are another model's (other parameter names)"
        for name, tensor in own_weights.items():
            if not isinstance(weights[name], torch.Tensor) or weights[name].shape != tensor.shape:
                shape = list(weights[name].shape) if isinstance(weights[name], torch.Tensor) else "none"
                return f"its model weight {name} has shape {shape}, not {list(tensor.shape)}"
        return None

    def latest_checkpoint(self) -> dict | None:
        """The newest checkpoint of the job's to resume from (load_latest), the same one on every rank (each reads
        the directory itself): ValueError on every rank alike when they found others."""
        try:
            state = load_latest(self.config.checkpoint_dir, map_location=self.device, foreign=self.foreign)
        except Exception as error:
            if not self.dist.enabled:
                raise
            # Said to the other ranks before it is raised: they would wait for this one in the check forever.
            distributed.check_same_checkpoint(self.dist, None, f"{type(error).__name__}: {error}")
            raise
        distributed.check_same_checkpoint(self.dist, None if state is None else state["step"], None)
        return state

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint: weights, optimizer, counters and data position, and this rank's own
        metrics state (its losses, evaluations and phases are its own).

        The metrics first: the job's totals up to the checkpoint hold whether or not the weights then load (a
        checkpoint of another model fails here), so a run that fails its restore still publishes the job's
        counters and phase seconds, its own init and restore counted in."""
        by_rank = state.get("metrics_by_rank") or []
        if by_rank and len(by_rank) != self.dist.world_size:
            # Each rank's position counts batches of its own shard, and each rank's counters its own samples:
            # at another world size an epoch's rest went untrained (or trained twice), samples were counted that
            # no rank trained, and the first run's evaluations were lost. Refused, as another batch size is.
            raise ValueError(f"the checkpoint was written by {len(by_rank)} process(es) and this run has "
                             f"{self.dist.world_size}: each one's position and counts are its own shard's; "
                             f"resume with {len(by_rank)} (torchrun --nproc-per-node {len(by_rank)}, or nproc)")
        self.metrics.load_state_dict(self._carried_metrics(state))
        # Its position in the data counts batches of that size, of that data, in that shuffle: another would train
        # some samples twice and skip others (another dataset of 7 batches an epoch skipped its first epoch whole).
        for key, flag, this_run, what in (("batch_size", "--batch-size", self.config.batch_size, "size"),
                                          ("dataset", "--dataset", self.dataset.name, "dataset"),
                                          ("seed", "--seed", self.config.seed, "shuffle")):
            written_with = state.get(key)
            if written_with is not None and written_with != this_run:
                raise ValueError(f"the checkpoint was written with {flag} {written_with}: its position (batch "
                                 f"{state.get('batch_in_epoch')} of epoch {state.get('epoch')}) counts batches of "
                                 f"that {what}; resume with {flag} {written_with}")
        # The name is a file's stem: another data.csv, this one changed, or another --target of it, was resumed at
        # the old position in a shuffle of other data, its held-out split drawn anew from what had been trained on.
        written_digest = state.get("dataset_digest")
        if written_digest is not None and written_digest != self.dataset.digest:
            raise ValueError(f"the checkpoint was written with other data under the dataset name "
                             f"{self.dataset.name!r} (another file of that name, the file changed since, or another "
                             f"--target): its position (batch {state.get('batch_in_epoch')} of epoch "
                             f"{state.get('epoch')}) counts batches of that data; resume with the data it was "
                             "written with")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        kept = self.optimizer.param_groups[0]["lr"]
        if kept != self.config.lr:
            log.warning("job %s: the checkpoint's learning rate %g goes on (the optimizer's state), not --lr %g",
                        self.config.job_id, kept, self.config.lr)
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        log.info("job %s: resumed at step %d (epoch %d, batch %d)", self.config.job_id, self.metrics.steps,
                 self.epoch, self.batch_in_epoch)
        if (self.epoch, self.batch_in_epoch) > (self.config.epochs, 0):
            # A run of more epochs wrote it: the job "completed" at once, past its --epochs, and said nothing.
            log.warning("job %s: the checkpoint is past --epochs %d (epoch %d, batch %d): nothing is left to train "
                        "and its weights are the final model", self.config.job_id, self.config.epochs, self.epoch,
                        self.batch_in_epoch)

    def checkpoint(self) -> bool:
        """Write a checkpoint when a checkpoint dir is configured: every rank ends its log interval there (so
        the checkpoint holds every loss up to its step) and hands its metrics state to rank 0, which writes.

        False, and nothing written, when a job that pauses on loss spikes finds one (on any rank) in the
        interval just ended: its last checkpoint stays the one from before the spike."""
        if self.config.checkpoint_dir is None:
            return True
        self.metrics.end_interval()
        if self.spike_keeps_the_last_checkpoint():
            return False
        with self.metrics.phase(COLLECTIVE):        # a rank waiting here for a stuck peer is in a collective
            metrics_by_rank = distributed.gather_objects(self.dist, self.metrics.state_dict())

        def write() -> None:
            with self.metrics.checkpoint():
                save_checkpoint(self.config.checkpoint_dir, self.state(metrics_by_rank),
                                keep=self.config.keep_checkpoints)
                if self.faults is not None:
                    self.faults.during_checkpoint()

        self.on_rank_0(write, CHECKPOINT)
        return True

    def spike_keeps_the_last_checkpoint(self) -> bool:
        """Whether a rank stops for a loss spike without a new checkpoint; every rank learns it here (each must
        write its part of a checkpoint or none), and takes the stop."""
        if self.dist.enabled and self.config.on_loss_spike == "pause":
            self.agree_on_stop()
        return self.stop.keep_last_checkpoint

    def agree_on_stop(self) -> str | None:
        """Every rank's stop at this step: the strongest any rank asked for, a loss spike on any rank keeping the
        last checkpoint (and being the job's reason: it was lost on the ranks that stopped for another's spike
        at the regular stop check). Waited for as `collective`: a rank waiting here for a stuck peer showed
        `compute`, and TrainerRankStuck, which looks for the ranks in `collective`, named no one."""
        with self.metrics.phase(COLLECTIVE):
            outcome, keeping_rank = distributed.agree_on_stop(self.dist, self.stop.outcome,
                                                              self.stop.keep_last_checkpoint)
        if keeping_rank is not None:
            if not self.stop.keep_last_checkpoint:
                self.stop.keep_last_checkpoint = True
                self.stop.reason = f"loss spike on rank {keeping_rank}"
            self.stop.outcome = outcome
        return outcome

    def on_rank_0(self, work: Callable[[], None], phase: str) -> None:
        """Rank 0 does `work`; the other ranks wait for it at a barrier, in `phase`. Without the barrier they
        would wait in the next step's all-reduce: that step's time would hold rank 0's work, and the hang
        watchdog, the hang alerts and the per-rank phases would take it for a collective that does not finish.
        Rank 0 waits there for the others as `collective`: in `compute`, a peer stuck after the step's all-reduce
        (in its optimizer) was named by no TrainerRankStuck, and rank 0 read as the rank stuck in its loop.

        Rank 0 says there whether its work failed, and the other ranks then fail with its cause (RankZeroFailed):
        they went on to the next step's all-reduce and failed there once rank 0 had exited (after its final
        linger, up to 15 s), with gloo's "Connection closed by peer" for their error."""
        if not self.dist.is_main:
            with self.metrics.phase(phase):
                failure = distributed.gather_objects(self.dist, None)[0]
            if failure is not None:
                raise distributed.RankZeroFailed(f"rank 0's {phase} failed: {failure}")
            return
        failure = "interrupted"
        try:
            work()
            failure = None
        except Exception as error:
            failure = f"{type(error).__name__}: {error}"[:300]
            raise
        finally:
            with self.metrics.phase(COLLECTIVE):
                distributed.gather_objects(self.dist, failure)

    # ----- the loop ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start training once every rank is ready: each waits for its own first scrape, then for the other
        ranks. Without the meeting the first rank ready would wait for the last in its first step's all-reduce,
        counted as `collective` (step time); it is start-up, `init`, as the waits for the scrapes are. A stop
        requested meanwhile ends the scrape wait; the ranks agree on it in the loop."""
        if self.faults is not None:
            self.faults.before_start()
        self.metrics.wait_for_first_scrape(give_up=lambda: bool(self.stop))
        distributed.barrier(self.dist)
        self.metrics.start()

    def epoch_order(self, epoch: int) -> list[int]:
        """The epoch's sample order: a fixed function of seed and epoch, so a resume continues exactly."""
        # Modulo 2**64, torch's seed range: the same seed as before wherever it fitted, and no overflow for a
        # large --seed (2**64 - 1 is allowed).
        generator = torch.Generator().manual_seed((self.config.seed * 100_003 + epoch) % 2**64)
        return torch.randperm(len(self.dataset.train), generator=generator).tolist()

    def batches(self, epoch: int, skip_batches: int):
        """The epoch's DataLoader for this rank, starting `skip_batches` batches in (without loading the
        skipped ones). Ranks take interleaved, equal shares of the order, so they step in lockstep
        (steps_per_epoch() counts the batches this gives)."""
        order = self.epoch_order(epoch)
        world = self.dist.world_size
        order = order[: len(order) - len(order) % world][self.dist.rank::world]
        order = order[skip_batches * self.config.batch_size:]
        loader = DataLoader(self.dataset.train, batch_size=self.config.batch_size, sampler=order,
                            num_workers=self.config.workers, pin_memory=self.device.type == "cuda")
        if self.faults is not None and self.faults.slow_data:      # a drill: data that arrives late
            return _slowed(loader, self.faults)
        return loader

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Task loss; language models flatten (batch, time) into one axis."""
        if self.dataset.task == "language":
            return self.loss_fn(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
        return self.loss_fn(outputs, targets)

    def run(self) -> str:
        """Train to the end or until stopped; returns completed, cancelled or paused."""
        config, metrics = self.config, self.metrics
        metrics.set_learning_rate(self.optimizer.param_groups[0]["lr"])     # a resumed run's: the checkpoint's
        while self.epoch < config.epochs:
            metrics.set_epoch(self.epoch)
            self.model.train()
            for inputs, targets in metrics.timed(self.batches(self.epoch, self.batch_in_epoch)):
                inputs = inputs.to(self.device, non_blocking=True)
                targets = targets.to(self.device, non_blocking=True)
                if self.faults is not None:
                    self.faults.before_forward(metrics.steps + 1, lambda: bool(self.stop))
                    inputs = self.faults.corrupt(inputs, metrics.steps + 1)
                loss = self.loss(self.model(inputs), targets)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                metrics.phases.enter(OPTIMIZER)
                self.optimizer.step()
                self.batch_in_epoch += 1
                metrics.step(loss=loss, samples=len(inputs))
                checkpoint_due = bool(config.checkpoint_every) and metrics.steps % config.checkpoint_every == 0
                # Decided before a checkpoint is written: one after a loss spike would hold its weights.
                outcome = self.stop_outcome(checkpoint_due)
                if outcome and self.stop.keep_last_checkpoint:     # the last checkpoint is from before the spike
                    return self.stopped_for_spike(outcome)
                # The evaluation due at this step comes first: a checkpoint of step N holds it, as a resume
                # from that checkpoint starts at step N + 1 and would never run it again.
                if self.evaluation_due(metrics.steps):
                    self.evaluate()
                    self.model.train()
                if outcome:
                    log.info("job %s: %s requested, %s at step %d", config.job_id, STOP_VERBS[outcome],
                             "checkpointing and stopping" if config.checkpoint_dir else
                             "stopping (no --checkpoint-dir: nothing to resume from)", metrics.steps)
                    if not self.checkpoint():
                        return self.stopped_for_spike()
                    # A cancel during a pause's checkpoint overrides it (StopFlag), as on the job server; ranks
                    # keep the outcome they agreed on.
                    return self.stop.outcome if self.dist.world_size == 1 and self.stop.outcome else outcome
                if checkpoint_due and not self.checkpoint():
                    return self.stopped_for_spike()
            self.epoch += 1
            self.batch_in_epoch = 0
            if not self.evaluation_due(metrics.steps):      # that one ran after the step (before a checkpoint)
                self.evaluate()
            if not config.checkpoint_every and not self.checkpoint():
                return self.stopped_for_spike()
        if config.checkpoint_dir is not None:
            # The steps since the last checkpoint: a spike among them keeps the final model from being written.
            metrics.end_interval()
            if self.spike_keeps_the_last_checkpoint():
                return self.stopped_for_spike()
            if self.dist.is_main:
                with metrics.phase(CHECKPOINT):     # a write, as a checkpoint's: not a hang, not compute
                    atomic_save(self.net.state_dict(), Path(config.checkpoint_dir) / FINAL_MODEL_NAME)
        return "completed"

    def stopped_for_spike(self, outcome: str | None = None) -> str:
        """The stop a loss spike ends the run with, no checkpoint written after it (`outcome`: the one the
        ranks agreed on, else this rank's)."""
        outcome = outcome or self.stop.outcome or "paused"
        log.info("job %s: %s at step %d without a checkpoint: %s", self.config.job_id, STOP_VERBS[outcome],
                 self.metrics.steps, self.stop.reason)
        return outcome

    def stop_outcome(self, checkpoint_due: bool = False) -> str | None:
        """"paused" or "cancelled" when this step is where the job stops (every rank at the same step: ranks
        agree every STOP_CHECK_EVERY steps and before each checkpoint)."""
        if not self.dist.enabled:
            return self.stop.outcome
        if self.metrics.steps % distributed.STOP_CHECK_EVERY and not checkpoint_due:
            return None
        return self.agree_on_stop()

    def evaluation_due(self, step: int) -> bool:
        """True when --eval-every evaluates after `step`. The evaluation at an epoch's end is skipped then: it
        ran twice at that step (twice the cost, listed twice); every rank decides alike, and so does a run that
        resumed from that step's checkpoint, where it ran before the checkpoint was written."""
        return bool(self.config.eval_every) and step % self.config.eval_every == 0

    def evaluate(self) -> None:
        """Loss and accuracy on the held-out split, published as eval series (by rank 0): the eval phase, in
        which the other ranks wait for it (as for a checkpoint write)."""
        def run() -> None:
            with self.metrics.phase(EVAL), torch.no_grad():
                self._evaluate()
                if self.faults is not None:
                    self.faults.during_eval()

        self.on_rank_0(run, EVAL)

    def _evaluate(self) -> None:
        self.net.eval()
        total_loss, correct, count, predictions = 0.0, 0, 0, 0
        for inputs, targets in DataLoader(self.dataset.eval, batch_size=EVAL_BATCH_SIZE):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            outputs = self.net(inputs)
            total_loss += self.loss(outputs, targets).item() * len(inputs)
            count += len(inputs)
            if self.dataset.task != "regression":
                correct += self._correct(outputs, targets)
                predictions += targets.numel()
        self.eval_loss = total_loss / count
        self.eval_accuracy = correct / predictions if predictions else None
        self.metrics.eval(loss=self.eval_loss, accuracy=self.eval_accuracy)
        log.info("job %s: eval after step %d: loss %.4f%s", self.config.job_id, self.metrics.steps,
                 self.eval_loss, f", accuracy {self.eval_accuracy:.4f}" if self.eval_accuracy is not None else "")

    @staticmethod
    def _correct(outputs: torch.Tensor, targets: torch.Tensor) -> int:
        """Predictions that are right: the highest score is the target's, and no score is NaN. argmax takes a NaN
        for the highest, so a diverged model (every output NaN) "predicted" class 0 throughout: its accuracy was
        class 0's share of the held-out split (0.9 on data nine tenths of class 0), not that nothing was right."""
        answered = ~outputs.isnan().any(dim=-1)
        return int(((outputs.argmax(dim=-1) == targets) & answered).sum().item())


def _slowed(loader, drill: "faults.Faults"):
    """The loader's batches, each after the drill's delay (it counts as data wait, as a slow loader's would)."""
    for batch in loader:
        drill.before_data()
        yield batch


class ProgressReporter:
    """A tqdm bar on a terminal with --progress, plain log lines otherwise."""

    def __init__(self, config: TrainConfig, total_steps: int):
        self.job_id = config.job_id
        self.bar = None
        if config.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc=config.job_id, unit="step", dynamic_ncols=True)

    def __call__(self, stats: IntervalStats) -> None:
        loss = f"{stats.loss:.4f}" if stats.loss is not None else "n/a"
        if self.bar is not None:
            self.bar.update(stats.step - self.bar.n)
            self.bar.set_postfix(loss=loss, samples_per_s=f"{stats.samples_per_second:.0f}")
        else:
            mfu = f" mfu={stats.mfu:.4f}" if stats.mfu is not None else ""
            log.info("job %s: step=%d samples=%d loss=%s samples_per_s=%.1f%s", self.job_id, stats.step,
                     stats.samples, loss, stats.samples_per_second, mfu)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def memory_shortage(error: BaseException) -> str | None:
    """What an allocation that failed says (numpy raises MemoryError, torch's CPU allocator RuntimeError), in one
    line; None for any other error."""
    detail = " ".join(str(error).split())
    if not isinstance(error, MemoryError) and "allocate" not in detail:
        return None
    if "can't allocate" in detail:      # after torch's "[enforce fail at alloc_cpu.cpp:127] err == 0."
        detail = detail[detail.find("can't allocate"):]
    return detail[:200] or "out of memory"


def prepare(config: TrainConfig):
    """Validate everything that can be checked before any file is written; raises BadInput."""
    try:
        check_flags(config)
        device = resolve_device(config.device)
        began = time.monotonic()
        try:
            dataset = load_dataset(config.dataset, target=config.target, seed=config.seed)
        except DatasetError as error:       # named by its flag (--target's say so already)
            message = str(error)
            raise DatasetError(message if message.startswith("--") else f"--dataset: {message}") from None
        except OSError as error:            # a file this user cannot read, a device behind a link: bad input too
            raise DatasetError(f"--dataset: {config.dataset}: cannot be read: {error.strerror or error}") from None
        except (MemoryError, RuntimeError) as error:     # its copies for the splits: a traceback, no result
            shortage = memory_shortage(error)
            if shortage is None:
                raise
            raise DatasetError(f"--dataset: {config.dataset}: too large for this machine's memory ({shortage})"
                               ) from None
        load_seconds = time.monotonic() - began
        check_regression_targets(config, dataset)
        torch.manual_seed(config.seed)   # same seed, same initial weights: runs are reproducible
        try:
            model = build_model(config.model, dataset)
        except (MemoryError, RuntimeError) as error:
            # A model shaped for large samples (a cnn's head on 4000x4000 images takes 32 GB) was a traceback, with
            # no result file and no summary line.
            shortage = memory_shortage(error)
            if shortage is None:
                raise
            raise ModelError(f"--model {config.model}: too large for this machine's memory for {dataset.name!r} "
                             f"samples of shape {dataset.input_shape} ({shortage})") from None
    except (ValueError, DatasetError, ModelError, FlagError) as error:
        raise BadInput(str(error)) from None
    return device, dataset, model, load_seconds


def check_regression_targets(config: TrainConfig, dataset: Dataset) -> None:
    """DatasetError where a regression target's squared error overflows float32 summed over a batch (an untrained
    model answers about 0): the loss was inf from the first step, and the job "completed" on nothing learnt."""
    if dataset.task != "regression":
        return
    # The largest batch it forms (a small file's are its rows: 3 rows of 1e18 were refused for a batch of 512)
    batch = max(min(config.batch_size, len(dataset.train)), min(EVAL_BATCH_SIZE, len(dataset.eval)))
    largest = max(float(part.tensors[1].abs().max()) for part in (dataset.train, dataset.eval))
    if problem := regression_target_problem(largest, batch):
        raise DatasetError(f"--dataset: {config.dataset}: {problem}")


# The lock file (`.checkpoints.lock`) of the one live job writing checkpoints into a directory.
CHECKPOINT_CLAIM = "checkpoints"


class CheckpointDir:
    """A job's checkpoint directory, opened: whether this start created it (to undo on bad input) and the claim
    its writer (rank 0) holds on it while it runs (None: another rank, or a filesystem without locks)."""

    def __init__(self, directory: Path | None = None, created: bool = False, claim_fd: int | None = None):
        self.directory, self.created, self.claim_fd = directory, created, claim_fd

    def release(self) -> None:
        """Give the claim up (at the job's end), so that a later run of it, or another job, may write there."""
        if self.claim_fd is not None:
            unclaim(self.directory, CHECKPOINT_CLAIM, self.claim_fd)
            self.claim_fd = None


def open_checkpoint_dir(config: TrainConfig, writer: bool = True) -> CheckpointDir:
    """Create/verify the checkpoint dir and, for its writer (`writer`: rank 0), claim it for the run."""
    if config.checkpoint_dir is None:
        return CheckpointDir()
    directory = Path(config.checkpoint_dir)
    created = not directory.exists()
    try:
        ensure_writable_dir(directory)
    except OSError as error:
        raise BadInput(f"--checkpoint-dir: {directory} is not writable: {error.strerror or error}") from None
    claim_fd = claim_checkpoint_dir(directory) if writer else None
    found = list_checkpoints(directory)
    if found and not config.resume:
        if claim_fd is not None:
            unclaim(directory, CHECKPOINT_CLAIM, claim_fd)
        # A fresh run there would prune its own new checkpoints first (the older run's are at higher steps),
        # and a later --resume would continue the older run.
        raise BadInput(f"--checkpoint-dir: {directory} holds checkpoints already ({found[-1].path.name} the "
                       "newest): add --resume to continue from them, or give an empty directory")
    return CheckpointDir(directory, created, claim_fd)


def claim_checkpoint_dir(directory: Path) -> int | None:
    """One live job writing checkpoints into a directory. Two jobs started on an empty one (other job ids) both ran:
    each overwrote the other's checkpoints of the same steps and pruned the rest as its own, so the job that finished
    first had none left to resume from, and `model.pt` was whichever ended last."""
    try:
        return claim(directory, CHECKPOINT_CLAIM, f"a job writing its checkpoints to {directory}")
    except ClaimedElsewhere as error:
        raise BadInput(f"--checkpoint-dir: {error}: give each job a directory of its own") from None
    except OSError as error:
        raise BadInput(f"--checkpoint-dir: {directory} is not writable: {error.strerror or error}") from None


def publish_error(config: TrainConfig, error: Exception) -> str:
    """What setting up the job's publication failed on, naming its flag: the job id when a live process runs it
    already, a file the job writes in its targets or job directory (a directory, or a file it cannot replace,
    where its file goes), else serving /metrics."""
    if isinstance(error, ClaimedElsewhere):
        return f"--job-id: {error}"
    detail = error.strerror if isinstance(error, OSError) and error.strerror else error
    names = [Path(name) for name in (getattr(error, "filename", None), getattr(error, "filename2", None)) if name]
    for flag, directory in (("--targets-dir", config.targets_dir), ("--job-dir", config.job_dir)):
        if directory is not None and any(Path(directory) in (name, name.parent) for name in names):
            return f"{flag}: cannot write {names[-1]}: {detail}"
    return f"--metrics-listen: cannot serve metrics on {config.metrics_listen}: {detail}"


def steps_per_epoch(rows: int, world_size: int, batch_size: int) -> int:
    """Optimizer steps in an epoch of `rows` training rows: each rank takes rows // world_size of them (the rest
    left out, so the ranks step in lockstep: Trainer.batches), in batches of batch_size, the last one short."""
    return -(-(rows // world_size) // batch_size)


def run_job(config: TrainConfig, stop: StopFlag | None = None) -> int:
    """Run one job in the foreground; returns the exit code. `stop` was installed at process start."""
    stop = stop if stop is not None else StopFlag.for_process()     # a StopFlag with no stop is falsy
    try:
        device, dataset, model, load_seconds = prepare(config)
    except BadInput as error:
        return bad_input(config, str(error))

    # Before the checkpoint dir is made: refused after it, the rank layout left it behind (bad input leaves nothing).
    try:
        ranks = distributed.from_environment()
    except ValueError as error:
        return bad_input(config, str(error))
    if ranks.enabled and config.job_id_made_up and config.job_id != made_up_job_id():     # not the ranks' shared one
        return bad_input(config, "--job-id: a job of several processes needs one (its ranks cannot agree on a "
                                 "made-up one without torchrun's run id)")
    if len(dataset.train) < ranks.world_size:
        # Each rank takes an equal share, the rows past a multiple of the ranks left out: every rank trained on
        # nothing, and the job "completed" after 0 steps.
        return bad_input(config, f"--dataset: its training split has {len(dataset.train)} row(s), fewer than the "
                                 f"job's {ranks.world_size} processes: no rank would train on anything")
    try:
        checkpoint_dir = open_checkpoint_dir(config, writer=ranks.is_main)
    except BadInput as error:
        return bad_input(config, str(error))
    device = distributed.rank_device(ranks, device)
    total_steps = config.epochs * steps_per_epoch(len(dataset.train), ranks.world_size, config.batch_size)
    progress = ProgressReporter(config, total_steps)
    new_dirs = [Path(d) for d in (config.targets_dir, config.job_dir) if d is not None and not Path(d).exists()]
    # The optimizer's and DDP's constructors import torch._dynamo lazily (1-1.5 s holding the GIL: sympy, onnx, ...):
    # imported before the job's endpoint serves, or every job's scrapes timed out through it; after the checks of
    # the job's input, which refuse bad input that much sooner.
    importlib.import_module("torch._dynamo")
    try:
        web_config = load_web_config(config.web_config_file)
        metrics = JobMetrics(
            config.job_id,
            JobInfo(job_name=config.job_name, model=config.model, dataset=dataset.name, owner=config.owner,
                    device=str(device), task=dataset.task, rank=ranks.rank, world_size=ranks.world_size,
                    upload_seconds=config.upload_seconds if config.upload_seconds is not None else load_seconds,
                    submitted_at=config.submitted_at),
            Publish(listen=distributed.rank_listen(config.metrics_listen, ranks.local_rank),
                    targets_dir=config.targets_dir, job_dir=config.job_dir,
                    gpus=physical_gpus(device), linger_timeout=config.linger_timeout,
                    web_config=web_config, register_url=config.register_url),
            log_every=config.log_every, on_log=progress, resuming=config.resume, flops_per_sample=model.flops_per_sample(),
            peak_flops=config.peak_flops or device_peak_flops(device),
            diagnostics=Diagnostics(
                stacks_dir=config.diagnostics_dir, hang_seconds=config.hang_seconds, loss_spike_z=config.loss_spike_z,
                loss_spike_warmup=config.loss_spike_warmup,
                on_loss_spike=stop.pause_for_loss_spike if config.on_loss_spike == "pause" else None))
    except (OSError, ValueError) as error:
        checkpoint_dir.release()
        if checkpoint_dir.created:
            shutil.rmtree(checkpoint_dir.directory, ignore_errors=True)
        for directory in new_dirs:          # made for the job's files; shared ones are left (rmdir: empty only)
            try:
                directory.rmdir()
            except OSError:
                pass
        return bad_input(config, publish_error(config, error))

    # The address it listens on (a Ray rank: its node's; "127.0.0.1" pointed at the wrong machine).
    log.info("job %s: model=%s dataset=%s task=%s device=%s metrics=%s", config.job_id, config.model, dataset.name,
             dataset.task_said, device, metrics.metrics_url or "-")
    outcome = Outcome(config, ranks)
    trainer = None
    try:
        drill = faults.from_environment(ranks.rank, config.job_id)
        if drill is not None:
            drill.before_joining()
        joined = distributed.initialize(ranks, device, stopped=lambda: bool(stop))
        if joined:
            distributed.check_same_data(ranks, len(dataset.train), dataset.digest)
            trainer = Trainer(config, dataset, model, device, metrics, stop, ranks)
            if config.resume:
                with metrics.phase("restore"):
                    resume_state = trainer.latest_checkpoint()
                    if resume_state is not None:
                        trainer.restore(resume_state)
            trainer.start()
        # A stop before the first step ends a one-process job at once, and a rank stopped while the others had not
        # joined; ranks that joined agree on theirs in the loop.
        final_state = stop.outcome if stop.outcome and not (joined and ranks.enabled) else trainer.run()
        if final_state == "paused":
            metrics.pause()
        else:
            metrics.finish(final_state)
        # The reason is the stop's it caused (a spike found in finish()'s last interval caused none).
        outcome.state, outcome.reason = final_state, stop.reason if final_state == stop.outcome else None
    except Exception as error:   # the job fails; the error class goes to the log, the result and Prometheus
        log.error("job %s failed: %s: %s", config.job_id, type(error).__name__, error)
        outcome.error_type, outcome.error = type(error).__name__, f"{type(error).__name__}: {error}"[:500]
        metrics.finish("failed", error)
    finally:
        checkpoint_dir.release()     # every write is done: not held through the linger for a last scrape
        stop.decided = True
        if stop.hurry:      # before the callback is set: a signal between the two is then not counted twice
            metrics.cut_linger_short()
        stop.on_late_signal = metrics.cut_linger_short
        try:
            progress.close()
        except OSError:       # the terminal gone (closed: SIGHUP, then EIO on every write): the end goes on
            pass
        result = outcome.result(metrics)
        outcome.report(result)
        metrics.close()
        outcome.report_linger(result, metrics)      # whether a scraper read the end: else the server publishes it
        stop.stand_down()
        distributed.shutdown(ranks)
    return exit_code_for(outcome.state)
