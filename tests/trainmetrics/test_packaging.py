"""The package as users install it: a wheel built from this checkout, installed into a fresh virtualenv without
torch. The exporter, the analytics and the job server run there; training says what it needs."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from trainmetrics.prometheus_process import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A virtualenv with the wheel of this checkout and its core dependencies only (pip's cache makes it a
    few seconds)."""
    work = tmp_path_factory.mktemp("packaging")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((work / "dist").glob("trainmetrics-*.whl"))
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top_level == {"trainmetrics", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=120)
    subprocess.run([str(work / "venv" / "bin" / "pip"), "install", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    return work / "venv"


def serve(venv: Path, *args: str, cwd: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([str(venv / "bin" / "trainmetrics"), *args, "--listen", f"127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd,
                               env={**os.environ, "PYTHONPATH": ""})
    return process, f"http://127.0.0.1:{port}"


def answer(url: str, process: subprocess.Popen, method: str = "GET", **kwargs) -> httpx.Response:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            return httpx.request(method, url, timeout=10, **kwargs)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.1)


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    return stderr


@pytest.mark.slow
def test_the_wheel_runs_the_exporter_analytics_and_job_server_without_torch(venv, tmp_path):
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') "
                            "is not None)"], cwd=tmp_path)
    assert probe.returncode == 0, "torch is installed in the core venv"
    for name in ("trainer", "exporters", "analytics", "jobserver"):      # no generic top-level import names
        found = subprocess.run([python, "-c", f"import {name}"], cwd=tmp_path, capture_output=True)
        assert found.returncode != 0, name

    exporter, url = serve(venv, "exporter", "--no-collector.gpu", cwd=tmp_path)
    body = answer(f"{url}/metrics", exporter).text
    assert "system_cpu_time_seconds_total" in body
    assert "listening on" in stop(exporter)

    analytics, url = serve(venv, "analytics", "--prometheus-url", "http://127.0.0.1:1", cwd=tmp_path)
    assert answer(f"{url}/openapi.json", analytics).json()["openapi"].startswith("3.")
    assert answer(f"{url}/healthz", analytics).status_code == 503          # no Prometheus there
    stop(analytics)

    server, url = serve(venv, "server", "--data-dir", str(tmp_path / "data"), "--linger-timeout", "1", cwd=tmp_path)
    csv = "a,b,label\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(50))
    uploaded = answer(f"{url}/api/training/datasets?name=t.csv", server, method="POST", content=csv.encode())
    assert uploaded.status_code == 201 and uploaded.json()["rows"] == 50, uploaded.text   # numpy reads it, not torch
    job = httpx.post(f"{url}/api/training/jobs", json={"dataset": uploaded.json()["dataset_id"]}, timeout=30).json()
    deadline = time.monotonic() + 60
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = httpx.get(f"{url}/api/training/jobs/{job['job_id']}", timeout=10).json()
    assert job["state"] == "failed" and "trainmetrics[train]" in job["error"], job
    result = json.loads((tmp_path / "data" / "jobs" / job["job_id"] / "result.json").read_text())
    assert result["exit_code"] == 2
    stop(server)
