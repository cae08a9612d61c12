"""The job server through a real HTTP server on loopback, real child training processes and a real Prometheus."""

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.prometheus_proxy import CapturingProxy
from trainmetrics.prometheus_process import PrometheusServer, free_port

from .server_process import TOKENS, Server, wait_job, write_tokens


def classification_csv(path: Path, rows: int = 480, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2.0, size=(3, 4))
    labels = rng.integers(0, 3, size=rows)
    x = centers[labels] + rng.normal(0, 1.0, size=(rows, 4))
    lines = ["f1,f2,f3,f4,label"] + [",".join(f"{v:.4f}" for v in row) + f",{label}" for row, label in zip(x, labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def stack(tmp_path, executor):
    port = free_port()     # the server's jobs reach Prometheus through its http_sd
    prometheus = PrometheusServer(tmp_path / "prometheus", static_targets={"server": [f"127.0.0.1:{port}"]},
                                  job_server=f"http://127.0.0.1:{port}")
    prometheus.start()
    server = Server(tmp_path / "data", extra=executor)
    server.data_dir.mkdir()
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    server.start()
    yield server, prometheus
    server.stop()
    prometheus.stop()


def steps_by_instance(prometheus, job_id: str, start: float) -> dict[str, list[float]]:
    series = prometheus.query_range(f'trainer_steps_total{{job_id="{job_id}"}}', start, time.time(), 0.25)
    return {s["metric"]["instance"]: [float(v) for _, v in s["values"]] for s in series}


def wait_logged(log: Path, needle: str, timeout: float = 90) -> None:
    """Wait until the job's log holds needle (on either executor the log is in the job's directory)."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and needle in log.read_text()):
        assert time.monotonic() < deadline, f"{needle!r} not in {log} within {timeout} s"
        time.sleep(0.1)


def test_upload_submit_pause_resume_complete_download(stack, tmp_path):
    server, prometheus = stack
    began = time.time()
    client = server.client()
    csv = classification_csv(tmp_path / "train.csv")
    uploaded = client.post("/api/training/datasets", params={"name": "train.csv"}, content=csv.read_bytes())
    assert uploaded.status_code == 201, uploaded.text
    dataset = uploaded.json()
    assert (dataset["rows"], dataset["features"], dataset["format"]) == (480, 4, "csv")
    assert client.get("/api/training/datasets").json()["datasets"][0]["dataset_id"] == dataset["dataset_id"]

    submitted = client.post("/api/training/jobs", json={"model": "mlp", "dataset": dataset["dataset_id"],
                                                        "epochs": 120, "batch_size": 16, "log_every": 10,
                                                        "checkpoint_every": 50, "job_id": "flow-1"})
    assert submitted.status_code == 201, submitted.text
    prometheus.wait_for('trainer_steps_total{job_id="flow-1"} > 100', timeout=90)
    # One job at a time on a CPU machine: a second one waits, and Prometheus sees it queued (via the server).
    assert client.post("/api/training/jobs", json={"dataset": "blobs", "job_id": "flow-2"}).json()["state"] == "queued"
    prometheus.wait_for('trainer_job_state{job_id="flow-2",state="queued"} == 1', timeout=30)
    assert client.post("/api/training/jobs/flow-2/cancel").json()["state"] == "cancelled"
    paused = client.post("/api/training/jobs/flow-1/pause")
    assert paused.status_code == 202 and paused.json()["stop_requested"] == "paused", paused.text
    assert wait_job(client, "flow-1", lambda j: j["state"] != "running")["state"] == "paused"
    prometheus.wait_for('trainer_job_state{job_id="flow-1",state="paused"} == 1', timeout=30)
    assert client.post("/api/training/jobs/flow-1/pause").status_code == 409       # not running

    assert client.post("/api/training/jobs/flow-1/resume").json()["state"] in ("queued", "running")
    done = wait_job(client, "flow-1", lambda j: j["state"] in ("completed", "failed"), timeout=180)
    assert done["state"] == "completed", done
    assert client.post("/api/training/jobs/flow-1/resume").status_code == 409      # completed

    # Prometheus: two processes; the second started exactly where the first paused; totals equal an
    # uninterrupted run's (120 epochs x 384 training rows / 16).
    prometheus.wait_for('last_over_time(trainer_job_state{job_id="flow-1",state="completed"}[5m]) == 1', timeout=30)
    by_instance = steps_by_instance(prometheus, "flow-1", began)
    assert len(by_instance) == 2, by_instance
    first, second = sorted(by_instance.values(), key=lambda values: values[0])
    assert first[-1] <= second[0]
    assert max(second) == 120 * 24
    samples = prometheus.query('max(last_over_time(trainer_samples_total{job_id="flow-1"}[5m]))')
    assert float(samples[0]["value"][1]) == 120 * 384

    model = client.get("/api/training/jobs/flow-1/download/model")
    assert model.status_code == 200
    (tmp_path / "model.pt").write_bytes(model.content)
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    from trainmetrics.trainer.data import read_csv
    from trainmetrics.trainer.models import MLP

    net = MLP(4, 3)
    net.load_state_dict(weights)
    x, y = read_csv(csv)
    accuracy = (net(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert accuracy > 0.8                       # 3 classes: chance is 1/3

    checkpoints = client.get("/api/training/jobs/flow-1/checkpoints").json()["checkpoints"]
    assert checkpoints and all(c["name"].startswith("step-") for c in checkpoints)
    one = client.get(f"/api/training/jobs/flow-1/download/checkpoints/{checkpoints[-1]['name']}")
    assert one.status_code == 200 and len(one.content) == checkpoints[-1]["size_bytes"]


def test_cancel_queue_and_invalid_transitions(tmp_path, executor):
    server = Server(tmp_path, extra=("--max-concurrent", "1", *executor))
    server.start()
    try:
        client = server.client()
        jobs_health = client.get("/healthz").json()["checks"]["jobs"]           # the executor answers for itself
        assert jobs_health["status"] == "ok" and jobs_health["executor"] == ("ray" if executor else "local")
        assert ("ray_version" in jobs_health) == bool(executor)
        spec = {"model": "mlp", "dataset": "blobs", "epochs": 200, "batch_size": 16, "log_every": 10}
        assert client.post("/api/training/jobs", json={**spec, "job_id": "long-1"}).status_code == 201
        assert client.post("/api/training/jobs", json={**spec, "job_id": "waits-1"}).json()["state"] == "queued"
        assert client.post("/api/training/jobs", json={**spec, "job_id": "long-1"}).status_code == 409
        wait_job(client, "long-1", lambda j: j["state"] == "running")
        assert client.post("/api/training/jobs/waits-1/pause").status_code == 409      # queued
        assert client.post("/api/training/jobs/waits-1/cancel").json()["state"] == "cancelled"
        wait_logged(tmp_path / "jobs" / "long-1" / "train.log", "step=")              # it trains
        accepted = client.post("/api/training/jobs/long-1/cancel")
        assert accepted.status_code == 202 and accepted.json()["stop_requested"] == "cancelled"
        assert client.post("/api/training/jobs/long-1/pause").status_code == 409      # a cancel is under way
        cancelled = wait_job(client, "long-1", lambda j: j["state"] != "running")
        assert cancelled["state"] == "cancelled" and cancelled["exit_code"] == 3
        assert client.post("/api/training/jobs/long-1/cancel").status_code == 409
        assert client.post("/api/training/jobs/long-1/resume").status_code == 409
        assert client.get("/api/training/jobs/long-1/checkpoints").json()["checkpoints"]   # final checkpoint
        assert client.get("/api/training/jobs/long-1/download/model").status_code == 404   # never finished
        # Nor with the weights there (a job killed after writing them, or still running: served before).
        (tmp_path / "jobs" / "long-1" / "checkpoints" / "model.pt").write_bytes(b"weights")
        assert client.get("/api/training/jobs/long-1/download/model").status_code == 404
    finally:
        server.stop()


@pytest.mark.parametrize("body,field", [
    ({"model": "resnet"}, "model"), ({"dataset": "nope"}, "dataset"), ({"epochs": 0}, "epochs"),
    ({"epochs": "3"}, "epochs"), ({"job_id": "a b"}, "job_id"), ({"colour": "red"}, "colour"),
    ({"lr": -1}, "lr"), ({"batch_size": True}, "batch_size"),
    # Accepted before, then failed at the start (numpy, torch); a fork per worker with no bound.
    ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"workers": 10**6}, "workers"),
    # Accepted before: a batch of 10**20 failed the job in islice, an lr of 1e308 overflowed float32 in torch.
    ({"batch_size": 10**20}, "batch_size"), ({"epochs": 2**31}, "epochs"), ({"lr": 1e308}, "lr"),
    ({"log_every": 2**31}, "log_every"),
    ({"name": "two\nlines"}, "name"), ({"name": "x" * 201}, "name"),
    # Line breaks to str.splitlines() (a log line split in two), and a terminal's escape.
    ({"name": "a\u0085b"}, "name"), ({"name": "a\u2028b"}, "name"), ({"target": "a\u2029b"}, "target"),
    ({"name": "a\x9b31mred"}, "name"), ({"dataset": ""}, "dataset: expected 1 to 1000 characters, got 0"),
    ({"target": "t" * 1001}, "target: expected 1 to 1000 characters, got 1001"),
    ({"device": "cuda:\u0661"}, "device"),      # a digit of another script (\d took it; torch would not)
    # A NUL reached the job's argv: Popen refused it on every tick, and no queued job started again.
    ({"target": "la\x00bel"}, "target"), ({"target": "a\tb"}, "target"), ({"dataset": "ds\x00"}, "dataset"),
    ({"device": "cpu\x00"}, "device"),
    # Accepted, then refused by the trainer: a failed job no route could reach (its path was 400 too).
    ({"job_id": "jobs"}, "job_id"),
    # Accepted, and each rank trained on the GPU of its local rank: the index was ignored.
    ({"device": "cuda:1", "nproc": 2}, "device: 'cuda:1' names one GPU, but each of the 2 ranks"),
])
def test_bad_job_specs_are_400_naming_the_field(body, field, server_only):
    response = server_only.client().post("/api/training/jobs", json=body)
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]


@pytest.mark.parametrize("params,problem", [
    ([("colour", "red")], "colour: unknown parameter"),
    ([("state", "running"), ("state", "failed")], "state: given more than once"),
    ([("state", "exploded")], "state: one of"),
])
def test_bad_list_parameters_are_400_naming_the_parameter(params, problem, server_only):
    response = server_only.client().get("/api/training/jobs", params=params)
    assert response.status_code == 400 and problem in response.json()["error"]["message"], response.text


@pytest.mark.parametrize("headers", [{"origin": "http://evil.example"}, {"origin": "null"},
                                     {"origin": "http://127.0.0.1:1"}, {"sec-fetch-site": "cross-site"}],
                         ids=["other-site", "null", "other-port", "fetch-metadata"])
def test_a_request_a_browser_sent_for_another_sites_page_is_refused(headers, server_only):
    """A page can make a browser POST to a loopback job server without tokens, with no preflight, when the
    request has no body (pause, cancel) or a plain one (an upload): it was carried out. Browsers mark such
    requests (Origin, Sec-Fetch-Site); clients send neither."""
    client = server_only.client()
    refused = client.post("/api/training/jobs/some-job/cancel", headers=headers)
    assert refused.status_code == 403 and "another site's page" in refused.json()["error"]["message"]
    assert client.post("/api/training/jobs/some-job/cancel").status_code == 404          # a client: not refused
    own = {"origin": f"http://127.0.0.1:{server_only.port}"}
    assert client.post("/api/training/jobs/some-job/cancel", headers=own).status_code == 404   # its own page
    assert client.get("/api/training/jobs", headers=headers).status_code == 200          # reading is no harm


def test_a_loopback_server_without_tokens_answers_loopback_names_only(server_only):
    """DNS rebinding: a page whose name was made to resolve to 127.0.0.1 is, to the browser, the server's own
    origin (Origin and Host alike, so the cross-site check passed): it read every job and cancelled one (202)."""
    client = server_only.client()
    client.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 1, "job_id": "rebind-1"})
    port = server_only.port
    page = {"host": f"rebind.evil.example:{port}", "origin": f"http://rebind.evil.example:{port}"}
    for answer in (client.get("/api/training/jobs", headers=page),
                   client.post("/api/training/jobs/rebind-1/cancel", headers=page),
                   client.get("/api/training/analytics/summary", headers={"host": "10.1.2.3"})):
        assert answer.status_code == 403 and "not a loopback name" in answer.json()["error"]["message"]
    assert client.get("/api/training/jobs/rebind-1").json()["state"] != "cancelled"
    for host in (f"localhost:{port}", "LOCALHOST", f"app.localhost:{port}", f"127.0.0.2:{port}", f"[::1]:{port}",
                 "::1", f"127.0.0.1:{port}"):
        assert client.get("/api/training/jobs", headers={"host": host}).status_code == 200, host
    assert client.post("/api/training/jobs/rebind-1/cancel").status_code == 202


@pytest.fixture(scope="module")
def server_only(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("server"), extra=("--max-upload-bytes", "2000"))
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("name,content,status,code", [
    ("big.csv", b"a,label\n" + b"1,0\n" * 1000, 413, "too_large"),
    ("ragged.csv", b"a,b,label\n1,2,0\n1,2\n", 400, "bad_dataset"),
    ("words.csv", b"a,label\nx,0\ny,1\n", 400, "bad_dataset"),
    ("empty.csv", b"", 400, "bad_dataset"),          # docs/api.md: an empty body is a bad dataset
    ("data.exe", b"a,label\n1,0\n2,1\n", 400, "bad_request"),
    ("../escape.csv", b"a,label\n1,0\n2,1\n", 400, "bad_request"),
    ("bad.npz", b"PK not really a zip", 400, "bad_dataset"),
    ("bomb.npz", "zip-bomb", 400, "bad_dataset"),
    ("twice.npz", "x-twice", 400, "bad_dataset"),
])
def test_bad_uploads_are_rejected_and_leave_nothing(name, content, status, code, server_only, tmp_path):
    if content == "zip-bomb":    # 1 MiB of zeros in about 1 KB: over 4 x this server's 2000-byte upload limit
        import zipfile

        bomb = tmp_path / "bomb.npz"
        with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            with archive.open("x.npy", "w", force_zip64=True) as member:
                header = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (262144, 1), }"
                member.write(header.ljust(127, b" ") + b"\n")
                member.write(bytes(1 << 20))
        content = bomb.read_bytes()
        assert len(content) < 2000
    if content == "x-twice":     # np.load took the second x.npy, unsaid: accepted before
        from tests.trainer.test_cli import npz_members

        npz_members(tmp_path / "twice.npz", x=np.ones((4, 2)), y=np.array([0, 1, 0, 1]),
                    extra=[("x.npy", np.full((4, 2), 2.0))])
        content = (tmp_path / "twice.npz").read_bytes()
    response = server_only.client().post("/api/training/datasets", params={"name": name}, content=content)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert list((server_only.data_dir / "datasets").iterdir()) == []


def peak_rss_bytes(pid: int) -> int:
    """A process's peak resident memory (VmHWM), from /proc."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def test_an_npz_listing_a_million_members_is_refused_in_bounded_memory(tmp_path):
    """zipfile parsed the upload's whole list of members before any check, ~700 bytes of memory a member: a
    47 MB upload took the server ~700 MB for ~20 s (a 256 MiB one, ~4 GB), then a 400 of megabytes."""
    from tests.trainmetrics.test_datafiles import zip_listing_many_members

    content = zip_listing_many_members(tmp_path / "many.npz", 1_000_000).read_bytes()
    server = Server(tmp_path / "data", extra=("--max-upload-bytes", str(64 << 20)))
    server.data_dir.mkdir()
    server.start()
    try:
        before = peak_rss_bytes(server.process.pid)
        response = server.client().post("/api/training/datasets", params={"name": "many.npz"}, content=content)
        assert response.status_code == 400, response.text[:300]
        assert response.json()["error"]["code"] == "bad_dataset"
        assert "list of members takes 47000000 bytes" in response.json()["error"]["message"]
        assert len(response.text) < 1000
        assert peak_rss_bytes(server.process.pid) - before < 200 << 20
    finally:
        server.stop()


def test_downloads_never_leave_the_job_dir(tmp_path):
    server = Server(tmp_path)
    server.start()
    try:
        client = server.client()
        client.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 1, "job_id": "dl-1"})
        job = wait_job(client, "dl-1", lambda j: j["state"] in ("completed", "failed"))
        assert job["state"] == "completed"
        ckpt_dir = tmp_path / "jobs" / "dl-1" / "checkpoints"
        (ckpt_dir / "step-000000999.pt").symlink_to("/etc/passwd")
        for name in ["../../../trainmetrics.db", "..%2F..%2Ftrainmetrics.db", "%2Fetc%2Fpasswd", "/etc/passwd",
                     "step-000000999.pt", "step-1.pt", "model.pt", "..", "%2e%2e%2f%2e%2e%2fserver.log"]:
            response = client.get(f"/api/training/jobs/dl-1/download/checkpoints/{name}")
            assert response.status_code in (400, 404), (name, response.status_code)
            assert b"root:" not in response.content and b"SQLite" not in response.content
        assert client.get("/api/training/jobs/..%2Fdl-1/checkpoints").status_code in (400, 404)
        arabic_indic = "step-" + "\u0660" * 6 + "\u0661\u0665\u0660" + ".pt"      # digits, of another script
        assert client.get(f"/api/training/jobs/dl-1/download/checkpoints/{arabic_indic}").status_code == 400

        # A checkpoint the job prunes while it is downloaded (keep_checkpoints): whole, or 404; it was checked
        # by path and opened later, and one gone in between was a 500 or an answer cut after its headers.
        (ckpt_dir / "step-000000999.pt").unlink()
        newest = max(ckpt_dir.glob("step-*.pt"))
        content, name = newest.read_bytes(), newest.name
        stop = threading.Event()

        def prune_and_restore() -> None:
            while not stop.is_set():
                newest.rename(ckpt_dir / "pruned")
                time.sleep(0.0005)
                (ckpt_dir / "pruned").rename(newest)
                time.sleep(0.0005)

        pruner = threading.Thread(target=prune_and_restore)
        pruner.start()
        try:
            answers = [client.get(f"/api/training/jobs/dl-1/download/checkpoints/{name}") for _ in range(200)]
        finally:
            stop.set()
            pruner.join()
        assert {r.status_code for r in answers} <= {200, 404}
        assert all(r.content == content for r in answers if r.status_code == 200)
        assert any(r.status_code == 200 for r in answers) and any(r.status_code == 404 for r in answers)
        # A file's answer still: a Range request (a large checkpoint's download resumed), HEAD without a body.
        url = f"/api/training/jobs/dl-1/download/checkpoints/{name}"
        part = client.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == content[10:20]
        head = client.head(url)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(content)
        assert head.headers["content-disposition"] == f'attachment; filename="dl-1-{name}"'
        # A Range it cannot serve is the API's error, as every other: it was plain text from the file answer.
        fds = len(os.listdir(f"/proc/{server.process.pid}/fd"))
        for _ in range(20):
            past = client.get(url, headers={"Range": f"bytes={len(content) + 10}-{len(content) + 20}"})
            assert past.status_code == 416 and past.json()["error"]["code"] == "range_not_satisfiable"
            assert past.headers["content-range"] == f"bytes */{len(content)}"
            for malformed in ("bytes=abc", "bytes=20-10", "lines=1-2"):
                answer = client.get(url, headers={"Range": malformed})
                assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_request", malformed
                assert answer.json()["error"]["message"].startswith("Range header: ")
        assert len(os.listdir(f"/proc/{server.process.pid}/fd")) < fds + 10      # each file's descriptor closed
    finally:
        server.stop()


