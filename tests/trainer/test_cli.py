"""`trainmetrics train` as a user runs it: bad input, signals, failures, resume."""

import fcntl
import importlib.util
import json
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest

from tests.processes import finish_reading
from trainmetrics.cli import main

from .conftest import parse_summary, run_train, train_command


def bad_csv(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def npz_members(path, extra=(), **arrays) -> None:
    """An NPZ of np.save'd arrays as members `NAME.npy`, then `extra` (name, array) members, duplicates kept."""
    import io
    import warnings
    import zipfile

    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as archive:
        warnings.simplefilter("ignore")     # zipfile warns of a duplicate name: the point
        for name, array in [(f"{name}.npy", array) for name, array in arrays.items()] + list(extra):
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(name, buffer.getvalue())


BAD_INPUTS = {
    "unknown model": (lambda t: ["--model", "resnet9000"],
                      "--model: must be one of mlp, cnn, transformer, got 'resnet9000'"),
    "unknown dataset": (lambda t: ["--dataset", "imagenet"], "--dataset: unknown dataset 'imagenet'"),
    "missing file": (lambda t: ["--dataset", str(t / "nope.csv")], ("--dataset: dataset ", "nope.csv: file not found")),
    # A directory named like a dataset file was "not found" (it is there, and not a file).
    "a directory": (lambda t: ["--dataset", str((t / "d.csv").mkdir() or t / "d.csv")],
                    ("--dataset: dataset ", "d.csv: a directory, not a file")),
    "ragged csv": (lambda t: ["--dataset", bad_csv(t, "r.csv", "a,b,label\n1,2,0\n1,2\n3,4,1\n")],
                   "line 3 has 2 fields, the header has 3"),
    "non-numeric csv": (lambda t: ["--dataset", bad_csv(t, "n.csv", "a,b,label\n1,2,0\n1,x,1\n")],
                        "line 3, column 'b': non-numeric value 'x'"),
    "empty csv": (lambda t: ["--dataset", bad_csv(t, "e.csv", "")], "empty file"),
    # "--dataset: class labels must be non-negative integers": no file, line or column, nor the way out.
    "negative class label": (lambda t: ["--dataset", bad_csv(t, "n.csv", "a,label\n1,0\n2,-1\n3,1\n")],
                             ("--dataset: ", "n.csv: line 3, column 'label': class label -1 is negative (integers "
                                             "are class labels: write -1.0 for a regression target)")),
    "class label too large in an npz": (
        lambda t: (np.savez(t / "y.npz", x=np.ones((4, 2)), y=np.array([0, 1, 20000, 1])),
                   ["--dataset", str(t / "y.npz")])[1],
        ("--dataset: ", "y.npz: y[2]: class label 20000 too large: at most 10000 classes")),
    # Trained to loss 0 and accuracy 1.0 at once, as a target of one class did.
    "corpus of one character": (lambda t: ["--model", "transformer", "--dataset", bad_csv(t, "zeros.txt", "\0" * 400)],
                                ("--dataset: ", "zeros.txt: the corpus is one character, '\\x00', repeated: nothing "
                                                "to predict")),
    # Named by its stem alone ("empty: corpus too short"): which file?
    "corpus too short": (lambda t: ["--model", "transformer", "--dataset", bad_csv(t, "empty.txt", "ab")],
                         ("--dataset: ", "/empty.txt: corpus too short (2 characters")),
    # Its squared error overflowed float32 in a batch: loss inf from the first step, and the job "completed".
    "regression target too large": (lambda t: ["--dataset", bad_csv(t, "big.csv", "a,y\n" + "".join(
        f"{i},{'1e18' if i == 7 else '2.5'}\n" for i in range(3000))), "--target", "y"],
                                    ("--dataset: ", "big.csv: regression targets up to 1e+18: their squared error "
                                                    "overflows float32 in a batch of 512")),
    # Two columns named as the target: the first was taken, unsaid.
    "csv with two target columns": (lambda t: ["--dataset", bad_csv(t, "d.csv", "a,label,label\n1,0,1\n2,1,0\n")],
                                    ("--dataset: ", "2 columns are named 'label'")),
    "csv without label": (lambda t: ["--dataset", bad_csv(t, "l.csv", "a,b\n1,2\n3,4\n")],
                          ("--target: ", "no target column 'label' among its 2 columns (a, b)")),
    # A wide header is named by its first columns and a count, not dumped whole.
    "csv without the target": (lambda t: ["--dataset", bad_csv(t, "w.csv", ",".join(f"f{i}" for i in range(65))
                                                              + ",label\n" + "1," * 65 + "0\n"), "--target", "nosuch"],
                               ("--target: ", "no target column 'nosuch' among its 66 columns (f0, f1, f2, f3, f4, "
                                              "f5, f6, f7, ...)")),
    "npz without y": (lambda t: (np.savez(t / "x.npz", x=np.ones((4, 2))), ["--dataset", str(t / "x.npz")])[1],
                      "missing array(s) ['y']"),
    # Accepted before: np.load took the second x.npy, unsaid (another zip tool may read the first).
    "npz with x twice": (lambda t: (npz_members(t / "twice.npz", x=np.ones((4, 2)), y=np.array([0, 1, 0, 1]),
                                                extra=[("x.npy", np.full((4, 2), 2.0))]),
                                    ["--dataset", str(t / "twice.npz")])[1],
                         ("--dataset: ", "twice.npz: array 'x' is stored twice (members 'x.npy' and 'x.npy')")),
    "npz not a zip": (lambda t: ["--dataset", bad_csv(t, "z.npz", "not a zip")], ("--dataset: ", "not a readable NPZ")),
    # A fresh run pruned its own new checkpoints first (the older run's are at higher steps): refused.
    "checkpoints already there": (lambda t: ((t / "ck").mkdir(), (t / "ck" / "step-000000030.pt").write_bytes(b"x"),
                                             ["--checkpoint-dir", str(t / "ck")])[-1],
                                  ("--checkpoint-dir: ", "holds checkpoints already (step-000000030.pt the newest): "
                                                         "add --resume")),
    # Failed after the job started (a RuntimeError from its pooling), its checkpoint directory left behind.
    "images too small for the cnn": (
        lambda t: (np.savez(t / "tiny.npz", x=np.ones((8, 1, 1, 6), dtype="f4"), y=np.arange(8) % 2),
                   ["--model", "cnn", "--dataset", str(t / "tiny.npz")])[1],
        ("--model cnn: ", "needs images at least 2 pixels high and wide")),
    # Named the model, not its flag ("model 'cnn' needs images ..."), against the one-line rule for bad input.
    "a cnn on samples that are no images": (lambda t: ["--model", "cnn", "--dataset", "blobs"],
                                            ("--model cnn: ", "needs images shaped (channels, height, width)")),
    "a text dataset for the mlp": (lambda t: ["--model", "mlp", "--dataset", "corpus"],
                                   ("--model mlp: ", "is text: use --model transformer")),
    # A traceback before (OSError), no result file and no summary line: a file that cannot be read.
    "dataset that cannot be read": (lambda t: ((t / "mem.csv").symlink_to("/proc/self/mem"),
                                               ["--dataset", str(t / "mem.csv")])[1],
                                    ("--dataset: ", "mem.csv: cannot be read: ")),
    "bad job id": (lambda t: ["--job-id", "../etc"],
                   "--job-id: must be letters, digits, '.', '_', '-' (first a letter or digit; at most 64), "
                   "got '../etc'"),
    "bad epochs": (lambda t: ["--epochs", "0"], "--epochs: must be at least 1"),
    # Accepted before: the job failed in islice ("Stop argument for islice() must be None or an integer").
    "huge batch": (lambda t: ["--batch-size", str(10**20)], f"--batch-size: must be at most {2**31 - 1}, got {10**20}"),
    "huge lr": (lambda t: ["--lr", "1e308"], "--lr: must be at most 1000, got 1e+308"),
    # Accepted before, and spike detection was off in silence (on_loss_spike: pause never acted).
    "infinite spike threshold": (lambda t: ["--loss-spike-z", "inf"],
                                 "--loss-spike-z: must be a finite number, got inf"),
    "checkpoint dir under a file": (lambda t: (bad_csv(t, "file", "x"),
                                               ["--checkpoint-dir", str(t / "file" / "ck")])[1],
                                    "/file/ck' is not a directory ("),
    # "is not writable: File exists" before (mkdir of a link to nothing).
    "checkpoint dir a dangling link": (lambda t: ((t / "ck").symlink_to(t / "gone"),
                                                  ["--checkpoint-dir", str(t / "ck")])[1],
                                       ("--checkpoint-dir: '", "/inputs/ck' is a symbolic link to '",
                                        "/inputs/gone', which does not exist")),
    # A link to nothing above it, or at another output directory: "File exists" still.
    "checkpoint dir under a dangling link": (
        lambda t: ((t / "ln").symlink_to(t / "gone"), ["--checkpoint-dir", str(t / "ln" / "ck")])[1],
        ("--checkpoint-dir: '", "/inputs/ln' is a symbolic link to '", "/inputs/gone', which does not exist")),
    **{f"{flag} a dangling link": (lambda t, flag=flag: ((t / "ln").symlink_to(t / "gone"), [flag, str(t / "ln")])[1],
                                   (f"{flag}: '", "/inputs/ln' is a symbolic link to '",
                                    "/inputs/gone', which does not exist"))
       for flag in ("--targets-dir", "--job-dir", "--diagnostics-dir")},
    # A file where an output directory goes: named by its own flag, before anything is written.
    **{f"{flag} a file": (lambda t, flag=flag: [flag, bad_csv(t, "file", "x")],
                          (f"{flag}: '", "/file' is not a directory"))
       for flag in ("--targets-dir", "--job-dir", "--diagnostics-dir")},
    # A directory where the job's own file goes in a shared directory: blamed on --metrics-listen before.
    **{f"a directory at the job's file in {flag}": (
        lambda t, flag=flag: ((t / "shared" / "planted.rank0.json").mkdir(parents=True),
                              ["--job-id", "planted", flag, str(t / "shared")])[1],
        (f"{flag}: cannot write ", "Is a directory")) for flag in ("--targets-dir", "--job-dir")},
    "result file a directory": (lambda t: ["--result-file", str(t)], ("--result-file: '", "/inputs' is a directory")),
    "result file in no directory": (lambda t: ["--result-file", str(t / "nope" / "r.json")],
                                    "/nope/r.json': no directory"),
    # Blamed on --metrics-listen before ("cannot serve metrics on 127.0.0.1:0: unknown url type").
    "register url not a url": (lambda t: ["--register-url", "notaurl"],
                               "--register-url: must be an http(s) URL, got 'notaurl'"),
    # Refused with the flags, before the data is loaded (it was found binding, after).
    "bad listen address": (lambda t: ["--metrics-listen", "127.0.0.1:99999"],
                           "--metrics-listen: invalid listen address '127.0.0.1:99999'"),
    "IPv6 listen address without brackets": (lambda t: ["--metrics-listen", "::1"], "write [::1]:PORT"),
    "bad web config": (lambda t: (bad_csv(t, "web.yml", "tls_config: {}\n"),
                                  ["--web.config.file", str(t / "web.yml")])[1],
                       ("--web.config.file: ", "unknown key(s) ['tls_config']")),
    "missing web config": (lambda t: ["--web.config.file", str(t / "nope.yml")],
                           ("trainmetrics train: error: --web.config.file: ", "nope.yml")),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args = make_args(inputs)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    common = ["--targets-dir", str(outputs / "targets"), "--job-dir", str(outputs / "jobs"), "--epochs", "1"]
    if "--checkpoint-dir" not in args:
        common += ["--checkpoint-dir", str(outputs / "ckpt")]
    code = main(["train", *common, *args])
    stderr = capsys.readouterr().err
    assert code == 2
    assert all(part in stderr for part in ((message,) if isinstance(message, str) else message)), stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert list(outputs.rglob("*")) == []


def test_checkpoints_asked_for_without_a_directory_are_one_line_exit_2(tmp_path, capsys):
    """--checkpoint-every without --checkpoint-dir was taken: the job trained with no checkpoint at all, unsaid."""
    code = main(["train", "--targets-dir", str(tmp_path / "t"), "--job-dir", str(tmp_path / "j"), "--epochs", "1",
                 "--checkpoint-every", "5"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.strip().splitlines() == [
        "trainmetrics train: error: --checkpoint-every needs --checkpoint-dir (without one no checkpoint is written)"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variables,message", [({"RANK": "1"}, "RANK=1 is not one of the ranks of WORLD_SIZE=1"),
                                               ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not a whole number"),
                                               ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 is negative"),
                                               ({"RANK": "²", "WORLD_SIZE": "2"}, "RANK='²' is not a whole number"),
                                               ({"WORLD_SIZE": "²"}, "WORLD_SIZE='²' is not a whole number")])
def test_a_rank_layout_that_is_none_is_one_line_naming_it(variables, message, tmp_path, monkeypatch, capsys):
    """A RANK past WORLD_SIZE published no lifecycle (rank 0 alone does), then was refused as a --metrics-listen
    problem; a RANK that is no number was a traceback, and so was a "²" in RANK or WORLD_SIZE (str.isdigit let it
    through to int() in the log lines' rank tag)."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    code = main(["train", "--targets-dir", str(tmp_path / "t"), "--checkpoint-dir", str(tmp_path / "ck")])
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert list(tmp_path.iterdir()) == []       # bad input leaves nothing behind (the checkpoint dir stayed)


def test_a_gpu_index_for_several_ranks_on_one_machine_is_one_line_naming_the_flag(tmp_path, monkeypatch, capsys):
    """Each of torchrun's ranks takes the GPU of its local rank: `--device cuda:1` was ignored, and rank 0
    trained on cuda:0. Said before torch is imported, as the other flags' problems are."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    code = main(["train", "--device", "cuda:1", "--targets-dir", str(tmp_path / "t"),
                 "--checkpoint-dir", str(tmp_path / "ck")])
    stderr = capsys.readouterr().err
    assert code == 2 and "--device: 'cuda:1' names one GPU, but each of the 2 ranks" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_training_split_smaller_than_the_ranks_is_one_line(tmp_path, monkeypatch, capsys):
    """Each rank takes an equal share of the epoch, the rows past a multiple of the ranks left out: two ranks on a
    training split of one row trained on nothing, and the job "completed" after 0 steps."""
    data = tmp_path / "tiny.csv"
    data.write_text("x,label\n0.5,0\n1.5,1\n")       # one training row, one evaluation row
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    outputs = tmp_path / "outputs"
    code = main(["train", "--job-id", "tiny-1", "--dataset", str(data), "--targets-dir", str(outputs / "t"),
                 "--checkpoint-dir", str(outputs / "ck")])
    stderr = capsys.readouterr().err
    assert code == 2 and "--dataset: its training split has 1 row(s), fewer than the job's 2 processes" in stderr, \
        stderr
    assert len(stderr.strip().splitlines()) == 1 and not outputs.exists()


@pytest.mark.parametrize("variables,device,refused", [
    # torchrun over two machines, one rank each: each rank took cuda:0 (its local rank), the index ignored.
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, "cuda:1", True),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, "cuda:0", False),
    # Ray's ranks (no LOCAL_WORLD_SIZE): each sees the one GPU Ray gave it, as cuda:0.
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0"}, "cuda:0", False),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0"}, "cuda:1", True),
    # A LOCAL_WORLD_SIZE inherited by a single process (no WORLD_SIZE): it trains on the GPU it names.
    ({"LOCAL_WORLD_SIZE": "2"}, "cuda:1", False),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "\u00b2"}, "cuda:1", True),       # a digit, but no number
])
def test_a_gpu_index_is_refused_wherever_a_ranks_gpu_is_its_local_ranks(variables, device, refused, monkeypatch):
    """A rank of several takes the GPU of its local rank whatever the index (distributed.rank_device): only
    LOCAL_WORLD_SIZE > 1 was refused, so two machines with a rank each trained on cuda:0 for `--device cuda:1`,
    and a LOCAL_WORLD_SIZE left in a single process's environment refused the GPU it would have used."""
    from trainmetrics.command import FlagError
    from trainmetrics.trainer.config import TrainConfig, check_flags

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    config = TrainConfig(job_id="gpu-index", device=device)
    if refused:
        with pytest.raises(FlagError, match=f"'{device}' names one GPU"):
            check_flags(config)
    else:
        check_flags(config)


