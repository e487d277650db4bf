# Two commands on a fresh machine:  make demo  (the main job)  and  make test.
# Everything they need is installed here: a virtual environment in .venv and,
# when run as root on Debian, the system tools the tests drive (ApacheBench,
# Chromium).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv system-deps demo test test-fast bench bench-tcp bench-tools clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@# Debian's python3 makes venvs only with python3-venv: installed here when missing (as root).
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); bash scripts/install-system-deps.sh --venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

system-deps:
	@bash scripts/install-system-deps.sh

demo: venv
	$(PY) -m clusterkit.demo

# Two test processes (pytest-xdist): most tests wait on timeouts, so the suite takes
# about half as long on 2 cores. WORKERS=0 runs it in one process.
WORKERS ?= 2

test: venv system-deps
	$(PY) -m pytest -q -n $(WORKERS) $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -n $(WORKERS) -m "not slow and not browser" $(PYTEST_ARGS)

# The whole performance study: reports/<date>/report.md (QUICK=1 for a smoke run).
bench: venv bench-tools
	-@bash scripts/install-system-deps.sh --bench
	$(PY) bench/run_bench.py $(if $(filter 1 yes true,$(QUICK)),--quick,) $(BENCH_ARGS)

bench-tcp: venv
	$(PY) bench/bench_tcp.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis

bench-tools: venv
	$(PY) -c "from bench.common import build_tools; build_tools()"
