"""Dataset uploads: the raw body streamed to a temp file (off the event loop, bounded), checked with the
numpy readers the trainer uses (trainmetrics.datafiles, no torch), then moved into place durably (synced, with its
directory, before the upload is recorded and answered)."""

import contextlib
import logging
import os
import re
import secrets
import tempfile
import time
from pathlib import Path

import anyio
from starlette.requests import Request

from trainmetrics.contract import CONTROL_CHARACTERS
from trainmetrics.datafiles import (DEFAULT_TARGET, DatasetError, TargetColumnError, read_csv, read_npz,
                                    regression_target_problem, smallest_batch)
from trainmetrics.edge import ApiError
from trainmetrics.jobfiles import rename_durably

DATASET_FORMATS = {".csv": "csv", ".npz": "npz"}
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_TARGET_LENGTH = 200
# An uploaded NPZ may inflate to this many times the upload limit, no more (zip bombs).
NPZ_INFLATION_LIMIT = 4
# The body is the file itself; a multipart form or JSON wrapping is a client mistake worth naming. (curl
# --data-binary labels a raw file application/x-www-form-urlencoded, so that type is accepted.)
REFUSED_UPLOAD_TYPES = ("multipart/form-data", "application/json")
# An upload's temp file, in the datasets dir until it is checked and renamed.
UPLOAD_PREFIX = ".upload-"
# Body chunks are gathered to this size before each write, which runs in a worker thread.
WRITE_BATCH_BYTES = 1 << 20
# Uploads a server checks at once: each check holds its dataset in memory (up to a few times the upload
# limit; the thread pool's 40 at once could take tens of GB), the others wait their turn.
CONCURRENT_INSPECTIONS = 2

log = logging.getLogger("trainmetrics.server")