def test_metrics_port_in_use_is_bad_input(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["train", "--metrics-listen", f"127.0.0.1:{port}", "--targets-dir", str(tmp_path / "t"),
                     "--checkpoint-dir", str(tmp_path / "ck")])
    stderr = capsys.readouterr().err
    assert code == 2 and f"cannot serve metrics on 127.0.0.1:{port}" in stderr
    assert list(tmp_path.iterdir()) == []


def test_a_rank_that_refuses_its_arguments_writes_its_own_result_file(tmp_path, monkeypatch, capsys):
    """Every rank refuses bad input alike, and rank 1's result went over rank 0's (the one that speaks for the
    job), as report() never lets it."""
    from types import SimpleNamespace

    from trainmetrics.jobfiles import rank_result_path, read_result
    from trainmetrics.trainer.outcome import bad_input

    result_file = tmp_path / "result.json"
    config = SimpleNamespace(job_id="two", result_file=str(result_file))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert bad_input(config, f"refused by rank {rank}") == 2
    assert read_result(result_file)["error"] == "refused by rank 0"
    assert read_result(rank_result_path(result_file, 1))["error"] == "refused by rank 1"


def test_the_log_names_the_address_metrics_are_served_on(tmp_path):
    """A rank on Ray listens on its node's address, and the log said 127.0.0.1 all the same (the wrong machine
    on a cluster)."""
    done = run_train("--metrics-listen", "127.0.0.2:0", "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ck"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"metrics=http://127\.0\.0\.2:\d+/metrics", done.stderr), done.stderr[-2000:]


