# `make run` reproduces the tutorial, `make test` runs the fast suite (minutes), `make test-all` the system
# tests it leaves out (SLURM, wheel install, long sweeps, servers); all create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all lint bench tensorboard optuna-dashboard clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip uninstall -q -y hydra-optuna-sweeper 2>/dev/null || true  # replaced by our own; needs optuna<3
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m linreg.reproduce

# PYTEST_ARGS: more pytest arguments, e.g. make test PYTEST_ARGS="-x tests/test_sweep.py".
test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -m "not system" $(PYTEST_ARGS)

# The SLURM tests skip (saying why) unless a cluster answers: see .ci/run, scripts/slurm-local.sh.
test-all: $(STAMP)
	$(PY) -m pytest -m system $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks.overhead
	$(PY) -m benchmarks.stacked_floor  # the vectorized launcher / its plain stacked loop, 200 and 1,000 jobs

LOGDIR ?= outputs
tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $(LOGDIR) --host 127.0.0.1

# make optuna-dashboard SWEEP=<sweep dir> [PORT=8080]: the study in <sweep dir>/optuna.db, on this machine only
# (or STORAGE=<SQLAlchemy URL> for a study kept elsewhere, hydra.sweeper.storage).
PORT ?= 8080
optuna-dashboard: $(STAMP)
	@if [ -z "$(STORAGE)" ] && [ ! -f "$(SWEEP)/optuna.db" ]; then \
		echo "error: SWEEP='$(SWEEP)': no optuna.db there; usage: make optuna-dashboard SWEEP=<sweep dir> [PORT=8080]" >&2; \
		exit 2; fi
	exec $(VENV)/bin/optuna-dashboard --host 127.0.0.1 --port $(PORT) \
		"$(or $(STORAGE),sqlite:///$(abspath $(SWEEP))/optuna.db)"

clean:
	rm -rf outputs/runs outputs/multirun outputs/reproduce
