# Set-up and entry points. `make demo` and `make test` each build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# NOTE: torch is pinned first so that nothing below pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Two pytest-xdist workers: one test file per work unit, the files sharing the SmolLM2 session fixtures together
# (tests/conftest.py). XLA compiles and the Pallas/Triton interpreters use about one core each. Units go out in
# collection order (--no-loadscope-reorder), so the longest ones (the SmolLM2 end-to-end files) start first.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=25 tests

bench: $(STAMP)
	$(PY) benchmarks/cpu_decode.py

clean-venv:
	rm -rf $(VENV)
