"""Hostile dataset uploads to the real job server (--max-upload-bytes 1 MiB): every one a JSON 4xx, the
server's RSS bounded, nothing left in DATA_DIR/datasets."""

import io
import socket
import struct
import time
import urllib.parse
import zipfile

import httpx
import numpy as np
import pytest

from .conftest import MAX_UPLOAD_BYTES


def npz_bytes(arrays: dict[str, np.ndarray], compress: bool = True) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def lying_npz(shape: tuple[int, ...]) -> bytes:
    """A tiny NPZ whose x.npy header declares `shape` (float64) but holds 16 bytes of data; the zip member's
    declared size is honest (tiny), so only numpy's reading of the header sees the huge array."""
    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    text = repr(header).encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\x00" * 16
    y = io.BytesIO()
    np.save(y, np.zeros(2))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy)
        archive.writestr("y.npy", y.getvalue())
    return buffer.getvalue()


def npz_members(members: dict[str, bytes | np.ndarray]) -> bytes:
    """An NPZ with the members named as given (np.savez names each `KEY.npy`): an array as np.save writes it, or
    the bytes given."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, value in members.items():
            if isinstance(value, np.ndarray):
                array, value = value, io.BytesIO()
                np.save(value, array)
                value = value.getvalue()
            archive.writestr(name, value)
    return buffer.getvalue()


def altered_npz(change: str) -> bytes:
    """A valid NPZ (x 8 x 2, y 8 labels) altered as an archive from elsewhere can be: "damaged" (x's deflate stream
    broken, as a bit flipped in transfer breaks it) or "encrypted" (its members flagged as encrypted: `zip -e`)."""
    data = bytearray(npz_bytes({"x": np.ones((8, 2)), "y": np.arange(8) % 2}))
    if change == "damaged":
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
            header = archive.infolist()[0].header_offset
        name_length, extra_length = struct.unpack_from("<HH", data, header + 26)    # the local file header's
        start = header + 30 + name_length + extra_length                           # x.npy's deflate stream
        data[start:start + 8] = b"\xff" * 8        # a deflate block of type 3, which does not exist
    else:
        for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = data.find(signature)
            while at >= 0:
                data[at + flags_at] |= 1        # general purpose flag bit 0: encrypted
                at = data.find(signature, at + 4)
    return bytes(data)


def npy_then_npz() -> bytes:
    """A .npy array with a valid NPZ after it: zipfile finds the archive by its end (data before it is allowed), and
    np.load decides by the first bytes, an array's."""
    buffer = io.BytesIO()
    np.save(buffer, np.arange(6.0).reshape(3, 2))
    return buffer.getvalue() + npz_bytes({"x": np.ones((8, 2)), "y": np.arange(8) % 2})


def deflate_bomb() -> bytes:
    """64 MiB of zeros as x (compresses to ~64 KiB): honest sizes, 64x the upload limit uncompressed."""
    return npz_bytes({"x": np.zeros((8 << 20, 1)), "y": np.zeros(8 << 20)})


def chunks(total: int, size: int = 64 * 1024):
    sent = 0
    while sent < total:
        yield b"1" * min(size, total - sent)
        sent += size


def leftovers(stack) -> list[str]:
    return sorted(p.name for p in (stack.data_dir / "datasets").iterdir())