@contextlib.contextmanager
def two_owners_jobs_completed(tmp_path):
    """A server with alice's and bob's tokens and one one-epoch job of each completed (alice-own, bob-secret):
    (alice's client, bob's)."""
    server = Server(tmp_path, extra=("--tokens", str(write_tokens(tmp_path / "tokens"))))
    server.start()
    try:
        alice, bob = server.client("alice"), server.client("bob")
        for client, job_id in ((alice, "alice-own"), (bob, "bob-secret")):
            client.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 1, "job_id": job_id})
            assert wait_job(client, job_id, lambda j: j["state"] in ("completed", "failed"))["state"] == "completed"
        yield alice, bob
    finally:
        server.stop()


def test_a_symlinked_checkpoint_or_job_directory_serves_nothing_of_another_job(tmp_path):
    """A job's process can replace its `checkpoints` directory (or its job directory) with a symlink to another
    owner's: O_NOFOLLOW guards only the file name, so the listing, the model and every checkpoint were bob's."""
    with two_owners_jobs_completed(tmp_path) as (alice, bob):
        jobs = tmp_path / "jobs"
        name = bob.get("/api/training/jobs/bob-secret/checkpoints").json()["checkpoints"][0]["name"]
        own = alice.get("/api/training/jobs/alice-own/checkpoints").json()["checkpoints"]
        (jobs / "alice-own" / "checkpoints").rename(jobs / "alice-own" / "kept")
        planted = [(jobs / "alice-own" / "checkpoints", jobs / "bob-secret" / "checkpoints"),
                   (jobs / "alice-own", jobs / "bob-secret")]
        for link, target in planted:
            if link.name == "alice-own":
                link.rename(jobs / "alice-kept")
            link.symlink_to(target)
            assert alice.get("/api/training/jobs/alice-own/checkpoints").json()["checkpoints"] == []
            assert alice.get("/api/training/jobs/alice-own").json()["checkpoints"] == 0
            for path in ("download/model", f"download/checkpoints/{name}"):
                answer = alice.get(f"/api/training/jobs/alice-own/{path}")
                assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found", path
                assert str(tmp_path) not in answer.text
            link.unlink()
        (jobs / "alice-kept").rename(jobs / "alice-own")
        (jobs / "alice-own" / "kept").rename(jobs / "alice-own" / "checkpoints")
        assert alice.get("/api/training/jobs/alice-own/checkpoints").json()["checkpoints"] == own      # its own: served
        assert alice.get(f"/api/training/jobs/alice-own/download/checkpoints/{own[0]['name']}").status_code == 200
        assert alice.get("/api/training/jobs/alice-own/download/model").status_code == 200