def check_upload_request(request: Request, max_bytes: int) -> tuple[str, str | None]:
    """The upload's file name and, for a CSV, its target column, after the checks that need no body (400,
    413, 415)."""
    name = request.query_params.get("name", "")
    if not DATASET_NAME.fullmatch(name) or Path(name).suffix.lower() not in DATASET_FORMATS:
        raise ApiError(400, "bad_request", "name: give the file name, ending in .csv or .npz "
                                           "(letters, digits, '.', '_', '-')")
    target = request.query_params.get("target")
    if DATASET_FORMATS[Path(name).suffix.lower()] != "csv":
        if target is not None:
            raise ApiError(400, "bad_request", "target: only for a CSV (an NPZ's target is its array y)")
    elif target is None:
        target = DEFAULT_TARGET
    elif not 0 < len(target) <= MAX_TARGET_LENGTH or CONTROL_CHARACTERS.search(target):
        raise ApiError(400, "bad_request", f"target: a column name of 1 to {MAX_TARGET_LENGTH} characters, "
                                           "no control characters")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in REFUSED_UPLOAD_TYPES:
        raise ApiError(415, "unsupported_media_type", f"content-type {content_type}: send the file itself as "
                                                      "the request body (e.g. curl --data-binary @FILE)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "too_large", f"upload exceeds {max_bytes} bytes")
    return name, target


def discard_unfinished_uploads(datasets_dir: Path) -> None:
    """Remove the temp files of uploads a killed server left (up to --max-upload-bytes each; a live server
    removes its own on any error). At the start: the data dir's lock keeps every other server out of it."""
    for leftover in datasets_dir.glob(f"{UPLOAD_PREFIX}*"):
        with contextlib.suppress(OSError):
            leftover.unlink()


def discard_unrecorded_datasets(datasets_dir: Path, recorded: set[str]) -> None:
    """Remove the dataset files no record names (by file name): an upload's file is moved into place, then
    recorded, and a server killed between the two (or a record that failed) left it for good, listed nowhere.
    At the start, as discard_unfinished_uploads."""
    for leftover in datasets_dir.glob("ds-*"):
        if leftover.name not in recorded:
            log.warning("dataset file %s has no record (its upload was never recorded): removed", leftover.name)
            with contextlib.suppress(OSError):
                leftover.unlink()


async def receive_dataset(request: Request, name: str, target: str | None, datasets_dir: Path,
                          max_bytes: int, inspections: anyio.CapacityLimiter | None = None) -> dict:
    """Stream the body into datasets_dir and check it (a CSV with `target` as its target column); returns the
    dataset's fields (id, path, format, target, rows, features, size, upload time). Nothing is left behind on
    any error."""
    suffix = Path(name).suffix.lower()
    began = time.monotonic()
    fd, tmp_name = tempfile.mkstemp(dir=datasets_dir, prefix=UPLOAD_PREFIX)
    size = 0
    line_break = False
    try:
        with os.fdopen(fd, "wb") as handle:
            batch = bytearray()
            async for chunk in request.stream():
                size += len(chunk)
                line_break = line_break or b"\n" in chunk or b"\r" in chunk
                if size > max_bytes:
                    raise ApiError(413, "too_large", f"upload exceeds {max_bytes} bytes")
                batch += chunk
                if len(batch) >= WRITE_BATCH_BYTES:
                    await anyio.to_thread.run_sync(handle.write, bytes(batch))
                    batch.clear()
            await anyio.to_thread.run_sync(handle.write, bytes(batch))
        if size == 0:
            raise ApiError(400, "bad_dataset", "empty upload")
        if suffix == ".csv" and not line_break:
            # `curl -d @FILE` strips the file's line breaks: its rows, run together, read as one header line of
            # thousands of columns without the target ("no target column 'label' among its 115073 columns").
            raise ApiError(400, "bad_dataset", "one line, no line break: a header and its rows need lines (curl -d "
                                               "strips line breaks: send the file with curl --data-binary @FILE)")
        rows, features = await anyio.to_thread.run_sync(inspect_dataset, Path(tmp_name), DATASET_FORMATS[suffix],
                                                        NPZ_INFLATION_LIMIT * max_bytes, target, limiter=inspections)
        dataset_id, final_path = _claim_dataset_name(datasets_dir, suffix)
        try:
            # Synced before it is recorded and answered 201: a power cut after left the dataset's file empty or
            # missing (never synced), and every job submitted on it failed. (A thread: an upload's fsync takes as
            # long as writing it to the disk.)
            await anyio.to_thread.run_sync(rename_durably, tmp_name, final_path)
        except BaseException:
            final_path.unlink(missing_ok=True)
            raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return {"id": dataset_id, "name": name, "path": str(final_path), "format": DATASET_FORMATS[suffix],
            "target": target, "rows": rows, "features": features, "size_bytes": size,
            "upload_seconds": time.monotonic() - began}


def _claim_dataset_name(datasets_dir: Path, suffix: str) -> tuple[str, Path]:
    """A new dataset id and its file, created empty and exclusively for the upload to be moved over. A random id
    can be drawn again: the upload was moved over the file of the dataset that had it (another owner's too), its
    record then failed (the id is taken), and its clean-up removed that dataset's file. An id with a file of any
    format is drawn anew. (Called on the event loop: no two uploads of one server claim at once.)"""
    while True:
        dataset_id = f"ds-{secrets.token_hex(6)}"
        if any((datasets_dir / f"{dataset_id}{other}").exists() for other in DATASET_FORMATS if other != suffix):
            continue
        path = datasets_dir / f"{dataset_id}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        return dataset_id, path


def inspect_dataset(path: Path, fmt: str, max_uncompressed_bytes: int, target: str | None) -> tuple[int, int]:
    """(rows, features) of an uploaded file, or ApiError 400 naming what is wrong."""
    try:
        x, y = read_csv(path, target) if fmt == "csv" else read_npz(path, max_uncompressed_bytes)
    except TargetColumnError as error:
        raise ApiError(400, "bad_dataset", "target: " + str(error).replace(f"{path}: ", "")) from None
    except DatasetError as error:
        raise ApiError(400, "bad_dataset", str(error).replace(str(path), "upload")) from None
    if y.dtype.kind == "f":
        # The trainer refuses such targets at every job's start (trainer/runner.py: check_regression_targets), for
        # the largest batch the job forms, never smaller than its evaluation's: accepted, every job on it failed.
        batch = smallest_batch(len(y))
        if problem := regression_target_problem(max(float(y.max()), -float(y.min())), batch):
            raise ApiError(400, "bad_dataset", f"upload: {problem} (a job evaluates {batch} rows at once, "
                                               "whatever its batch size)")
    features = 1
    for size in x.shape[1:]:
        features *= size
    return int(x.shape[0]), int(features)
