# `make test` and `make demo` work from a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint zoo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev,export]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --timeout=900

demo: $(STAMP)
	$(PY) -m tasks.demo

lint: $(STAMP)
	$(PY) -m ruff check .

zoo: $(STAMP)
	$(PY) -m backbones

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