def test_the_log_says_which_task_a_csvs_target_made(tmp_path):
    """Whole numbers written as decimals (pandas writes a column with a gap so) are a regression target, as
    documented: the job trained with MSE, and nothing said it was not classifying."""
    rows = "".join(f"{i % 7},{(i * 3) % 5},{i % 2}.0\n" for i in range(64))
    done = run_train("--dataset", bad_csv(tmp_path, "decimals.csv", "a,b,label\n" + rows), "--epochs", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert " dataset=decimals task=regression device=" in done.stderr, done.stderr[-2000:]
    done = run_train("--epochs", "1", "--batch-size", "256")
    assert " dataset=blobs task=classification (5 classes) device=" in done.stderr, done.stderr[-2000:]


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """Read stderr lines until one contains needle (finish the process with finish_reading then: readline()
    may have read the lines after it into the pipe's buffer, where communicate() does not look)."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen:\n{''.join(lines)}")


def test_sigterm_cancels_after_a_checkpoint_and_resume_keeps_the_step_count(tmp_path, spawn_train):
    ckpt = tmp_path / "ckpt"
    args = ["--job-id", "sig-1", "--dataset", "blobs", "--epochs", "30", "--batch-size", "16",
            "--log-every", "20", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1000"]
    process = spawn_train(*args)
    wait_for_line(process, "step=40 ")
    process.send_signal(signal.SIGTERM)
    stdout, _ = finish_reading(process, timeout=60)
    assert process.returncode == 3
    cancelled = parse_summary(stdout)
    assert cancelled["state"] == "cancelled" and cancelled["steps"] >= 40
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == [f"step-{cancelled['steps']:09d}.pt"]        # the final checkpoint at the boundary

    resumed = run_train(*args[:5], "2", *args[6:], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    summary = parse_summary(resumed.stdout)
    assert summary["state"] == "completed"
    assert summary["steps"] == 2 * 200                            # 3200 samples / 16 per batch, 2 epochs
    assert f"resumed at step {cancelled['steps']}" in resumed.stderr


def test_exception_mid_run_fails_with_exit_1_and_names_the_error(tmp_path, spawn_train):
    ckpt = tmp_path / "ckpt"
    process = spawn_train("--job-id", "fail-1", "--epochs", "50", "--batch-size", "16", "--log-every", "10",
                          "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5")
    wait_for_line(process, "step=10 ")
    # The checkpoint dir turns into a file (rename is atomic): the next checkpoint write fails for real.
    os.rename(ckpt, tmp_path / "moved-away")
    ckpt.write_text("not a directory")
    stdout, stderr = finish_reading(process, timeout=60)
    assert process.returncode == 1
    summary = parse_summary(stdout)
    assert summary["state"] == "failed" and summary["error_type"] in ("NotADirectoryError", "FileNotFoundError")
    assert f"job fail-1 failed: {summary['error_type']}" in stderr


def test_a_resume_whose_every_checkpoint_is_unreadable_fails_instead_of_training_from_step_0(tmp_path, spawn_train):
    """Every checkpoint skipped as corrupt, the job trained again from step 0 and said nothing. Failing, it does
    not know the job's totals (they are in the checkpoints it could not read): its result said 0 steps and
    samples for a job that had trained them, while its series published none (unknown): null, as those say."""
    from trainmetrics.trainer.checkpoint import checkpoint_name

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for step in (20, 30):
        (ckpt / checkpoint_name(step)).write_bytes(b"overwritten")
    process = spawn_train("--job-id", "unreadable-1", "--epochs", "1", "--batch-size", "16", "--checkpoint-dir",
                          str(ckpt), "--resume")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    summary = parse_summary(stdout)
    assert summary["state"] == "failed" and summary["error_type"] == "NoReadableCheckpoint"
    assert [summary[name] for name in ("steps", "samples", "evaluations", "checkpoints")] == [None] * 4
    assert f"none of the 2 checkpoints in {ckpt} loads as this job's" in stderr
    assert stderr.count("cannot be loaded (UnpicklingError: Weights only load failed)") == 2, stderr   # each file


def test_a_checkpoint_the_disk_has_no_room_for_fails_the_job_naming_the_disk_error(tmp_path):
    """torch.save reports a write that failed (a full disk; here, past the file size limit) as "[enforce fail at
    inline_container.cc:672] . unexpected pos 105792 vs 105684", the OSError only its context: the job failed
    with that RuntimeError, and nothing in its result, log or failure series said the disk was the cause."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))    # a checkpoint is ~240 KB

    ckpt, result_file = tmp_path / "ckpt", tmp_path / "result.json"
    failed = subprocess.run(train_command("--job-id", "full-1", "--epochs", "1", "--checkpoint-dir", str(ckpt),
                                          "--checkpoint-every", "5", "--result-file", str(result_file)),
                            capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    assert failed.returncode == 1, failed.stderr
    result = json.loads(result_file.read_text())
    assert (result["error_type"], result["error"]) == ("OSError", "OSError: [Errno 27] File too large"), result
    assert "job full-1 failed: OSError: [Errno 27] File too large" in failed.stderr
    assert list(ckpt.iterdir()) == []       # no temp file left behind either


def test_sigusr1_pauses_with_exit_4_after_a_checkpoint(tmp_path, spawn_train):
    ckpt = tmp_path / "ckpt"
    process = spawn_train("--job-id", "pause-1", "--epochs", "30", "--batch-size", "16", "--log-every", "20",
                          "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1000")
    wait_for_line(process, "step=20 ")
    process.send_signal(signal.SIGUSR1)
    stdout, _ = finish_reading(process, timeout=60)
    assert process.returncode == 4
    summary = parse_summary(stdout)
    assert summary["state"] == "paused" and summary["end_time"] >= summary["start_time"]
    assert [p.name for p in ckpt.iterdir()] == [f"step-{summary['steps']:09d}.pt"]


def test_a_stop_without_a_checkpoint_dir_does_not_claim_a_checkpoint(spawn_train):
    """The log said "checkpointing at step N" when nothing could be written (no --checkpoint-dir)."""
    process = spawn_train("--job-id", "nockpt-1", "--epochs", "30", "--batch-size", "16", "--log-every", "20")
    wait_for_line(process, "step=20 ")
    process.send_signal(signal.SIGUSR1)
    stdout, stderr = finish_reading(process, timeout=60)
    assert process.returncode == 4 and parse_summary(stdout)["checkpoints"] == 0
    assert "pause requested, stopping (no --checkpoint-dir: nothing to resume from) at step" in stderr, stderr
    assert "checkpointing" not in stderr


def test_progress_draws_a_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path):
    args = ("--job-id", "bar-1", "--epochs", "1", "--log-every", "10", "--progress")
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))   # a 160-column terminal
    process = subprocess.Popen(train_command(*args), stdin=secondary, stdout=secondary, stderr=secondary,
                               cwd=tmp_path)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:          # the terminal closed: the job exited
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert process.wait(timeout=60) == 0
    text = output.decode(errors="replace")
    assert "bar-1:" in text and "50/50" in text and "samples_per_s=" in text     # tqdm's bar with our postfix
    assert " step=10 " not in text                                                 # no plain log lines on a TTY

    piped = run_train(*args)
    assert piped.returncode == 0 and "step=10 samples=640" in piped.stderr and "50/50" not in piped.stderr


