"""`trainmetrics demo --exit-after-job`: the whole stack with a real Prometheus, as `make demo` runs it."""

import re
import subprocess
import sys


def test_demo_runs_a_job_through_prometheus_and_reads_it_back(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainmetrics", "demo", "--exit-after-job", "--epochs", "3", "--batch-size", "32",
         "--prometheus-port", "0", "--exporter-port", "0", "--server-port", "0", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^Prometheus\s+http://127\.0\.0\.1:\d+", out, re.M)
    assert "graph?g0.expr=trainer_loss" in out
    assert re.search(r"state:\s+completed", out)
    assert re.search(r"dataset ds-\w+: 1797 rows, 64 features", out)
    assert re.search(r"steps:\s+135$", out, re.M)                # 3 epochs x ceil(1438 / 32)
    accuracies = [float(a) for a in re.search(r"accuracy by evaluation: (.*)", out).group(1).split(" → ")]
    assert accuracies[-1] > 0.8
    assert not list((tmp_path / "prometheus" / "targets").glob("*.json"))
    assert re.search(r"^  performance:\s+.*total_samples 4314\b", out, re.M)      # 3 x 1438, from the analytics