def test_a_hard_link_planted_in_a_jobs_checkpoint_directory_serves_nothing_of_the_server_or_another_job(tmp_path):
    """O_NOFOLLOW does not see a hard link: a job's own process (the server's user) could link the server's
    database, or another owner's checkpoint, at one of its checkpoint names or at model.pt, and download it."""
    with two_owners_jobs_completed(tmp_path) as (alice, _):
        own, theirs = tmp_path / "jobs" / "alice-own" / "checkpoints", tmp_path / "jobs" / "bob-secret" / "checkpoints"
        secret = max(theirs.glob("step-*.pt"))
        assert alice.get("/api/training/jobs/alice-own/download/model").status_code == 200     # its own: served
        for target in (tmp_path / "trainmetrics.db", secret):
            for name in ("step-000000999.pt", "model.pt"):
                (own / name).unlink(missing_ok=True)
                os.link(target, own / name)
                path = "download/model" if name == "model.pt" else f"download/checkpoints/{name}"
                answer = alice.get(f"/api/training/jobs/alice-own/{path}")
                assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found", (target, name)
                assert target.read_bytes()[:64] not in answer.content
                (own / name).unlink()


def test_wrapped_uploads_are_415(server_only):
    client = server_only.client()
    form = client.post("/api/training/datasets", params={"name": "a.csv"}, files={"file": ("a.csv", b"a,label\n1,0\n")})
    assert form.status_code == 415 and "request body" in form.json()["error"]["message"]
    as_json = client.post("/api/training/datasets", params={"name": "a.csv"}, json={"a": 1})
    assert as_json.status_code == 415
    assert list((server_only.data_dir / "datasets").iterdir()) == []