def test_the_summary_line_is_one_write_so_ranks_sharing_stdout_never_run_into_each_other(monkeypatch):
    """torchrun runs every rank unbuffered on one shared stdout: a line written in two parts (print() writes
    its newline apart) can end up as `summary {rank 1}summary {rank 0}`, which no reader can parse."""
    from types import SimpleNamespace

    from trainmetrics.trainer.outcome import Outcome

    class Unbuffered:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    stdout = Unbuffered()
    monkeypatch.setattr("sys.stdout", stdout)
    outcome = Outcome(SimpleNamespace(job_id="one-write", result_file=None, resume=False),
                      SimpleNamespace(rank=1, world_size=2, is_main=False))
    outcome.state = "completed"
    outcome.report(outcome.result(None))
    assert len(stdout.writes) == 1 and stdout.writes[0].startswith("summary {") and stdout.writes[0].endswith("}\n")
    assert parse_summary(stdout.writes[0].rstrip("\n"))["rank"] == 1


def test_a_resume_without_a_job_id_continues_the_runs_checkpoints(tmp_path):
    """Without --job-id each run makes up its own id: every checkpoint looked like another job's and the resume
    failed (NoReadableCheckpoint)."""
    ckpt = tmp_path / "ckpt"
    first = run_train("--epochs", "1", "--dataset", "blobs", "--checkpoint-dir", str(ckpt), "--linger-timeout", "0")
    assert first.returncode == 0, first.stderr[-2000:]
    steps = parse_summary(first.stdout)["steps"]
    resumed = run_train("--epochs", "2", "--dataset", "blobs", "--checkpoint-dir", str(ckpt), "--resume",
                        "--linger-timeout", "0")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {steps} (epoch 1, batch 0)" in resumed.stderr
    assert parse_summary(resumed.stdout)["steps"] == 2 * steps


