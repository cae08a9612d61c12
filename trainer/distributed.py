"""Multi-process jobs under torchrun: one process per rank, DistributedDataParallel, one job id.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a job is a single process and nothing here
does anything. Collectives run on NCCL for CUDA and gloo on the CPU; stop requests (pause, cancel) are
agreed on over a separate gloo group, so the check never synchronises the GPU.
"""

import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from trainmetrics.command import parse_listen

# How often a rank waiting for the others to join checks for a stop signal.
JOIN_POLL_SECONDS = 0.1
# Ranks agree on a stop request every this many steps: a collective per step would cost ~0.1 ms each.
STOP_CHECK_EVERY = 10
_OUTCOME_CODES = {None: 0, "paused": 1, "cancelled": 2}     # MAX across ranks: cancel beats pause


@dataclass
class Distributed:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control_group: object = None

    @property
    def enabled(self) -> bool:
        """True for a multi-process job."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, evaluates and publishes the job's lifecycle."""
        return self.rank == 0


def from_environment() -> Distributed:
    """The rank layout torchrun gave this process (a single process without torchrun); ValueError naming the
    variables when they are no layout (a RANK past WORLD_SIZE: the job's rank 0 would publish nothing)."""
    values = {}
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        text = os.environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not a whole number") from None
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise ValueError(f"RANK={values['RANK']} is not one of the ranks of WORLD_SIZE={values['WORLD_SIZE']}")
    if values["LOCAL_RANK"] < 0:
        raise ValueError(f"LOCAL_RANK={values['LOCAL_RANK']} is negative")
    return Distributed(rank=values["RANK"], world_size=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"])


def rank_listen(listen: str, local_rank: int) -> str:
    """The address a rank serves /metrics on: a fixed port is local rank 0's, each next local rank's the port after
    it (every rank bound the one port: all but one failed, and the others hung in the process group's start until
    torchrun killed them, their file_sd targets left behind); port 0 stays (a free one each)."""
    host, port = parse_listen(listen)
    if port == 0 or local_rank == 0:
        return listen
    if port + local_rank > 65535:
        raise ValueError(f"--metrics-listen {listen}: local rank {local_rank} would serve on port "
                         f"{port + local_rank}, past 65535")
    return f"[{host}]:{port + local_rank}" if ":" in host else f"{host}:{port + local_rank}"


def rank_device(ctx: Distributed, device: torch.device) -> torch.device:
    """Each rank of a CUDA job takes the GPU of its local rank."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def initialize(ctx: Distributed, device: torch.device, stopped: Callable[[], bool] = lambda: False) -> bool:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and open the gloo control group; False when
    `stopped()` came true first (a stop signal while the other ranks had not joined).

    The join waits in C++ for every rank (up to the process group's 30 minutes), and Python runs no signal handler
    until it returns: a rank waiting there ignored SIGTERM and Ctrl-C (a peer's node not up yet; torchrun ending
    the job after another rank failed to start), and ended killed, with no result, its target file left behind.
    So it waits on a thread of its own, the main thread handling signals; a rank stopped then leaves that thread
    waiting (a daemon: the process exits past it)."""
    if not ctx.enabled:
        return True
    if device.type == "cuda":
        torch.cuda.set_device(device)
    failure: list[BaseException] = []

    def join() -> None:
        try:
            if device.type == "cuda":       # (the current device is the thread's own)
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            ctx.control_group = dist.new_group(backend="gloo")
        except BaseException as error:
            failure.append(error)

    joining = threading.Thread(target=join, name="trainmetrics-join", daemon=True)
    joining.start()
    while joining.is_alive():
        if stopped():
            return False
        joining.join(JOIN_POLL_SECONDS)
    if failure:
        raise failure[0]
    return True


def agree_on_stop(ctx: Distributed, local_outcome: str | None,
                  keep_last_checkpoint: bool = False) -> tuple[str | None, int | None]:
    """The stop every rank takes at this step: the strongest request any rank received (or None), and the
    highest rank that asked to stop without a new checkpoint (a loss spike), or None. Every rank must take
    both: a rank that wrote a checkpoint while another did not would wait for it in the gather forever."""
    if not ctx.enabled:
        return local_outcome, ctx.rank if keep_last_checkpoint else None
    flags = torch.tensor([_OUTCOME_CODES[local_outcome], ctx.rank + 1 if keep_last_checkpoint else 0],
                         dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=ctx.control_group)
    outcome, keeping = (int(flag) for flag in flags.tolist())
    return {code: name for name, code in _OUTCOME_CODES.items()}[outcome], keeping - 1 if keeping else None


def check_same_data(ctx: Distributed, rows: int, digest: str) -> None:
    """Raise ValueError, on every rank alike, unless every rank loaded the same training data (`rows` in its
    training split, `digest` its fingerprint). Ranks of other data (another copy of the file on each node) took
    shares of other lengths: the rank with fewer batches ended its epoch and waited for the others at its
    evaluation while they waited for it in a gradient all-reduce, and the job hung until the process group's
    timeout (30 minutes), deaf to a cancel (every rank stuck in a collective)."""
    said = gather_objects(ctx, (rows, digest))
    if len(set(said)) > 1:
        loaded = ", ".join(f"rank {rank}: {rows} training rows, digest {digest[:12]}"
                           for rank, (rows, digest) in enumerate(said))
        raise ValueError(f"the ranks loaded different data ({loaded}): every rank must load the same "
                         "--dataset (the same file on every node)")


def check_same_checkpoint(ctx: Distributed, step: int | None, failure: str | None) -> None:
    """Raise ValueError, on every rank alike, unless every rank found the same checkpoint to resume from (`step`,
    None for none) or failed alike (`failure`: why none of its checkpoints loads, or why it could not read them).
    Each rank reads the checkpoint directory itself: one that found another (a --checkpoint-dir local to each node,
    rank 0's checkpoints on its node alone; a network filesystem's stale listing, without the newest) trained on
    from other weights and another place in the data, rank 1 silently from step 0, their collectives out of step
    until the job hung (the process group's 30 minutes)."""
    said = gather_objects(ctx, (step, failure))
    if len(set(said)) > 1:
        found = ", ".join(f"rank {rank}: {_found(*found)}" for rank, found in enumerate(said))
        raise ValueError(f"the ranks found different checkpoints to resume from ({found}): every rank must read "
                         "the same --checkpoint-dir (one filesystem shared by every node)")


def _found(step: int | None, failure: str | None) -> str:
    """What one rank found to resume from, in a few words."""
    if failure is not None:
        return f"none it could load ({failure[:200]})"
    return "none" if step is None else f"step {step}"


def gather_objects(ctx: Distributed, value) -> list:
    """Every rank's `value`, in rank order (on the gloo control group; every rank must call it)."""
    if not ctx.enabled:
        return [value]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, value, group=ctx.control_group)
    return gathered


