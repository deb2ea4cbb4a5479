# One command sets everything up and runs the job; one sets everything up and runs the tests.
#   make demo    # main job
#   make test    # whole test suite, on two interpreters (below)
#   make experiments  # every method side by side on real models + data (results in experiments/results/)
# Needs Python 3.11 (python3.11 or python3), git and make; `make test` also uses the newest
# Python 3.12+ that pyenv (or the PATH) has. Everything else goes into .venv and .venv-newest.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
# The newest CPython >= 3.12 available: pyenv's versions first, then the PATH.
NEWEST_PYTHON ?= $(shell (ls -d $$(pyenv root 2>/dev/null)/versions/3.1[2-9]* 2>/dev/null | \
                          sort -V | tail -1 | sed 's|$$|/bin/python|'; \
                          command -v python3.13 python3.12 2>/dev/null) | head -1)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NEWEST := .venv-newest
NEWEST_STAMP := $(NEWEST)/.installed

.PHONY: setup demo quickstart test test-311 test-newest bench experiments clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# PyTorch (CPU) is the reference for parity tests only; never a peftjax dependency.
	# Installed first and pinned, so nothing pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,parity]'
	touch $(STAMP)

# The newest Python with the newest jax (no PyTorch: its CPU wheel here is for 3.11 only, so the
# PyTorch parity tests skip themselves there, saying why).
$(NEWEST_STAMP): pyproject.toml Makefile
	$(NEWEST_PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -q --upgrade pip
	$(NEWEST)/bin/python -m pip install -q -e '.[test]'
	touch $(NEWEST_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peftjax train --model minilm --method lora --data rotten_tomatoes --steps 200

quickstart: $(STAMP)
	$(PY) experiments/quickstart.py

# Python 3.11 + jax 0.10.2 + the PyTorch reference, then the newest Python + the newest jax.
test: test-311 test-newest

test-311: $(STAMP)
	$(PY) -c 'import sys, jax; print("== tests on Python", sys.version.split()[0], "jax", jax.__version__)'
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 tests

ifeq ($(strip $(NEWEST_PYTHON)),)
test-newest:
	@echo "== SKIPPED: the tests on the newest Python: no Python >= 3.12 found (pyenv install 3.13, or make test NEWEST_PYTHON=/path/to/python3.13)"
else
test-newest: $(NEWEST_STAMP)
	$(NEWEST)/bin/python -c 'import sys, jax; print("== tests on Python", sys.version.split()[0], "jax", jax.__version__)'
	$(NEWEST)/bin/python -m pytest -n 2 --dist worksteal --durations=15 tests
endif

# peftjax vs HF PEFT (PyTorch) vs qwix, one report: docs/benchmarks.md (~20 min on 2 cores).
# matplotlib (the dev extra) draws the plots; the runner installs qwix into .venv with jax pinned
# and creates benchmarks/.venv-torch (torch first) for the PyTorch side.
bench: $(STAMP)
	$(PY) -m pip install -q 'matplotlib>=3.8'
	$(PY) benchmarks/run.py

# Both comparison tables (one process per method); about an hour on 2 quiet CPU cores, minutes on
# a GPU. Pass e.g. EXP_ARGS="--steps 300" to train longer.
experiments: $(STAMP)
	$(PY) -m pip install -q -e '.[experiments]'
	$(PY) experiments/param_counts.py
	$(PY) experiments/compare_classification.py $(EXP_ARGS)
	$(PY) experiments/compare_lm.py $(EXP_ARGS)

clean:
	rm -rf $(VENV) $(NEWEST) .pytest_cache