def test_the_ranks_of_a_torchrun_job_given_no_job_id_share_one():
    """Each rank made up its own: one job showed as two, rank 1's with no state of its own (rank 0 alone publishes
    the job's) and half the samples on rank 0's."""
    from trainmetrics.trainer.config import made_up_job_id

    ranks = [{"WORLD_SIZE": "2", "RANK": rank, "TORCHELASTIC_RUN_ID": "5f1c7e0a-93b2-4c1e-8a44-0c8e1f2b3d4e"}
             for rank in ("0", "1")]
    assert made_up_job_id(ranks[0]) == made_up_job_id(ranks[1]) == "job-5f1c7e0a-93b2-4c1e-8a44-0c8e1f2b3d4e"
    assert made_up_job_id({}) != made_up_job_id({})          # one process: a fresh one each time


def test_several_processes_without_a_shared_job_id_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    code = main(["train", "--targets-dir", str(tmp_path / "t"), "--checkpoint-dir", str(tmp_path / "ck")])
    stderr = capsys.readouterr().err
    assert code == 2 and "--job-id: a job of several processes needs one" in stderr, stderr
    assert list(tmp_path.iterdir()) == []       # its checkpoint dir was made, and left behind


def test_a_fixed_metrics_port_is_local_rank_0s_and_the_next_ranks_take_the_ports_after():
    """Every rank bound the one port: one failed at once, the other hung in the process group's start until
    torchrun killed it, its file_sd target left behind."""
    from trainmetrics.trainer.distributed import rank_listen

    assert [rank_listen("127.0.0.1:9400", rank) for rank in (0, 1, 2)] == \
        ["127.0.0.1:9400", "127.0.0.1:9401", "127.0.0.1:9402"]
    assert rank_listen("[::1]:9400", 1) == "[::1]:9401" and rank_listen("0.0.0.0:0", 3) == "0.0.0.0:0"
    with pytest.raises(ValueError, match="past 65535"):
        rank_listen("127.0.0.1:65535", 1)