def test_a_bad_value_after_a_quoted_line_break_is_named_by_its_line_of_the_file(server_only):
    """Rows were counted as lines: a quoted cell holding a line break (a header cell, a value) shifted every later
    row, and the answer named the line before the one at fault."""
    content = b'a,"b\nc",label\n1,2,0\n3,"4\n",1\n5,x,0\n'     # 'x' is on line 6
    response = server_only.client().post("/api/training/datasets", params={"name": "q.csv"}, content=content)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == "upload: line 6, column 'b\\nc': non-numeric value 'x'"
    assert list((server_only.data_dir / "datasets").iterdir()) == []


def test_a_job_target_two_columns_of_its_dataset_are_named_is_refused_at_submission(tmp_path):
    """The upload refuses a target column whose name two columns have, but a job's spec naming such a column (another
    than the upload's target) was accepted, and the job failed at its start ("2 columns are named 'a'")."""
    server = Server(tmp_path)
    server.start()
    try:
        client = server.client()
        uploaded = client.post("/api/training/datasets", params={"name": "twice.csv"},
                               content=b"a,a,label\n1,2,0\n3,4,1\n5,6,0\n")
        assert uploaded.status_code == 201, uploaded.text
        refused = client.post("/api/training/jobs", json={"dataset": uploaded.json()["dataset_id"], "target": "a"})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["message"].startswith("target: 2 columns of dataset")
        assert client.get("/api/training/jobs").json()["jobs"] == []
    finally:
        server.stop()


def test_a_csv_whose_line_breaks_curl_d_stripped_is_told_to_use_data_binary(server_only):
    """`curl -d @train.csv` sends the file without its line breaks: the answer named a missing target column among
    the thousands of columns of one long header line."""
    stripped = b"a,label\n1,0\n2,1\n3,0\n".replace(b"\n", b"")
    response = server_only.client().post("/api/training/datasets", params={"name": "train.csv"}, content=stripped)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_dataset", response.text
    assert "--data-binary" in response.json()["error"]["message"], response.text
    assert list((server_only.data_dir / "datasets").iterdir()) == []


