# `make test` and `make demo` work from a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKERS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: test test-long durations demo lint zoo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev,export]'
	touch $(STAMP)

# The default tier: every unit and integration test that runs in seconds, one pytest-xdist worker per core.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not slurm" -n $(WORKERS) --dist load --timeout=900 --durations=20

# The long tier: minutes-long training checks (slow) and the jobs on a real SLURM cluster (slurm), a module
# per worker (the SLURM module's jobs run beside the other worker's training while its worker waits on them).
test-long: $(STAMP)
	$(PY) -m pytest -q -m "slow or slurm" -n $(WORKERS) --dist loadfile --timeout=1800 --durations=20

# Where the time goes: both tiers, serially, every test's duration.
durations: $(STAMP)
	$(PY) -m pytest -q -m "" -p no:xdist --timeout=1800 --durations=0

demo: $(STAMP)
	$(PY) -m tasks.demo

lint: $(STAMP)
	$(PY) -m ruff check .

zoo: $(STAMP)
	$(PY) -m backbones

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