def test_the_console_script_catches_the_stop_signals_before_it_imports_the_commands(tmp_path):
    """`trainmetrics train` (the console script: trainmetrics.cli:main) installed its stop handlers only once every
    command's module had been imported and the flags parsed: a SIGTERM in that first tenth of a second killed the
    job by the default action (exit 143, no result file), where `python -m trainmetrics train` ends it cancelled."""
    result_file = tmp_path / "result.json"
    script = (
        "import os, signal, sys\n"
        "from trainmetrics import cli\n"
        "build_parser = cli.build_parser\n"
        "def build_parser_under_a_sigterm():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)      # arrives while the command modules import\n"
        "    return build_parser()\n"
        "cli.build_parser = build_parser_under_a_sigterm\n"
        f"sys.argv = ['trainmetrics', 'train', '--epochs', '1', '--result-file', {str(result_file)!r}]\n"
        "sys.exit(cli.main())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    assert parse_summary(done.stdout)["state"] == "cancelled"
    assert json.loads(result_file.read_text())["state"] == "cancelled"


def test_a_model_too_large_for_memory_is_one_line_with_a_result_not_a_traceback(tmp_path):
    """A cnn on 4000x4000 images needs a 32 GB head: torch's allocator raised RuntimeError out of prepare(), a
    traceback with no result file and no summary (the job server said only "exit code 1 without a result")."""
    import resource

    np.savez_compressed(tmp_path / "huge.npz", x=np.zeros((2, 1, 4000, 4000), dtype=np.float32), y=np.array([0, 1]))
    result_file = tmp_path / "result.json"

    def limit_memory():     # the machine's memory, made small: the 32 GB fails to allocate wherever this runs
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    done = subprocess.run(train_command("--model", "cnn", "--dataset", str(tmp_path / "huge.npz"), "--epochs", "1",
                                        "--checkpoint-dir", str(tmp_path / "ck"), "--result-file", str(result_file)),
                          capture_output=True, text=True, timeout=180, preexec_fn=limit_memory)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert done.stderr.startswith("trainmetrics train: error: --model cnn: ")
    assert "memory" in done.stderr
    assert json.loads(result_file.read_text())["exit_code"] == 2
    assert not (tmp_path / "ck").exists()


def test_a_dataset_too_large_for_memory_is_one_line_with_a_result_not_a_traceback(tmp_path, monkeypatch, capsys):
    """The splits' copies of a dataset that only just loaded failed in torch's allocator (RuntimeError): a
    traceback out of prepare(), with no result file and no summary."""
    import torch

    from trainmetrics.trainer import runner

    def load_dataset(*args, **kwargs):      # as _split's copy of a 4x12000x12000 array does under 3.5 GB
        return torch.empty(2**62, dtype=torch.uint8)

    monkeypatch.setattr(runner, "load_dataset", load_dataset)
    result_file = tmp_path / "result.json"
    code = main(["train", "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ck"), "--result-file", str(result_file)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert "--dataset: blobs: too large for this machine's memory (can't allocate memory" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert json.loads(result_file.read_text())["exit_code"] == 2
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("scraped", [False, True])
def test_the_result_says_whether_a_scraper_read_the_final_state(scraped, tmp_path, capfd):
    """Prometheus down through the whole final linger: the result said nothing of it, so the job server took the
    end as published and published nothing; Prometheus kept the process's last `running`, and the job's stored
    report said `vanished` for good while the job API said completed. The result now carries the linger's verdict
    (the summary line, printed before the linger, does not)."""
    import http.client
    import threading

    from trainmetrics.contract import RESULT_PUBLISHED
    from trainmetrics.metrics_http import SCRAPE_TIMEOUT_HEADER

    targets, result_file, done = tmp_path / "targets", tmp_path / "result.json", threading.Event()

    def scrape_while_announced():      # a Prometheus: every 0.1 s while the job's file_sd target is there
        while not done.is_set():
            try:
                address = json.loads((targets / "verdict.rank0.json").read_text())[0]["targets"][0]
                connection = http.client.HTTPConnection(address, timeout=5)
                connection.request("GET", "/metrics", headers={SCRAPE_TIMEOUT_HEADER: "5"})
                connection.getresponse().read()
                connection.close()
            except (OSError, ValueError, LookupError):
                pass        # not announced yet, or gone
            time.sleep(0.1)

    scraper = threading.Thread(target=scrape_while_announced, daemon=True)
    if scraped:
        scraper.start()
    try:
        code = main(["train", "--epochs", "1", "--job-id", "verdict", "--targets-dir", str(targets),
                     "--result-file", str(result_file), "--linger-timeout", "20" if scraped else "0.5"])
    finally:
        done.set()
    assert code == 0
    result = json.loads(result_file.read_text())
    assert (result["state"], result.get(RESULT_PUBLISHED)) == ("completed", scraped)
    assert RESULT_PUBLISHED not in parse_summary(capfd.readouterr().out)


@pytest.mark.parametrize("spec,problem", [
    ({"slow_data": {"seconds": -1}}, "slow_data: seconds -1 is not a number of seconds from 0"),
    ({"stall": {"step": "x", "seconds": 1}}, "stall: step 'x' is not a whole number, 1 or more"),
    ({"slwo_data": {"seconds": 1}}, "unknown fault 'slwo_data'"),
    ({"slow_data": {"seconds": 1, "rank": "0"}}, "slow_data: rank '0' is not a whole number")])
def test_a_malformed_fault_spec_is_one_error_naming_the_variable_and_the_job_trains_without_faults(spec, problem,
                                                                                                   monkeypatch):
    """A fault's bad field was read only when the fault struck: the job failed mid-run (exit 1) with a ValueError
    from time.sleep() or int() naming no variable; a misspelt kind or a rank given as text injected nothing,
    without a word."""
    monkeypatch.setenv("TRAINMETRICS_FAULTS", json.dumps(spec))
    done = run_train("--epochs", "1", "--dataset", "blobs", "--linger-timeout", "0")
    assert done.returncode == 0, done.stderr
    assert f"TRAINMETRICS_FAULTS: {problem}" in done.stderr and "no faults injected" in done.stderr, done.stderr
    assert parse_summary(done.stdout)["state"] == "completed"


def test_a_failed_start_fault_with_no_fields_fails_the_start():
    """`{"fail_start": {}}` (every rank, every job) read as an empty, so false, fault: the job trained as if
    asked for nothing."""
    done = subprocess.run(train_command("--epochs", "1", "--dataset", "blobs", "--linger-timeout", "0"),
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TRAINMETRICS_FAULTS": '{"fail_start": {}}'})
    assert done.returncode != 0, done.stdout
    assert "fault injected: failing before joining the other ranks" in done.stderr + done.stdout


def test_a_missing_package_of_the_train_extra_beside_torch_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    """Only torch was checked for: the core package beside a user's own torch started `--dataset digits`, which
    failed at its start with a ModuleNotFoundError traceback for scikit-learn (exit 1) instead of naming the extra."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "sklearn"
                        else find_spec(name, *rest))
    monkeypatch.setitem(sys.modules, "sklearn", None)       # as if not installed: its import fails
    code = main(["train", "--dataset", "digits", "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ck")])
    stderr = capsys.readouterr().err
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.strip() == "trainmetrics train: error: training needs scikit-learn: pip install 'trainmetrics[train]'"
    assert list(tmp_path.iterdir()) == []
