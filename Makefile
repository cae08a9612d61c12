# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv (idempotent,
# re-run when pyproject.toml changes) and install Debian's prometheus package when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv prometheus alertmanager victoria-metrics node-exporter dashboards test fuzz demo bench clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build on disk, never a multi-GB CUDA download; [train]'s range keeps it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,ray,test]'
	touch $@

venv: $(STAMP)

prometheus:
	@scripts/ensure-debian-package prometheus prometheus promtool

alertmanager:
	@scripts/ensure-debian-package prometheus-alertmanager prometheus-alertmanager

victoria-metrics:
	@scripts/ensure-debian-package victoria-metrics victoria-metrics

node-exporter:
	@scripts/ensure-debian-package prometheus-node-exporter prometheus-node-exporter

# Regenerate the Grafana dashboards and docs/dashboards.md from deploy/grafana/dashboards/src.
dashboards: venv
	$(BIN)/python deploy/grafana/dashboards/src/generate.py

# Three workers on two cores, a file's tests on one (most tests wait on real processes: Prometheus scrapes, training;
# two workers kept ~1.1 cores busy: 461-511 s, three 381 s in a clean clone; four, 365 s, stretched the timing of
# tests that watch real processes until some failed), then the tests on the session's real Ray cluster alone
# (tests/conftest.py says why), then those that start a Ray cluster of their own, once the session's is gone. A
# pass that PYTEST_ARGS leaves without tests (pytest's exit 5) is no failure.
test: venv prometheus alertmanager victoria-metrics
	$(BIN)/python -m pytest -q --durations=25 -n 3 --dist loadfile -m "not ray" $(PYTEST_ARGS) || test $$? -eq 5
	$(BIN)/python -m pytest -q --durations=10 -m "ray and not ray_own_cluster" $(PYTEST_ARGS) || test $$? -eq 5
	$(BIN)/python -m pytest -q --durations=5 -m ray_own_cluster $(PYTEST_ARGS) || test $$? -eq 5

# A longer schemathesis run than make test's bounded one (tests/hardening/test_fuzz.py).
fuzz: venv prometheus
	HARDENING_FUZZ_EXAMPLES=500 $(BIN)/python -m pytest -q -p no:cacheprovider tests/hardening/test_fuzz.py

demo: venv prometheus
	$(BIN)/trainmetrics demo

# Every benchmark (bench/cleanup.py is their helper, not one); central_ingestion needs VictoriaMetrics.
bench: venv prometheus node-exporter victoria-metrics
	@set -e; for script in bench/*.py; do test $$script = bench/cleanup.py && continue; echo "== $$script"; \
		$(BIN)/python $$script; done

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
