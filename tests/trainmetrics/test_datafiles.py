"""The dataset readers the trainer and the job server share (trainmetrics.datafiles): what they cost in memory
and the values they refuse."""

import io
import re
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from trainmetrics import datafiles
from trainmetrics.datafiles import MAX_RECORD_CHARS, DatasetError, read_csv, read_npz


def peak_bytes(read, *args) -> int:
    tracemalloc.start()
    try:
        read(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_csv_of_short_rows_costs_a_few_times_its_size(tmp_path):
    """Rows held as lists of Python floats took ~50 times the file (a 32 MiB upload: 1.7 GB in the job
    server; 256 MiB, the default limit: ~13 GB). Each value is kept as float32 (features) or float64 (target)."""
    path = tmp_path / "short.csv"
    path.write_text("a,label\n" + "0,1\n0,0\n" * 25_000)
    x, y = read_csv(path)
    assert x.shape == (50_000, 1) and x.dtype == np.float32 and y.dtype == np.int64 and y.sum() == 25_000
    assert peak_bytes(read_csv, path) < 8 * path.stat().st_size


def test_a_csv_row_too_wide_to_keep_is_refused_before_it_is_read_whole(tmp_path):
    """The csv module builds a row whole, each cell a Python string: a header and one row of two-character cells
    took ~30 times the file in memory (a 256 MiB upload: ~8 GB in the job server, two checked at once)."""
    path = tmp_path / "wide.csv"
    columns = MAX_RECORD_CHARS // 3 + 1
    path.write_text(",".join(f"{i % 100:02}" for i in range(columns)) + ",label\n" + "10," * columns + "1\n")
    with pytest.raises(DatasetError, match=f"line 1 starts a row of more than {MAX_RECORD_CHARS} characters"):
        read_csv(path)
    assert peak_bytes(lambda: pytest.raises(DatasetError, read_csv, path)) < 4 * path.stat().st_size


def test_a_csv_row_over_many_lines_counts_every_line_of_it(tmp_path, monkeypatch):
    """A quoted cell may hold line breaks: a row of many short lines is as wide as their sum."""
    monkeypatch.setattr(datafiles, "MAX_RECORD_CHARS", 100)
    path = tmp_path / "lines.csv"
    path.write_text("a,label\n1,0\n" + ",".join(['"1\n"'] * 40) + "\n2,1\n")
    with pytest.raises(DatasetError, match="line 3 starts a row of more than 100 characters"):
        read_csv(path)
    path.write_text("a,label\n" + "1,0\n2,1\n" * 50)          # many lines, each row short: no limit in all
    assert read_csv(path)[0].shape == (100, 1)


@pytest.mark.parametrize("row,column", [("1e300,1", "a"), ("1,1e300", "label"), ("-4e38,0", "a"),
                                        # an integer target beyond float32, made a float by a later row's 0.5
                                        ("1," + "1" + "0" * 40, "label")])
def test_a_csv_value_beyond_float32_is_refused(tmp_path, row, column):
    """Finite as float64, infinite as the float32 a job trains on: the upload was accepted and the job
    trained on inf."""
    path = tmp_path / "big.csv"
    path.write_text(f"a,label\n1,0\n{row}\n2,0.5\n")
    with pytest.raises(DatasetError, match=f"line 3, column '{column}': value '[^']+' beyond float32's range"):
        read_csv(path)


def test_a_class_label_past_int64_is_refused_as_too_large(tmp_path):
    """Read into int64, 99999999999999999999 wrapped negative: refused as "must be non-negative integers"."""
    path = tmp_path / "labels.csv"
    path.write_text("a,label\n1,0\n2,99999999999999999999\n")
    with pytest.raises(DatasetError, match="class label 100000000000000000000 too large: at most"):     # as float64
        read_csv(path)


def test_a_negative_integer_is_a_regression_target_when_the_column_has_fractions(tmp_path):
    """A negative whole number is refused as a class label only: a later fraction makes the column a regression
    target, where it is a value like any other."""
    path = tmp_path / "signed.csv"
    path.write_text("a,label\n1,-3\n2,0.5\n3,20000\n")
    x, y = read_csv(path)
    assert y.dtype == np.float32 and y.tolist() == [-3.0, 0.5, 20000.0]


def test_an_npz_target_beyond_float32_is_refused(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, x=np.zeros((10, 2)), y=np.array([1.0] * 9 + [1e300]))
    with pytest.raises(DatasetError, match="y has values beyond float32's range"):
        read_npz(path)


@pytest.mark.parametrize("array,durations", [("x", np.ones((10, 2), dtype="timedelta64[s]")),
                                              ("y", np.array([3, 7] * 5, dtype="timedelta64[s]"))])
def test_an_npz_array_of_durations_is_refused_as_not_numeric(tmp_path, array, durations):
    """numpy files timedelta64 under the integers (np.number), so a y of durations was taken for class labels,
    counts of its unit, and an x of them trained on as such; datetime64 and bool arrays were refused."""
    arrays = {"x": np.ones((10, 2)), "y": np.array([0, 1] * 5), array: durations}
    np.savez(tmp_path / "durations.npz", **arrays)
    with pytest.raises(DatasetError, match="must be numeric.*timedelta64"):
        read_npz(tmp_path / "durations.npz")


def test_an_npz_is_limited_by_what_it_takes_as_float32(tmp_path):
    """The limit counted the bytes stored: 200 MiB of uint8 (a 200 KB upload, compressed) took 1 GiB once
    made float32 and checked."""
    path = tmp_path / "bytes.npz"
    np.savez_compressed(path, x=np.zeros((3 << 20, 1), dtype=np.uint8), y=np.arange(3 << 20, dtype=np.uint8) % 2)
    assert path.stat().st_size < 100_000
    with pytest.raises(DatasetError, match="in memory as float32, over the 16777216-byte limit"):
        read_npz(path, 16 << 20)
    x, y = read_npz(path, 64 << 20)
    assert x.shape == (3 << 20, 1) and x.dtype == np.float32


@pytest.mark.parametrize("cell", ["1_000", "\u0661\u0662", "\u00a01", "1\u2003", "\uff11"])
def test_a_csv_number_is_written_in_ascii_digits(tmp_path, cell):
    """Python's float() reads `1_000` as 1000, Arabic-Indic or full-width digits as numbers and Unicode spaces as
    blanks: a CSV a spreadsheet or numpy reads as text trained on numbers. A data value is ASCII (digits, sign,
    point, exponent; spaces around it), the header's names may be anything."""
    path = tmp_path / "odd.csv"
    path.write_text(f"\u00e9t\u00e9,label\n1,0\n{cell},1\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=re.escape(f"line 3, column '\u00e9t\u00e9': non-numeric value {cell!r}")):
        read_csv(path)


def test_a_csv_number_may_have_spaces_a_sign_and_an_exponent(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("a, b ,label\n 1.5 ,-2e3,0\n+.5,\t7.,1\n", encoding="utf-8")
    x, y = read_csv(path)
    assert x.tolist() == [[1.5, -2000.0], [0.5, 7.0]] and y.tolist() == [0, 1]


@pytest.mark.parametrize("make", ["csv", "npz"])
def test_a_target_of_one_class_is_refused(tmp_path, make):
    """Every sample of one class (a wrong target column, a filtered export): the job trained it to loss 0 and
    accuracy 1.0 from the first step and completed, nothing said."""
    if make == "csv":
        path = tmp_path / "one.csv"
        path.write_text("a,label\n" + "".join(f"{i},3\n" for i in range(20)))
        read = read_csv
    else:
        path = tmp_path / "one.npz"
        np.savez(path, x=np.arange(40.0).reshape(20, 2), y=np.full(20, 3))
        read = read_npz
    with pytest.raises(DatasetError, match="every sample is of class 3: one class, nothing to classify"):
        read(path)


@pytest.mark.parametrize("row,said", [
    ("1,2,3,4,nan,0", "line 3, column 'e': NaN or infinite value 'nan'"),
    ("1,2,3,4,5, -inf ", "line 3, column 'label': NaN or infinite value '-inf'"),
    ("1,2,3,4,5,", "line 3, column 'label': non-numeric value ''"),
    ("1,x,3,4,5,0", "line 3, column 2 ('b'): non-numeric value 'x'"),        # 'b' names two columns
    ("1,2,3,,5,0", "line 3, column 4 (unnamed): non-numeric value ''"),
    # float() reads 1e400 as inf: it was "NaN or infinite value", for a number too large
    ("1,2,3,4,1e400,0", "line 3, column 'e': value '1e400' beyond float32's range (±3.403e+38): infinite in "
                        "training")])
def test_a_bad_csv_cell_is_named_by_its_line_column_and_value(tmp_path, row, said):
    """A NaN or infinite value was named by its line alone, and a non-numeric one by its line and value: which
    of a wide file's columns was at fault was left to be searched for (the README promised its line and column)."""
    path = tmp_path / "cells.csv"
    path.write_text(f"a,b,b,,e,label\n1,2,3,4,5,0\n{row}\n")
    with pytest.raises(DatasetError) as raised:
        read_csv(path)
    assert str(raised.value) == f"{path}: {said}"


def test_a_header_name_with_a_line_break_is_said_on_one_line(tmp_path):
    """A quoted header name may hold a line break: named as it was, a missing target's message (the trainer's
    one-line error, its log) ran onto a second line."""
    path = tmp_path / "header.csv"
    path.write_text('"a\nb",c\tX,d\n1,2,3\n4,5,6\n')
    with pytest.raises(DatasetError) as raised:
        read_csv(path)
    assert str(raised.value) == f"{path}: no target column 'label' among its 3 columns (a\\nb, c\\tX, d)"


def zip_listing_many_members(path: Path, members: int) -> Path:
    """A zip whose central directory lists `members` empty members, all one local entry: ~47 bytes a member."""
    import struct

    name = b"a"
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
    entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0)
    directory = (entry + name) * members
    zip64_end = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, members, members, len(directory),
                            len(local))
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(local) + len(directory), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(local + directory + zip64_end + locator + end)
    return path


def test_an_npz_listing_a_million_members_is_refused_before_zipfile_reads_its_list(tmp_path):
    """zipfile parsed the whole central directory first (~700 bytes of memory a member): 2 million members in a
    94 MB file took 1.4 GB and 34 s, then were named one by one in a message of megabytes."""
    path = zip_listing_many_members(tmp_path / "many.npz", 1_000_000)
    with pytest.raises(DatasetError, match=r"list of members takes 47000000 bytes, over the 1048576-byte limit"):
        read_npz(path)


def test_an_npz_without_x_and_y_names_only_its_first_members(tmp_path):
    """Every member's name was in the message: a zip of 20,000 members gave a 100 KB one-line error."""
    with zipfile.ZipFile(tmp_path / "many.npz", "w") as archive:
        for number in range(1000):
            archive.writestr(f"a{number}.txt", b"")
    with pytest.raises(DatasetError) as raised:
        read_npz(tmp_path / "many.npz")
    assert str(raised.value).endswith("found ['a0.txt', 'a1.txt', 'a2.txt', 'a3.txt', 'a4.txt', 'a5.txt', "
                                      "'a6.txt', 'a7.txt', ... (1000 in all)]")


@pytest.mark.parametrize("second", ["x.npy", "x"])
def test_an_npz_holding_array_x_twice_is_refused(tmp_path, second):
    """np.load took one of the two (the last `x.npy`, or `x` over `x.npy`), unsaid: the other may be the data."""
    with warnings.catch_warnings(), zipfile.ZipFile(tmp_path / "twice.npz", "w") as archive:
        warnings.simplefilter("ignore")     # zipfile's warning of a duplicate name
        members = [("x.npy", np.ones((4, 2))), ("y.npy", np.array([0, 1, 0, 1])), (second, np.full((4, 2), 2.0))]
        for name, array in members:
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(name, buffer.getvalue())
    with pytest.raises(DatasetError, match=f"array 'x' is stored twice \\(members 'x.npy' and '{second}'\\)"):
        read_npz(tmp_path / "twice.npz")


def test_blank_lines_before_a_csvs_header_are_skipped_as_between_its_rows(tmp_path):
    """A file starting with a blank line (an export's, a hand edit's) was refused as "empty file (expected a header
    row)" though its blank lines between rows were skipped; the job server's column list read the blank line as
    the header too. A line of spaces or commas is blank alike."""
    path = tmp_path / "lead.csv"
    path.write_text("\n  \n,,\nx,label\n1,0\n\n2,1\n")
    features, target = read_csv(path)
    assert features.tolist() == [[1.0], [2.0]] and target.tolist() == [0, 1]
    assert datafiles.csv_columns(path) == ["x", "label"]
    (tmp_path / "blank.csv").write_text("\n\n")
    with pytest.raises(DatasetError, match="empty file"):
        read_csv(tmp_path / "blank.csv")