def test_tokens_scope_jobs_to_their_owner(tmp_path):
    tokens = write_tokens(tmp_path / "tokens")
    server = Server(tmp_path, extra=("--tokens", str(tokens)))
    server.start()
    try:
        assert server.client().get("/api/training/datasets").status_code == 401
        alice, bob = server.client("alice"), server.client("bob")
        assert alice.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 1, "job_id": "alice-1"}).status_code == 201
        assert alice.get("/api/training/jobs/alice-1").json()["owner"] == "alice"
        assert bob.get("/api/training/jobs/alice-1").status_code == 404
        assert bob.post("/api/training/jobs/alice-1/cancel").status_code == 404
        assert [j["job_id"] for j in bob.get("/api/training/jobs").json()["jobs"]] == []
        # With tokens any name serves (a proxy in front passes the public one): a page has no token to send.
        assert alice.get("/api/training/jobs", headers={"host": "trainmetrics.example"}).status_code == 200
    finally:
        server.stop()


def test_refuses_a_non_loopback_address_without_tokens(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainmetrics", "server", "--listen", "0.0.0.0:0",
                             "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "without --tokens" in result.stderr


def test_server_killed_mid_job_restarts_without_losing_jobs(tmp_path, executor):
    server = Server(tmp_path, extra=("--max-concurrent", "1", *executor))
    server.start()
    client = server.client()
    spec = {"dataset": "blobs", "batch_size": 16, "log_every": 10, "checkpoint_every": 20}
    client.post("/api/training/jobs", json={**spec, "epochs": 1, "job_id": "short-1"})
    wait_job(client, "short-1", lambda j: j["state"] == "completed")
    # Long enough to be still running after the kill and the restart (~1 s), even on a fast, idle machine.
    client.post("/api/training/jobs", json={**spec, "epochs": 25, "job_id": "survivor-1"})
    client.post("/api/training/jobs", json={**spec, "epochs": 1, "job_id": "queued-1"})
    wait_logged(tmp_path / "jobs" / "survivor-1" / "train.log", "step=")           # past its start-up
    server.stop(signal.SIGKILL)

    restarted = Server(tmp_path, extra=("--max-concurrent", "1", *executor))
    restarted.port, restarted.url = server.port, server.url
    restarted.start()
    try:
        client = restarted.client()
        states = {j["job_id"]: j["state"] for j in client.get("/api/training/jobs").json()["jobs"]}
        assert states == {"short-1": "completed", "survivor-1": "running", "queued-1": "queued"}
        done = wait_job(client, "survivor-1", lambda j: j["state"] not in ("running", "queued"), timeout=180)
        assert done["state"] == "completed"
        assert wait_job(client, "queued-1", lambda j: j["state"] == "completed", timeout=120)
    finally:
        restarted.stop()


def test_job_killed_while_checkpointing_fails_then_resumes_from_the_previous_checkpoint(tmp_path):
    server = Server(tmp_path)
    server.start()
    try:
        client = server.client()
        client.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 4, "batch_size": 16, "log_every": 10,
                                                "checkpoint_every": 5, "job_id": "killed-1"})
        wait_job(client, "killed-1", lambda j: j["state"] == "running")
        ckpt_dir = tmp_path / "jobs" / "killed-1" / "checkpoints"
        from trainmetrics.trainer.checkpoint import list_checkpoints, load_latest

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list_checkpoints(ckpt_dir):            # a first checkpoint
            time.sleep(0.01)
        while time.monotonic() < deadline and not list(ckpt_dir.glob(".step-*.tmp")):   # a later write in progress
            time.sleep(0.001)
        os.kill(job_pid(tmp_path, "killed-1"), signal.SIGKILL)
        failed = wait_job(client, "killed-1", lambda j: j["state"] == "failed")
        assert "SIGKILL" in failed["error"]
        assert list_checkpoints(ckpt_dir) and load_latest(ckpt_dir) is not None
        assert client.post("/api/training/jobs/killed-1/resume").status_code == 200
        assert wait_job(client, "killed-1", lambda j: j["state"] in ("completed", "failed"))["state"] == "completed"
        assert "resumed at step" in (tmp_path / "jobs" / "killed-1" / "train.log").read_text()
        assert not list(ckpt_dir.glob(".*.tmp"))            # the interrupted write's temp file was cleaned up
    finally:
        server.stop()


def job_pid(data_dir: Path, job_id: str) -> int:
    import sqlite3

    with sqlite3.connect(data_dir / "trainmetrics.db") as db:
        return db.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def owners_server(tmp_path: Path, proxy: bool = False) -> tuple[PrometheusServer, CapturingProxy | None, Server]:
    """A real Prometheus that discovers the jobs of a server with TOKENS' owners, the server reading its analytics
    from that Prometheus (through a CapturingProxy in front of it, when asked), both started."""
    tokens = write_tokens(tmp_path / "tokens")
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    prometheus = PrometheusServer(tmp_path / "prometheus", job_server=f"http://127.0.0.1:{port}",
                                  job_server_token=TOKENS["@metrics"],
                                  static_targets={"server": [f"127.0.0.1:{port}"]}).start()
    front = CapturingProxy(prometheus.url) if proxy else None
    server = Server(data, extra=("--tokens", str(tokens), "--prometheus-url", (front or prometheus).url))
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    server.start()
    return prometheus, front, server


def test_analytics_on_the_server_are_owner_scoped(tmp_path):
    prometheus, _, server = owners_server(tmp_path)
    try:
        alice, bob = server.client("alice"), server.client("bob")
        alice.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 2, "job_id": "alice-a1"})
        assert wait_job(alice, "alice-a1", lambda j: j["state"] in ("completed", "failed"))["state"] == "completed"
        prometheus.wait_for('last_over_time(trainer_job_state{job_id="alice-a1",state="completed"}[5m]) == 1')
        mine = alice.get("/api/training/alice-a1/analytics")
        assert mine.status_code == 200, mine.text
        assert mine.json()["status"] == "completed" and mine.json()["performance"]["total_samples"] == 2 * 3200
        assert bob.get("/api/training/alice-a1/analytics").status_code == 404
        assert bob.get("/api/training/analytics/compare", params={"job_ids": "alice-a1"}).status_code == 404
        assert alice.get("/api/training/analytics/summary", params={"range": "10m"}).json()["total_jobs"] == 1
        assert bob.get("/api/training/analytics/summary", params={"range": "10m", "owner": "alice"}).json()["total_jobs"] == 0
        assert server.client().get("/api/training/analytics/summary").status_code == 401
    finally:
        server.stop()
        prometheus.stop()


