# The two commands: `make serve` (set up, build, serve the cpu profile on 127.0.0.1:8000/8001/8002) and
# `make test` (set up, run the test suite against the real server). Both create .venv on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= server,build,test,images,cli,loadtest,deploy
WEIGHTS ?= imagenet

.PHONY: serve test install build gpu-configs bench loadtest clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

## Build the cpu profile (ONNX export + model repository under build/).
build: $(STAMP)
	$(PY) build_engines.py cpu --weights $(WEIGHTS)

## Set up, build, start tritonserver (cpu profile), classify the samples, serve until Ctrl-C.
serve: $(STAMP)
	$(VENV)/bin/tritonvision serve --weights $(WEIGHTS) --demo $(SERVE_ARGS)

## Set up and run the whole test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## Regenerate the committed gpu-profile configs from the spec.
gpu-configs: $(STAMP)
	$(PY) build_engines.py configs

## In-process pipeline vs. through-Triton benchmark (table + results/bench_pipeline.json).
bench: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py

## Locust sweep over concurrency (table, results/loadtest_sweep.{json,csv,png}); LOADTEST_ARGS for more.
loadtest: $(STAMP)
	$(PY) loadtest/sweep.py $(LOADTEST_ARGS)

clean:
	rm -rf build results
