# One command sets everything up and runs the job; one sets everything up and runs the tests.
#   make demo    # main job
#   make test    # whole test suite
#   make experiments  # every method side by side on real models + data (results in experiments/results/)
# Needs only Python 3.11 (python3.11 or python3), git and make. Everything else goes into .venv.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo quickstart test bench experiments clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# PyTorch (CPU) is the reference for parity tests only; never a peftjax dependency.
	# Installed first and pinned, so nothing pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peftjax train --model minilm --method lora --data rotten_tomatoes --steps 200

quickstart: $(STAMP)
	$(PY) experiments/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 tests

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
	rm -rf $(VENV) .pytest_cache
