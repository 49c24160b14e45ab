# `make test` sets up everything from nothing (a .venv beside this file) and runs the whole suite.
# On machines without an NVIDIA GPU it installs the exact CPU pins in requirements/cpu.txt
# (torch==2.13.0, the CPU build); with a GPU it installs the ranges in pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=15  # two workers, each file on one (module fixtures run once); the 15 slowest tests listed

.PHONY: setup test parity verify train clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing jax[cuda12] and the pyproject ranges"; \
		$(PY) -m pip install -q -e ".[all]" "jax[cuda12]"; \
	else \
		echo "No GPU: installing the CPU pins from requirements/cpu.txt"; \
		$(PY) -m pip install -q -r requirements/cpu.txt -e ".[all]"; \
	fi
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

parity: setup
	$(PY) -m pytest -q parity_tests $(PYTEST_ARGS)

verify: setup
	$(PY) scripts/verify.py

# The first run: a small GPT on the embedded corpus (Python's own stdlib .py files; no download),
# about 3 minutes on 2 CPU cores, then a checkpoint, runs/first-run/loss.png and a text sample
# that reads like Python (configs/first-run.yaml). Seed 003's own preset: configs/seed003-char-gpt.yaml.
TRAIN_ARGS ?=
train: setup
	$(PY) scripts/train.py --config configs/first-run.yaml --run-dir runs/first-run $(TRAIN_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