def test_an_owners_queued_job_is_theirs_in_the_analytics(tmp_path):
    """The job server published a queued job's state with no owner: to its owner's analytics the job did not
    exist (a 404, and not in their summary) until a process of it ran."""
    prometheus, _, server = owners_server(tmp_path)
    try:
        alice, bob = server.client("alice"), server.client("bob")
        # One slot: the second waits, as long as the first runs (cancelled at the end). With 50 epochs the test
        # passed only once the second had started, its trainer publishing what the server's /metrics did not
        # reach (this Prometheus did not scrape the server); on a loaded host the list then said `running`.
        for job_id in ("alice-busy", "alice-waits"):
            assert alice.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 5000, "job_id": job_id,
                                                          "name": f"{job_id}-run"}).status_code == 201
        wait_job(alice, "alice-busy", lambda j: j["state"] == "running")
        assert alice.get("/api/training/jobs/alice-waits").json()["state"] == "queued"
        prometheus.wait_for('trainer_job_info{job_id="alice-waits",owner="alice"}')
        mine = alice.get("/api/training/alice-waits/analytics")
        assert mine.status_code == 200, mine.text
        assert mine.json()["status"] == "queued" and mine.json()["job_name"] == "alice-waits-run"
        assert bob.get("/api/training/alice-waits/analytics").status_code == 404
        listed = alice.get("/api/training/analytics/jobs").json()["jobs"]
        assert {job["job_id"]: job["status"] for job in listed}.get("alice-waits") == "queued", listed
        assert bob.get("/api/training/analytics/jobs").json()["jobs"] == []
        for job_id in ("alice-waits", "alice-busy"):
            alice.post(f"/api/training/jobs/{job_id}/cancel")
    finally:
        server.stop()
        prometheus.stop()


def test_job_whose_process_died_with_the_server_resumes_from_its_checkpoint(tmp_path):
    server = Server(tmp_path)
    server.start()
    client = server.client()
    client.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 3, "batch_size": 16, "log_every": 10,
                                            "checkpoint_every": 20, "job_id": "orphan-1"})
    wait_job(client, "orphan-1", lambda j: j["state"] == "running")
    ckpt_dir = tmp_path / "jobs" / "orphan-1" / "checkpoints"
    from trainmetrics.trainer.checkpoint import list_checkpoints

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list_checkpoints(ckpt_dir):
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    os.kill(job_pid(tmp_path, "orphan-1"), signal.SIGKILL)        # the machine went down, say

    restarted = Server(tmp_path)
    restarted.start()
    try:
        client = restarted.client()
        done = wait_job(client, "orphan-1", lambda j: j["state"] in ("completed", "failed"), timeout=120)
        assert done["state"] == "completed"
        log = (tmp_path / "jobs" / "orphan-1" / "train.log").read_text()
        assert "resumed at step" in log and '"steps": 600' in log       # 3 epochs x 3200 / 16
    finally:
        restarted.stop()


def test_multi_process_job_pauses_resumes_and_completes_as_one_job(tmp_path, executor):
    server = Server(tmp_path, extra=executor)
    server.start()
    try:
        client = server.client()
        spec = {"dataset": "blobs", "epochs": 8, "batch_size": 16, "log_every": 10, "nproc": 2, "job_id": "ddp-s1"}
        assert client.post("/api/training/jobs", json=spec).status_code == 201
        wait_job(client, "ddp-s1", lambda j: j["state"] == "running")
        log = tmp_path / "jobs" / "ddp-s1" / "train.log"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (not log.exists() or log.read_text().count("step=20 ") < 2):
            time.sleep(0.2)                                                              # both ranks training
        # Every rank's thread stacks, wherever the executor placed it (Ray: through the job's request file). Three
        # callers at once: the ranks are asked once, and all three get that one dump.
        files = [tmp_path / "jobs" / "ddp-s1" / f"stacks.rank{rank}.txt" for rank in (0, 1)]
        dumps_before = [f.read_text().count(" in run_job\n") if f.exists() else 0 for f in files]
        with concurrent.futures.ThreadPoolExecutor(3) as callers:
            answers = list(callers.map(lambda _: client.get("/api/training/jobs/ddp-s1/stacks").json(), range(3)))
        stacks = answers[0]
        assert stacks["fresh"] and stacks["missing_ranks"] == [] and [r["rank"] for r in stacks["ranks"]] == [0, 1]
        assert all("runner.py" in r["stacks"] and "(most recent call first)" in r["stacks"] for r in stacks["ranks"])
        assert all(r["complete"] for r in stacks["ranks"])
        assert all(answer["ranks"] == stacks["ranks"] for answer in answers), answers
        assert [f.read_text().count(" in run_job\n") for f in files] == [n + 1 for n in dumps_before]
        assert client.post("/api/training/jobs/ddp-s1/pause").status_code == 202
        paused = wait_job(client, "ddp-s1", lambda j: j["state"] != "running")
        assert paused["state"] == "paused", paused
        # A pause right as a run starts (torchrun not yet running its workers) was refused, 409 "ending", and the
        # job trained on (a server's SIGTERM then left it running): it is kept for the workers.
        assert client.post("/api/training/jobs/ddp-s1/resume").status_code == 200
        wait_job(client, "ddp-s1", lambda j: j["state"] == "running")
        assert client.post("/api/training/jobs/ddp-s1/pause").status_code == 202
        paused = wait_job(client, "ddp-s1", lambda j: j["state"] != "running")
        assert paused["state"] == "paused", paused
        client.post("/api/training/jobs/ddp-s1/resume")
        done = wait_job(client, "ddp-s1", lambda j: j["state"] in ("completed", "failed"), timeout=180)
        assert done["state"] == "completed", done
        text = log.read_text()
        assert text.count('"world_size": 2') >= 4 and "resumed at step" in text
        if "ray" in executor:       # the launcher says where Ray placed each rank: one per node
            placed = re.findall(r"^rank (\d): node (\w+)", text, re.M)
            assert len(placed) == 4 and len({node for _, node in placed[:2]}) == 2, placed
        result = json.loads((tmp_path / "jobs" / "ddp-s1" / "result.json").read_text())
        assert (result["state"], result["steps"], result["world_size"]) == ("completed", 800, 2)   # 8 x 3200 / 2 / 16
    finally:
        server.stop()


def test_a_killed_torchrun_leaves_no_rank_training_once_its_job_has_failed(tmp_path):
    """kill -9 of torchrun: its ranks, in sessions of their own and no longer under it, are killed before the job
    counts as failed (and its slot free), so a resume never trains beside them."""
    job_dir = tmp_path / "jobs" / "ddp-orphans"

    def ranks_left() -> list[psutil.Process]:
        return [process for process in psutil.process_iter(["cmdline", "status"])
                if str(job_dir) in (process.info["cmdline"] or []) and process.info["status"] != psutil.STATUS_ZOMBIE]

    server = Server(tmp_path)
    server.start()
    try:
        client = server.client()
        spec = {"dataset": "blobs", "epochs": 30, "batch_size": 16, "log_every": 10, "nproc": 2,
                "job_id": "ddp-orphans"}
        assert client.post("/api/training/jobs", json=spec).status_code == 201
        wait_logged(job_dir / "train.log", "step=10 ")                  # both ranks train
        assert len(ranks_left()) == 3                                   # torchrun and its two workers
        os.kill(job_pid(tmp_path, "ddp-orphans"), signal.SIGKILL)
        failed = wait_job(client, "ddp-orphans", lambda j: j["state"] != "running")
        assert (failed["state"], failed["error"]) == ("failed", "killed by SIGKILL without a result")
        assert ranks_left() == []
    finally:
        for process in ranks_left():
            process.kill()
        server.stop()


