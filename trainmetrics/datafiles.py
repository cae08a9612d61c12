"""Reading users' dataset files with numpy alone: a numeric CSV with a header and a target column, or an NPZ
with arrays x and y. Shared by the trainer (trainer/data.py) and the job server, which checks an upload with
them without importing torch."""

import array
import csv
import lzma
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

MAX_CLASSES = 10_000
# numpy's kinds of number: signed and unsigned integers, floats, complex (refused with a message of its own).
NUMBER_KINDS = "iufc"
# Features and regression targets are float32 in training: a larger value would be infinite there.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# A job holds out this share of the rows (at least one) and evaluates them in batches of up to EVAL_BATCH_SIZE rows
# (trainer/data.py, trainer/runner.py): here, as they bound a regression target, which the job server checks too.
EVAL_FRACTION = 0.2
EVAL_BATCH_SIZE = 512


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file, line or array at fault."""


class TargetColumnError(DatasetError):
    """A CSV without the target column asked for."""


# A CSV's target column when none is named (`trainmetrics train --target`, an upload's `target`).
DEFAULT_TARGET = "label"
# UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8" writes one): the mark is never part of the
# first column's name.
CSV_ENCODING = "utf-8-sig"

# The most characters one record of a CSV (its header, a row) may have. The csv module builds a record whole, each
# cell a Python string of ~50 bytes: a row of short cells ("1,") took ~30 times its size in memory, and a 256 MiB
# upload of a header and one row ~8 GB in the job server. Room for ~200,000 columns of 20-character numbers.
MAX_RECORD_CHARS = 4 << 20
# A header named in a message: its first columns and a count, not all of them (a CSV may have thousands).
SHOWN_COLUMNS = 8
# The largest central directory (the zip's list of members) an NPZ may have. zipfile reads and parses all of it
# when it opens the archive, ~700 bytes of memory a member: a 94 MB upload listing 2 million members took 1.4 GB
# and 34 s before any check. An NPZ of a few arrays lists a few hundred bytes; this allows some 20,000 members.
MAX_NPZ_DIRECTORY_BYTES = 1 << 20
# How an NPZ starts, as np.load tells one: a zip's first member, or the end record of an empty zip.
NPZ_STARTS = (b"PK\x03\x04", b"PK\x05\x06")


def first_columns(header: list[str]) -> str:
    """A header named in a message: its first SHOWN_COLUMNS names, then "..." when there are more."""
    # A quoted name may hold a line break or another control character: escaped, as the message is one line.
    shown = ", ".join("".join(c if c.isprintable() else repr(c)[1:-1] for c in name[:40])
                      for name in header[:SHOWN_COLUMNS])
    return shown + (", ..." if len(header) > SHOWN_COLUMNS else "")


def _header(reader) -> list[str] | None:
    """A CSV's header: its first row that is not blank (blank lines are skipped before it, as between its rows: a
    file starting with one was refused as "empty"), its cells stripped; None when there is none."""
    row = next((row for row in reader if any(cell.strip() for cell in row)), None)
    return None if row is None else [cell.strip() for cell in row]


def csv_columns(path: Path) -> list[str]:
    """The column names of a CSV that read_csv accepted."""
    with open(path, newline="", encoding=CSV_ENCODING) as handle:
        return _header(csv.reader(handle)) or []


def read_csv(path: Path, target: str = DEFAULT_TARGET) -> tuple[np.ndarray, np.ndarray]:
    """Read a numeric CSV with a header; returns (features, target) or raises DatasetError."""
    try:
        with open(path, newline="", encoding=CSV_ENCODING) as handle:
            lines = _BoundedRecordLines(handle, path)
            reader = csv.reader(lines)
            header = _header(reader)
            if header is None:
                raise DatasetError(f"{path}: empty file (expected a header row)")
            if header.count(target) > 1:        # which one is the target? (the first was, unsaid)
                raise DatasetError(f"{path}: {header.count(target)} columns are named {target[:40]!r}: the target "
                                   "column's name must be unique")
            if target not in header:
                raise TargetColumnError(f"{path}: no target column {target[:40]!r} among its {len(header)} columns "
                                        f"({first_columns(header)})")
            target_index = header.index(target)
            # Each value stored as it is used, row by row, in flat arrays: a list of rows of Python floats
            # took ~50 times a file of short rows in memory (13 GB for a 256 MiB upload, in the job server).
            features, targets = array.array("f"), array.array("d")
            rows = 0
            integral_target = True
            bad_label = None        # the first target out of class labels' range, refused if the column is labels
            for line_number, row in _records(reader, lines):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DatasetError(f"{path}: line {line_number} has {len(row)} fields, "
                                       f"the header has {len(header)}")
                values = _row_values(path, line_number, header, row)
                integral_target = integral_target and _is_integer(row[target_index])
                label = values.pop(target_index)
                if bad_label is None and not 0 <= label < MAX_CLASSES:
                    bad_label = line_number, label
                features.extend(values)
                targets.append(label)
                rows += 1
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text ({error.reason})") from None
    except csv.Error as error:
        raise DatasetError(f"{path}: malformed CSV ({error})") from None
    if len(header) < 2:
        raise DatasetError(f"{path}: need at least one feature column besides {target!r}")
    if rows < 2:
        raise DatasetError(f"{path}: need at least 2 data rows, found {rows}")
    if integral_target and bad_label is not None:
        # Named by its line and column: "class labels must be non-negative integers" named neither (a job's
        # "--dataset: class labels ...", an upload's 400), nor how to make the column a regression target.
        line_number, label = bad_label
        raise DatasetError(f"{path}: line {line_number}, column {target[:40]!r}: {_label_problem(label)} "
                           f"(integers are class labels: write {int(label)}.0 for a regression target)")
    x = np.frombuffer(features, dtype=np.float32).reshape(rows, len(header) - 1)
    # (checked as read: in int64 first, a label past it wrapped negative and was "not non-negative")
    return x, _target_array(np.frombuffer(targets, dtype=np.float64), labels=integral_target, where=path)


def _row_values(path: Path, line_number: int, header: list[str], row: list[str]) -> list[float]:
    """A row's numbers, or DatasetError naming the line, the column and the cell at fault: named by its line
    alone (and NaN's by neither its column nor its value), a bad cell of a wide file was left to be searched for."""
    try:
        if _spelled_oddly("".join(row)):      # float() reads them: one check for the row
            raise ValueError
        values = [float(cell) for cell in row]
    except ValueError:
        index = next(i for i, cell in enumerate(row) if not _is_number(cell))
        raise DatasetError(f"{path}: line {line_number}, column {_column(header, index)}: non-numeric value "
                           f"{row[index][:40]!r}") from None
    # The target too, even written as an integer: a later row's fraction makes the column a float32 regression
    # target (a class label that large is refused anyway). `not <=` is also true of NaN.
    index = next((i for i, value in enumerate(values) if not abs(value) <= FLOAT32_MAX), None)
    if index is not None:
        raise DatasetError(f"{path}: line {line_number}, column {_column(header, index)}: "
                           f"{_value_problem(row[index].strip()[:40])}")
    return values


def _value_problem(text: str) -> str:
    """What is wrong with a number that is not finite in float32. A number's spelling holds an `n` only as NaN
    or infinity: any other (`1e400`, which float() makes infinite too) is one too large, not "NaN or infinite"."""
    if "n" in text.lower():
        return f"NaN or infinite value {text!r}"
    return f"value {text!r} beyond float32's range (±{FLOAT32_MAX:.4g}): infinite in training"


def _column(header: list[str], index: int) -> str:
    """A column as a message names it: by its name, or by its position where the name is empty or not unique."""
    name = header[index]
    if name and header.count(name) == 1:
        return repr(name[:40])
    return f"{index + 1} ({repr(name[:40]) if name else 'unnamed'})"


class _BoundedRecordLines:
    """A CSV file's lines for csv.reader, refusing a record (one line, or several: a quoted cell may hold line
    breaks) of more than MAX_RECORD_CHARS characters before the reader builds it; next_record() starts a record."""

    def __init__(self, handle, path: Path):
        self.handle, self.path = handle, path
        self.record_start, self.taken = 1, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.handle.readline(MAX_RECORD_CHARS + 1)       # never more of one line than could be kept
        if not line:
            raise StopIteration
        self.taken += len(line)
        if self.taken > MAX_RECORD_CHARS:
            raise DatasetError(f"{self.path}: line {self.record_start} starts a row of more than {MAX_RECORD_CHARS} "
                               "characters (too many or too long columns)")
        return line

    def next_record(self, start: int) -> None:
        """The next record starts at line `start`."""
        self.record_start, self.taken = start, 0


def _records(reader, lines: _BoundedRecordLines):
    """Each row of a CSV reader with the line of the file it starts on: a quoted cell may hold line breaks, so rows
    are not lines (counted as lines, a problem after one was named at a line before the one at fault)."""
    start = reader.line_num + 1
    lines.next_record(start)
    for row in reader:
        yield start, row
        start = reader.line_num + 1
        lines.next_record(start)


def _is_integer(text: str) -> bool:
    try:
        int(text.strip())
    except ValueError:
        return False
    return True


def _spelled_oddly(text: str) -> bool:
    """Characters float() reads in a number that a CSV's reader (a spreadsheet, numpy) takes for text: `_` digit
    separators (`1_000`), and Unicode digits (Arabic-Indic, full-width) and spaces."""
    return "_" in text or not text.isascii()


def _is_number(text: str) -> bool:
    """A number as a CSV writes one: float()'s spelling, none of it spelled oddly."""
    if _spelled_oddly(text):
        return False
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_npz(path: Path, max_uncompressed_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read arrays x and y from an NPZ (no pickles); returns (x, y) or raises DatasetError.

    With max_uncompressed_bytes, an archive whose members would inflate beyond it is refused before
    anything is decompressed (a zip bomb: zipfile never reads past a member's declared size), and so is one
    whose arrays, loaded and made float32 for training, would take more memory than that (200 MiB of bytes
    became 1 GiB checked: a 200 KB upload)."""
    try:
        _check_npz_start(path)
        _check_npz_directory(path)
        with zipfile.ZipFile(path) as archive:
            _check_array_names(path, archive)
            inflated = sum(member.file_size for member in archive.infolist())
            if max_uncompressed_bytes is not None and inflated > max_uncompressed_bytes:
                raise DatasetError(f"{path}: arrays would take {inflated} bytes uncompressed, over the "
                                   f"{max_uncompressed_bytes}-byte limit")
            loaded = sum(_check_npy_header(path, archive, member) for member in archive.infolist())
            if max_uncompressed_bytes is not None and loaded > max_uncompressed_bytes:
                raise DatasetError(f"{path}: arrays would take {loaded} bytes in memory as float32, over the "
                                   f"{max_uncompressed_bytes}-byte limit")
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise DatasetError(f"{path}: missing array(s) {sorted(missing)}; found {_first_names(archive.files)}")
            x, y = archive["x"], archive["y"]
            # np.load hands a member without the .npy magic over as its bytes (an AttributeError below: a 500).
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
                raise DatasetError(f"{path}: x and y must be .npy arrays (np.save's format)")
    # (A member's broken deflate or LZMA stream, a bit flipped in transfer, raises zlib's or lzma's own error; one
    # that needs a password, or a compression method zipfile lacks, a RuntimeError: each was a 500.)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, MemoryError, zlib.error, lzma.LZMAError,
            RuntimeError) as error:
        if isinstance(error, DatasetError):
            raise
        raise DatasetError(f"{path}: not a readable NPZ archive ({type(error).__name__}: {error})") from None
    if x.ndim < 2 or y.ndim != 1:
        raise DatasetError(f"{path}: expected x with shape (samples, ...) and 1-D y; got {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if len(x) < 2:
        raise DatasetError(f"{path}: need at least 2 samples, found {len(x)}")
    if 0 in x.shape[1:]:
        raise DatasetError(f"{path}: x has no features: shape {x.shape}")
    # By kind, not np.number: numpy files timedelta64 under the integers, so a y of durations was class labels
    # (counts of its unit) and an x of them trained on as such; datetime64 and bool were refused.
    if x.dtype.kind not in NUMBER_KINDS or y.dtype.kind not in NUMBER_KINDS:
        raise DatasetError(f"{path}: x and y must be numeric; got {x.dtype} and {y.dtype}")
    if np.iscomplexobj(x) or np.iscomplexobj(y):      # float32 would keep the real parts and drop the rest
        raise DatasetError(f"{path}: x and y must be real numbers; got {x.dtype} and {y.dtype}")
    with np.errstate(over="ignore"):        # a value beyond float32 becomes inf, refused below
        x = x.astype(np.float32, copy=False)
    # (On y as it is: a float64 copy of it, twice, was memory the limit above did not count.)
    if not np.isfinite(x).all() or not np.isfinite(y).all():
        raise DatasetError(f"{path}: NaN or infinite values (or values beyond float32's range in x)")
    if not np.issubdtype(y.dtype, np.integer) and (y.max() > FLOAT32_MAX or y.min() < -FLOAT32_MAX):
        raise DatasetError(f"{path}: y has values beyond float32's range (±{FLOAT32_MAX:.4g}): infinite in training")
    return x, _target_array(y, labels=np.issubdtype(y.dtype, np.integer), where=path)


def eval_rows(rows: int) -> int:
    """How many of a data set's `rows` (samples) a job holds out for its evaluations."""
    return max(1, int(rows * EVAL_FRACTION))


def smallest_batch(rows: int) -> int:
    """The smallest of the largest batches every job on `rows` rows forms, whatever its batch size: its evaluation's
    (the held-out rows, at most EVAL_BATCH_SIZE of them)."""
    return min(EVAL_BATCH_SIZE, eval_rows(rows))


def regression_target_problem(largest: float, batch: int) -> str | None:
    """What is wrong with regression targets up to `largest` (in magnitude) whose squared error, summed over a batch
    of `batch` rows, overflows float32 (an untrained model answers about 0): the loss is inf from the first step.
    None when it does not."""
    bound = math.sqrt(FLOAT32_MAX / batch)
    if largest <= bound:
        return None
    return (f"regression targets up to {largest:.3g}: their squared error overflows float32 in a batch of {batch} "
            f"(at most {bound:.3g}): scale the target down")


def _check_npz_start(path: Path) -> None:
    """Refuse a file that np.load would not open as a zip. zipfile finds an archive by its end records, whatever comes
    before it; np.load decides by the first bytes: a .npy array with an NPZ after it had the NPZ checked, then the
    array loaded (a TypeError, a 500 at upload), and other bytes before it were read as a pickle."""
    with open(path, "rb") as handle:
        start = handle.read(len(np.lib.format.MAGIC_PREFIX))
    if start == np.lib.format.MAGIC_PREFIX:
        raise DatasetError(f"{path}: a .npy array (np.save's), not an NPZ archive of arrays x and y (np.savez's)")
    if not start.startswith(NPZ_STARTS):
        raise DatasetError(f"{path}: not a readable NPZ archive (no zip at its start, where np.savez writes one)")


def _check_npz_directory(path: Path) -> None:
    """Refuse an NPZ whose central directory is over MAX_NPZ_DIRECTORY_BYTES, before zipfile reads it. Its size is
    taken from the end records by zipfile's own reader of them, so that it is the size zipfile then reads (a zip64
    record, when present, overrides the classic one: a reader of its own would be lied to by one of the two)."""
    end_records = getattr(zipfile, "_EndRecData", None)     # private: a Python without it has the upload bound only
    if end_records is None:
        return
    with open(path, "rb") as handle:
        end = end_records(handle)        # None: no end record, not a zip (zipfile says so next)
    if end is not None and end[zipfile._ECD_SIZE] > MAX_NPZ_DIRECTORY_BYTES:
        raise DatasetError(f"{path}: its list of members takes {end[zipfile._ECD_SIZE]} bytes, over the "
                           f"{MAX_NPZ_DIRECTORY_BYTES}-byte limit (too many members: an NPZ needs arrays x and y)")


def _check_array_names(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuse two members that np.load takes for one array (`x.npy` twice, or `x` and `x.npy`): it loads one of
    them, unsaid, and another zip tool may read the other (the data checked need not be the data trained on)."""
    seen = {}
    for member in archive.infolist():
        name = member.filename.removesuffix(".npy")
        if name in seen:
            raise DatasetError(f"{path}: array {name[:40]!r} is stored twice (members {seen[name][:40]!r} and "
                               f"{member.filename[:40]!r}): which one is the data?")
        seen[name] = member.filename


def _first_names(names: list[str]) -> str:
    """An NPZ's array names in a message: the first few and how many more (a zip may list thousands)."""
    shown = ", ".join(repr(name[:40]) for name in names[:SHOWN_COLUMNS])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > SHOWN_COLUMNS else ''}]"


def _check_npy_header(path: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> int:
    """Refuse an array whose header declares more data than its member holds: np.load would allocate the
    declared size (terabytes for a 300-byte file) before finding out. Returns the bytes it takes loaded and
    as float32 (its copy for training), 0 for a member that is no array."""
    if not member.filename.endswith(".npy"):
        # np.load takes a member `x` for the array x as it takes `x.npy`, and loads it as an array when it starts
        # with the .npy magic, whatever its name: skipped here, its header went unchecked and its float32 copy
        # uncounted.
        with archive.open(member) as handle:
            if handle.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                return 0        # its bytes, not an array (refused in read_npz when it is x or y)
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise DatasetError(f"{path}: {member.filename}: unsupported .npy version {version}")
        shape, _, dtype = read_header(handle)
    elements = int(np.prod(shape, dtype=object))
    declared = elements * dtype.itemsize
    if declared > member.file_size:
        raise DatasetError(f"{path}: {member.filename} declares {declared} bytes of data but holds "
                           f"{member.file_size}")
    return declared + elements * np.dtype(np.float32).itemsize


def _label_problem(label) -> str:
    """What is wrong with a class label out of range (negative, or MAX_CLASSES or more)."""
    if label < 0:
        return f"class label {int(label)} is negative"
    return f"class label {int(label)} too large: at most {MAX_CLASSES} classes"


def _target_array(y: np.ndarray, labels: bool, where: Path) -> np.ndarray:
    """Class labels (whole numbers: an NPZ's integers, a CSV's integral column) become int64, checked before the
    cast, others regression targets (float32). `where`: the file, named in a message."""
    if labels:
        outside = np.flatnonzero((y < 0) | (y >= MAX_CLASSES))      # (a CSV's are named by their line before)
        if len(outside):
            raise DatasetError(f"{where}: y[{outside[0]}]: {_label_problem(y[outside[0]])} (integers are class "
                               "labels: for a regression target, save y as floats)")
        if len(y) and y.min() == y.max():     # trained as such: loss 0, accuracy 1.0 from the first step, unsaid
            raise DatasetError(f"{where}: every sample is of class {int(y.min())}: one class, nothing to classify "
                               "(is the target column the right one?)")
        return y.astype(np.int64)
    y = y.astype(np.float32)
    if len(y) and y.min() == y.max():      # as one class: loss ~0 from the first step, the job "completed" unsaid
        raise DatasetError(f"{where}: every sample's target is {float(y.min()):g}: one value, nothing to learn "
                           "(is the target column the right one?)")
    return y