class RankZeroFailed(Exception):
    """What rank 0 did for every rank (a checkpoint write, an evaluation) failed: the other ranks end with its
    cause (Trainer.on_rank_0)."""


def barrier(ctx: Distributed) -> None:
    """Wait until every rank is here (on the gloo control group; every rank must call it)."""
    if ctx.enabled:
        dist.barrier(group=ctx.control_group)


def mark_collectives(model, phases) -> None:
    """Count the time a rank waits in DDP's gradient all-reduce as the `collective` phase: a communication hook
    enters it when the last bucket goes out, once the rank's backward has computed every gradient (the loop
    marks `optimizer` once backward returns). A rank that waits for a stuck peer then shows `collective`, and
    the peer the phase it is stuck in."""
    from trainmetrics.trainer.phases import COLLECTIVE

    def all_reduce(state, bucket):
        # Not at the first bucket: DDP sends it (1 MiB) early in backward, and the rest of the rank's backward,
        # a slow or stuck one too, was booked as waiting for its peers.
        if bucket.is_last() and phases.phase != COLLECTIVE:
            phases.enter(COLLECTIVE)
        tensor = bucket.buffer()
        tensor.div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda future: future.value()[0])

    model.register_comm_hook(None, all_reduce)


def shutdown(ctx: Distributed) -> None:
    """Leave the process group."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