def test_the_largest_seed_the_contract_allows_trains(server_only):
    client = server_only.client()
    seed = 2**64 - 1         # seed * 100_003 + epoch, torch's per-epoch seed, overflowed 2**64 at the first epoch
    assert client.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 2, "seed": seed,
                                                   "job_id": "seed-max"}).status_code == 201
    done = wait_job(client, "seed-max", lambda j: j["state"] in ("completed", "failed"))
    assert done["state"] == "completed", done


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/training/jobs/some-job"), ("POST", "/api/training/jobs/some-job/pause"),
    ("POST", "/api/training/jobs/some-job/resume"), ("POST", "/api/training/jobs/some-job/cancel"),
    ("GET", "/api/training/jobs/some-job/checkpoints"), ("GET", "/api/training/jobs/some-job/download/model"),
    ("GET", "/api/training/jobs/some-job/download/checkpoints/step-000000001.pt"),
])
def test_every_route_refuses_an_unknown_parameter(method, path, server_only):
    response = server_only.client().request(method, path, params={"colour": "red"})
    assert response.status_code == 400 and "colour: unknown parameter" in response.json()["error"]["message"]


def test_a_relative_data_dir_holds_after_a_restart_from_another_directory(tmp_path):
    first_cwd, second_cwd, data = tmp_path / "a", tmp_path / "b" / "c", tmp_path / "a" / "data"
    for directory in (first_cwd, second_cwd, data):
        directory.mkdir(parents=True, exist_ok=True)
    server = Server(data, cwd=first_cwd)             # --data-dir data
    server.start()
    try:
        uploaded = server.client().post("/api/training/datasets", params={"name": "train.csv"},
                                        content=classification_csv(tmp_path / "train.csv", rows=200).read_bytes())
        assert uploaded.status_code == 201, uploaded.text
    finally:
        server.stop()
    restarted = Server(data, cwd=second_cwd)         # --data-dir ../../a/data
    restarted.start()
    try:
        client = restarted.client()
        job = {"dataset": uploaded.json()["dataset_id"], "epochs": 1, "job_id": "moved-1"}
        assert client.post("/api/training/jobs", json=job).status_code == 201
        done = wait_job(client, "moved-1", lambda j: j["state"] in ("completed", "failed"))
        assert done["state"] == "completed", done
        answer = client.get("/api/training/jobs/moved-1").text
        assert "dataset_path" not in answer and str(tmp_path) not in answer      # no server paths
    finally:
        restarted.stop()


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path):
    server = Server(tmp_path)
    server.start()
    second = subprocess.Popen([sys.executable, "-m", "trainmetrics", "server", "--listen", f"127.0.0.1:{free_port()}",
                               "--data-dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert "--data-dir" in stderr and str(tmp_path) in stderr and "another trainmetrics server" in stderr
        assert server.client().get("/api/training/jobs").status_code == 200       # the first one serves on
    finally:
        if second.poll() is None:
            second.kill()
            second.communicate()
        server.stop()


def test_a_job_learns_the_target_column_its_upload_named_unless_its_spec_names_another(tmp_path):
    server = Server(tmp_path)
    server.start()
    try:
        client = server.client()
        lines = classification_csv(tmp_path / "train.csv", rows=200).read_text().replace(",label\n", ",kind\n", 1)
        uploaded = client.post("/api/training/datasets", params={"name": "kinds.csv", "target": "kind"},
                               content=lines.encode())
        assert uploaded.status_code == 201 and uploaded.json()["target"] == "kind", uploaded.text
        dataset = uploaded.json()["dataset_id"]
        refused = client.post("/api/training/jobs", json={"dataset": dataset, "target": "label"})
        assert refused.status_code == 400 and "target: no column 'label'" in refused.json()["error"]["message"]
        job = client.post("/api/training/jobs", json={"dataset": dataset, "epochs": 1, "job_id": "kinds-1"}).json()
        assert job["spec"]["target"] == "kind"
        assert wait_job(client, "kinds-1", lambda j: j["state"] in ("completed", "failed"))["state"] == "completed"
        other = client.post("/api/training/jobs", json={"dataset": dataset, "target": "f1", "epochs": 1,
                                                        "job_id": "kinds-2"})
        assert other.status_code == 201 and other.json()["spec"]["target"] == "f1"      # a regression on f1
        assert wait_job(client, "kinds-2", lambda j: j["state"] in ("completed", "failed"))["state"] == "completed"
        # Its file removed from the data dir behind the server's back: naming another target was a 500, and a
        # job on the upload's own target failed at its start with the server's path in its error.
        next((tmp_path / "datasets").glob(f"{dataset}.*")).unlink()
        for spec in ({"dataset": dataset, "target": "f1"}, {"dataset": dataset}):
            gone = client.post("/api/training/jobs", json=spec)
            assert gone.status_code == 409 and str(tmp_path) not in gone.text, gone.text
            assert f"the file of dataset {dataset} is gone" in gone.json()["error"]["message"]
    finally:
        server.stop()


def test_an_upload_with_a_row_too_wide_to_check_is_a_bad_dataset_and_leaves_nothing(tmp_path):
    """The check built each row whole, a Python string per cell (~30 times the file in memory: a 256 MiB upload of
    a header and one row of short cells took ~8 GB of the server, two checked at once). A header, or a row, over
    4 Mi characters is refused before it is read whole."""
    from trainmetrics.datafiles import MAX_RECORD_CHARS

    server = Server(tmp_path, extra=("--prometheus-url", f"http://127.0.0.1:{free_port()}"))
    server.start()
    try:
        columns = MAX_RECORD_CHARS // 8
        header = ",".join(f"c{i:06}" for i in range(columns)) + ",label\n"
        content = (header + "0," * columns + "0\n" + "1," * columns + "1\n").encode()
        answer = server.client().post("/api/training/datasets", params={"name": "wide.csv"}, content=content)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == {"code": "bad_dataset", "message": f"upload: line 1 starts a row of more "
                                          f"than {MAX_RECORD_CHARS} characters (too many or too long columns)"}
        assert list((tmp_path / "datasets").iterdir()) == []
    finally:
        server.stop()


def test_a_dataset_file_no_record_names_is_removed_at_the_start(tmp_path):
    """An upload's file is moved into place, then recorded: a server killed between the two left the file for good,
    listed nowhere. The next start removes it; a recorded dataset stays."""
    from trainmetrics.prometheus_process import free_port

    from .server_process import Server

    server = Server(tmp_path, extra=("--prometheus-url", f"http://127.0.0.1:{free_port()}"))
    server.data_dir.mkdir(exist_ok=True)
    server.start()
    try:
        kept = server.client().post("/api/training/datasets", params={"name": "kept.csv"},
                                    content=b"a,b,label\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n").json()
    finally:
        server.stop()
    orphan = tmp_path / "datasets" / "ds-0123456789ab.csv"
    orphan.write_bytes(b"a,b,label\n1,2,0\n")
    server.start()
    try:
        listed = [d["dataset_id"] for d in server.client().get("/api/training/datasets").json()["datasets"]]
    finally:
        server.stop()
    assert listed == [kept["dataset_id"]] and not orphan.exists()
    assert [p.name for p in (tmp_path / "datasets").glob("ds-*")] == [f"{kept['dataset_id']}.csv"]


def test_an_upload_recorded_as_a_stop_cut_it_keeps_its_file(tmp_path):
    """A stop cancels an upload still waiting for its record (the database locked by another process): the
    handler removed the file at once, the state thread then wrote the record, and the dataset was listed for good
    with no file (a submission on it a 409). Now the file goes only with a record that was not written."""
    import socket
    import sqlite3

    from trainmetrics.jobserver.store import DATABASE_NAME

    server = Server(tmp_path, extra=("--prometheus-url", f"http://127.0.0.1:{free_port()}"))
    server.start()
    body = b"a,b,label\n1,2,0\n3,4,1\n5,6,0\n"
    other = sqlite3.connect(tmp_path / DATABASE_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")        # the record waits for it (the store's 5 s busy timeout)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /api/training/datasets?name=cut.csv HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                         b"Content-Length: %d\r\n\r\n" % (server.port, len(body)) + body[:10])
            time.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)      # its 5 s drain starts before the record's wait
            time.sleep(1.5)
            sock.sendall(body[10:])
            time.sleep(4.5)         # the drain is over and the request cancelled; the record still waits
            other.execute("ROLLBACK")
            assert sock.recv(4096).startswith(b"HTTP/1.1 503")
    finally:
        other.close()
        server.process.wait(timeout=60)
    server.start()
    try:
        listed = server.client().get("/api/training/datasets").json()["datasets"]
    finally:
        server.stop()
    files = sorted(p.name for p in (tmp_path / "datasets").iterdir())
    assert files == sorted(f"{d['dataset_id']}.csv" for d in listed), (files, listed)


def test_another_owners_job_answers_as_an_unknown_one_while_prometheus_fails_its_figures(tmp_path):
    """The analytics computed another owner's job in full before finding it was not the caller's: a Prometheus
    that answered the lookup but failed a figure's query (overloaded, timing out on a large job) made another
    owner's job a 503 where an unknown id is a 404, and every such request cost Prometheus the job's whole
    analytics (and the caller the time they take: a timing oracle even when Prometheus is well)."""
    prometheus, proxy, server = owners_server(tmp_path, proxy=True)
    try:
        alice, bob = server.client("alice"), server.client("bob")
        alice.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 300, "batch_size": 16, "log_every": 10,
                                               "job_id": "alice-busy"})
        prometheus.wait_for('trainer_job_state{job_id="alice-busy",state="running"} == 1', timeout=90)
        assert alice.get("/api/training/alice-busy/analytics").status_code == 200     # (running: never cached)
        proxy.failing_ranges.set()
        assert alice.get("/api/training/alice-busy/analytics").status_code == 503     # the figures fail indeed
        unknown = bob.get("/api/training/alice-none/analytics")
        assert unknown.status_code == 404, unknown.text
        for answer in (bob.get("/api/training/alice-busy/analytics"),
                       bob.get("/api/training/analytics/compare", params={"job_ids": "alice-busy"})):
            assert answer.status_code == 404, answer.text
            assert answer.json()["error"]["message"].replace("alice-busy", "X") == \
                unknown.json()["error"]["message"].replace("alice-none", "X")
        proxy.failing_ranges.clear()
        assert bob.get("/api/training/alice-busy/analytics").status_code == 404
    finally:
        server.client("alice").post("/api/training/jobs/alice-busy/cancel")
        server.stop()
        proxy.close()
        prometheus.stop()


