# `make demo` and `make test` work on a fresh machine: they create .venv and install ormo with torch pinned through
# constraints.txt (any other torch version pulls several GB of CUDA packages). A stamp file makes a second install
# a no-op until pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ormo-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench lint clean

$(STAMP): pyproject.toml constraints.txt
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)  # none yet, or one cut short
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,ray]'
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m ormo demo

bench: install
	$(PY) benchmarks/server_step.py
	$(PY) benchmarks/sim_overhead.py
	$(PY) benchmarks/resnet20_run.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
