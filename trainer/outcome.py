"""How a job ended, told once: the result file the job server reads (atomic, strict JSON) and the `summary`
line on stdout. Imports nothing heavy: a job that cannot even import torch still reports its outcome."""

import logging
import os
import sys
from pathlib import Path

from trainmetrics.contract import RESULT_PUBLISHED, RESULT_STARTED, ExitCode, exit_code_for
from trainmetrics.jobfiles import rank_result_path, strict_json, write_result

log = logging.getLogger("trainmetrics.trainer")


class Outcome:
    """How the job ended, as the summary line and the result file tell it."""

    def __init__(self, config, ranks):
        self.config, self.ranks = config, ranks
        self.state = "failed"
        self.error_type: str | None = None
        self.error: str | None = None
        self.reason: str | None = None       # why the job stopped by itself (a loss spike)

    def result(self, metrics) -> dict:
        """The result: state, exit code, error, the job's figures (strict JSON: no NaN), and whether a scraper
        has read the final state yet (written before the final linger, so rarely: report_linger() tells)."""
        evaluation = metrics.last_evaluation if metrics else None
        # A resumed run that failed before it read the job's totals from its checkpoint does not know them: 0 said
        # that a job which had trained 25 steps had trained none (its series publish none of them either). (A
        # fresh run that failed before its metrics existed trained none.)
        known = metrics.totals_known if metrics is not None else not self.config.resume
        return {"job_id": self.config.job_id, "state": self.state, "exit_code": int(exit_code_for(self.state)),
                "error_type": self.error_type, "error": self.error, "reason": self.reason,
                "steps": (metrics.steps if metrics else 0) if known else None,
                "samples": (metrics.samples if metrics else 0) if known else None,
                "loss": metrics.last_loss if metrics else None,
                "loss_first": metrics.loss_first if metrics else None,
                "loss_min": metrics.loss_min if metrics else None,
                "loss_mean": metrics.loss_sum / metrics.loss_intervals if metrics and metrics.loss_intervals else None,
                "eval_loss_min": metrics.eval_loss_min if metrics else None,
                "eval_accuracy_max": metrics.eval_accuracy_max if metrics else None,
                "eval_loss": evaluation.loss if evaluation else None,
                "eval_accuracy": evaluation.accuracy if evaluation else None,
                "evaluations": (metrics.evaluations.count if metrics else 0) if known else None,
                "checkpoints": (metrics.checkpoints if metrics else 0) if known else None,
                "start_time": metrics.start_time if metrics else None, "end_time": metrics.end_time if metrics else None,
                "rank": self.ranks.rank, "world_size": self.ranks.world_size, "pid": os.getpid(),
                RESULT_PUBLISHED: bool(metrics and metrics.final_state_scraped)}

    def report(self, result: dict) -> None:
        """Write the result file (rank 0's; every other rank its own, beside it, so that a failed job can say
        which rank failed and how) and print the summary line (without RESULT_PUBLISHED: the linger that
        decides it comes after)."""
        self._write(result)
        summary = {name: value for name, value in result.items() if name != RESULT_PUBLISHED}
        # One write, newline included: torchrun runs its ranks unbuffered (PYTHONUNBUFFERED=1) on one shared
        # stdout, where print()'s separate write of the newline let two ranks' lines run into one.
        try:
            if sys.stdout is not None:      # None: started without a stdout at all (`>&-`)
                sys.stdout.write("summary " + strict_json(summary) + "\n")
                sys.stdout.flush()
        except (OSError, ValueError):
            # stdout gone (`| head` that quit, a closed terminal): the job ends as it is, its linger and the
            # removal of its files after this included (the error skipped them and exited 1 with a traceback).
            # The result file has the summary; stdout points nowhere, or the interpreter's flush at exit fails.
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass

    def report_linger(self, result: dict, metrics) -> None:
        """After the final linger: the result file again when a scraper read the final state meanwhile. Written
        first as unread, so that a process killed during its linger leaves the end for the job server to publish
        (a duplicate end beats none: Prometheus down through the linger kept the job `running`, then `vanished`
        in its stored report for good, while the job API said `completed`)."""
        if metrics is not None and metrics.final_state_scraped and not result[RESULT_PUBLISHED]:
            self._write({**result, RESULT_PUBLISHED: True})

    def _write(self, result: dict) -> None:
        """The result file, when one was asked for (a failed write is logged: the job ends as it is)."""
        if self.config.result_file is None:
            return
        path = Path(self.config.result_file)
        if not self.ranks.is_main:
            path = rank_result_path(path, self.ranks.rank)
        try:
            write_result(path, result)
        except OSError as error:
            log.error("job %s: cannot write the result file %s: %s", self.config.job_id, path, error.strerror or error)


def launched_rank(environ=os.environ) -> int | None:
    """This process's rank in a multi-rank job as torchrun tells it (RANK of a WORLD_SIZE over 1), None for a
    single process: read before torch is (distributed.from_environment imports it)."""
    world_size, rank = _whole_number(environ.get("WORLD_SIZE", "1")), _whole_number(environ.get("RANK", "0"))
    return rank if world_size is not None and world_size > 1 and rank is not None and rank >= 0 else None


def _whole_number(text: str) -> int | None:
    """The number int() reads in the text, as distributed.from_environment reads it, or None (str.isdigit let
    "²" through to int(): a traceback before the job's one line naming the variable)."""
    try:
        return int(text)
    except ValueError:
        return None


def bad_input(config, message: str) -> int:
    """One line on stderr, the result file when asked for (another rank's beside rank 0's, as report() writes
    it: a rank that refused its arguments wrote over rank 0's result), exit 2."""
    print(f"trainmetrics train: error: {message}", file=sys.stderr, flush=True)
    if config.result_file is not None:
        path, rank = Path(config.result_file), launched_rank()
        if rank:
            path = rank_result_path(path, rank)
        try:
            write_result(path, {
                "job_id": config.job_id, "state": "failed", "exit_code": int(ExitCode.BAD_INPUT),
                "error_type": "BadInput", "error": message[:500], RESULT_PUBLISHED: False,     # (before any series)
                RESULT_STARTED: False})
        except OSError:
            pass
    return ExitCode.BAD_INPUT