def test_a_dataset_id_drawn_again_never_touches_the_dataset_that_has_it(tmp_path):
    """A dataset's file was moved into place over whatever had its name: an id drawn a second time (random, 48
    bits) replaced another owner's dataset with this upload, whose record then failed (the id is taken) and whose
    clean-up removed the file: the other owner's dataset was gone, and their jobs on it refused."""
    patch = tmp_path / "patch"
    patch.mkdir()
    # The first two dataset ids the server draws are the same one; the others random.
    (patch / "sitecustomize.py").write_text(
        "import secrets\n_real, _drawn = secrets.token_hex, []\n"
        "def token_hex(nbytes=None):\n"
        "    if nbytes == 6 and len(_drawn) < 2:\n"
        "        _drawn.append(1)\n"
        "        return '0123456789ab'\n"
        "    return _real(nbytes)\n"
        "secrets.token_hex = token_hex\n")
    data = tmp_path / "data"
    data.mkdir()
    server = Server(data, extra=("--tokens", str(write_tokens(tmp_path / "tokens"))),
                    env={"PYTHONPATH": os.pathsep.join([str(patch), *filter(None, [os.environ.get("PYTHONPATH")])])})
    server.start()
    try:
        alice, bob = server.client("alice"), server.client("bob")
        alices = b"f1,f2,label\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n"
        first = alice.post("/api/training/datasets", params={"name": "a.csv"}, content=alices)
        assert first.status_code == 201 and first.json()["dataset_id"] == "ds-0123456789ab", first.text
        second = bob.post("/api/training/datasets", params={"name": "b.csv"},
                          content=b"g1,label\n9,1\n8,0\n7,1\n6,0\n5,1\n")
        job = alice.post("/api/training/jobs", json={"dataset": "ds-0123456789ab", "epochs": 1, "job_id": "alice-d"})
        assert job.status_code == 201, job.text
        alice.post("/api/training/jobs/alice-d/cancel")
        assert (data / "datasets" / "ds-0123456789ab.csv").read_bytes() == alices
        assert second.status_code == 201, second.text      # drawn again: the upload draws another id
        assert second.json()["dataset_id"] != "ds-0123456789ab"
        assert [d["rows"] for d in alice.get("/api/training/datasets").json()["datasets"]] == [4]
        assert [d["rows"] for d in bob.get("/api/training/datasets").json()["datasets"]] == [5]
    finally:
        server.stop()