CASES = {
    "declared oversize": dict(name="big.csv", content=b"a,label\n" + b"1,0\n" * (MAX_UPLOAD_BYTES // 4 + 10),
                              status=413),
    "chunked oversize": dict(name="big.csv", content=lambda: chunks(3 * MAX_UPLOAD_BYTES), status=413),
    "multipart form": dict(name="form.csv", files=True, status=415),
    "json wrapper": dict(name="data.csv", content=b'{"file": "a,label\\n1,0\\n"}',
                         headers={"content-type": "application/json"}, status=415),
    "malformed multipart": dict(name="m.csv", content=b"--xx\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\n1,0",
                                headers={"content-type": "multipart/form-data; boundary=yy"}, status=415),
    "deflate bomb npz": dict(name="bomb.npz", content=deflate_bomb, status=400),
    # 3 MiB of bytes (under the 4 MiB inflation limit, a few KB compressed): 15 MiB once made float32.
    "npz of bytes 5x as float32": dict(name="bytes.npz", content=lambda: npz_bytes(
        {"x": np.zeros((3 << 19, 1), dtype=np.uint8), "y": np.zeros(3 << 19, dtype=np.uint8)}), status=400),
    # The same, its members named `x` and `y` (np.load takes them for x.npy and y.npy): accepted, the check
    # counted only members named *.npy.
    "npz of bytes 5x as float32, members without .npy": dict(name="bare.npz", content=lambda: npz_members(
        {"x": np.zeros((3 << 19, 1), dtype=np.uint8), "y": np.arange(3 << 19, dtype=np.uint8) % 2}), status=400),
    "npz header claims 8 TB": dict(name="liar.npz", content=lambda: lying_npz((10 ** 12,)), status=400),
    "npz header claims 4 GB": dict(name="liar2.npz", content=lambda: lying_npz((1 << 29, 1)), status=400),
    "npz header claims negative shape": dict(name="neg.npz", content=lambda: lying_npz((-1, 4)), status=400),
    "not a zip": dict(name="x.npz", content=b"PK\x03\x04" + b"\x00" * 100, status=400),
    # Checked as the zip at its end, then loaded as the array at its start: a TypeError, a 500.
    "npy array before an npz": dict(name="two.npz", content=npy_then_npz, status=400),
    "binary as csv": dict(name="x.csv", content=bytes(range(256)) * 8, status=400),
}


@pytest.mark.parametrize("spec", CASES.values(), ids=list(CASES))
def test_hostile_upload_is_a_json_4xx_and_leaves_nothing(stack, json_error, rss, spec):
    before = leftovers(stack)
    rss_before = rss(stack.server.pid)
    with httpx.Client(base_url=stack.server_url, timeout=60) as client:
        url = f"/api/training/datasets?name={spec['name']}"
        if spec.get("files"):
            response = client.post(url, files={"file": ("form.csv", b"a,label\n1,0\n2,1\n")})
        else:
            content = spec["content"]
            content = content() if callable(content) else content
            try:
                response = client.post(url, content=content, headers=spec.get("headers"))
            except httpx.WriteError:     # the server answered and closed before the whole body went out
                pytest.fail("the server closed the connection without an answer")
    json_error(response, spec["status"])
    assert leftovers(stack) == before
    growth = rss(stack.server.pid) - rss_before
    assert growth < 64 << 20, f"server RSS grew by {growth >> 20} MiB"


def test_truncated_upload_leaves_nothing(stack, rss):
    """The client declares 800 KB, sends 100 KB and closes: no dataset, no temp file, the server lives on."""
    before = leftovers(stack)
    port = urllib.parse.urlsplit(stack.server_url).port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /api/training/datasets?name=cut.csv HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/octet-stream\r\nContent-Length: 800000\r\n\r\n")
        sock.sendall(b"a,label\n" + b"1,0\n" * 25000)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and leftovers(stack) != before:
        time.sleep(0.1)
    assert leftovers(stack) == before
    assert httpx.get(f"{stack.server_url}/healthz", timeout=10).status_code == 200


def test_a_valid_upload_still_works_after_the_hostile_ones(stack):
    npz = npz_bytes({"x": np.random.default_rng(0).normal(size=(64, 3)), "y": np.arange(64) % 2})
    response = httpx.post(f"{stack.server_url}/api/training/datasets", params={"name": "ok.npz"}, content=npz,
                          timeout=30)
    assert response.status_code == 201, response.text
    assert (response.json()["rows"], response.json()["features"]) == (64, 3)


UNUSABLE = {
    # Accepted before, then the job "completed" on nothing, or trained on the real parts alone.
    "npz with no features": dict(name="none.npz", content=lambda: npz_bytes({"x": np.zeros((5, 0)), "y": np.arange(5)}),
                                 problem="no features"),
    "npz with complex x": dict(name="complex.npz", problem="real numbers",
                               content=lambda: npz_bytes({"x": np.ones((5, 2)) * (1 + 2j), "y": np.arange(5) % 2})),
    # np.load hands a member without the .npy magic over as bytes: an AttributeError, a 500.
    "npz whose x is not an array": dict(name="bytes.npz", problem="x and y must be .npy arrays",
                                        content=lambda: npz_members({"x": b"not an array", "y": np.arange(4) % 2})),
    # zlib's and zipfile's own errors (a broken stream, a member that needs a password): a 500.
    "npz damaged in transfer": dict(name="damaged.npz", problem="not a readable NPZ archive",
                                    content=lambda: altered_npz("damaged")),
    "npz with a password": dict(name="secret.npz", problem="not a readable NPZ archive",
                                content=lambda: altered_npz("encrypted")),
    "target for an npz": dict(name="t.npz", params={"target": "y"}, problem="target: only for a CSV",
                              content=lambda: npz_bytes({"x": np.ones((5, 2)), "y": np.arange(5) % 2})),
    # "class labels must be non-negative integers": which line, which column?
    "a negative class label": dict(name="n.csv", content=b"a,label\n1,0\n2,1\n3,-2\n",
                                   problem="upload: line 4, column 'label': class label -2 is negative"),
    "a target the csv lacks": dict(name="t.csv", params={"target": "y"}, content=b"a,label\n1,0\n2,1\n",
                                   problem="target: no target column 'y'"),
    "a target with a control character": dict(name="t.csv", params={"target": "la\tbel"},
                                              content=b"a,la\tbel\n1,0\n2,1\n", problem="target: a column name"),
    # Accepted (201), then every job on it failed at its start: a target's squared error overflows float32 summed
    # over the evaluation's batch of 512 rows, whatever the job's own batch size (the trainer's own check).
    "a regression target that overflows any job's loss": dict(
        name="huge.csv", problem="upload: regression targets up to 1e+18: their squared error overflows float32 in "
                                 "a batch of 512", content=lambda: b"a,y\n" + b"".join(
            b"%d,%s\n" % (i, b"1e18" if i == 7 else b"2.5") for i in range(3000)), params={"target": "y"}),
    # As one class: accepted, and a job on it "completed" at a loss of 0.001 from its first step, nothing learnt.
    "a regression target of one value": dict(name="flat.csv", content=b"a,b,label\n1,2,2.5\n3,4,2.5\n5,6,2.5\n",
                                             problem="upload: every sample's target is 2.5"),
    "an npz whose float y is one value": dict(name="flat.npz", problem="upload: every sample's target is 0",
                                              content=lambda: npz_bytes({"x": np.eye(4), "y": np.zeros(4)})),
}


@pytest.mark.parametrize("spec", UNUSABLE.values(), ids=list(UNUSABLE))
def test_an_unusable_upload_is_400_naming_why(stack, json_error, spec):
    before = leftovers(stack)
    content = spec["content"]() if callable(spec["content"]) else spec["content"]
    response = httpx.post(f"{stack.server_url}/api/training/datasets", params={"name": spec["name"],
                          **spec.get("params", {})}, content=content, timeout=30)
    assert spec["problem"] in json_error(response, 400)["message"], response.text
    assert leftovers(stack) == before


def test_a_csv_with_a_byte_order_mark_is_read_as_excel_wrote_it(stack):
    content = "\ufefflabel,a,b\n0,1,2\n1,3,4\n0,5,6\n".encode()        # Excel's "CSV UTF-8"
    response = httpx.post(f"{stack.server_url}/api/training/datasets", params={"name": "excel.csv"},
                          content=content, timeout=30)
    assert response.status_code == 201, response.text
    assert (response.json()["rows"], response.json()["features"], response.json()["target"]) == (3, 2, "label")


def test_an_upload_names_its_target_column(stack):
    response = httpx.post(f"{stack.server_url}/api/training/datasets", params={"name": "y.csv", "target": "y"},
                          content=b"a,b,y\n1,2,0\n3,4,1\n5,6,0\n", timeout=30)
    assert response.status_code == 201, response.text
    assert (response.json()["features"], response.json()["target"]) == (2, "y")


def test_an_upload_the_server_could_not_record_leaves_no_dataset_file(stack):
    """The database locked by another process past the store's 5 s (a backup, sqlite3 at a prompt): the upload's
    record failed (a 500) after its file had been moved into place, and the file stayed for good, listed nowhere."""
    import sqlite3

    from trainmetrics.jobserver.store import DATABASE_NAME

    before = leftovers(stack)
    other = sqlite3.connect(stack.data_dir / DATABASE_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        answer = httpx.post(f"{stack.server_url}/api/training/datasets", params={"name": "locked.csv"},
                            content=b"a,b,label\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n", timeout=30)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal"
    assert leftovers(stack) == before
