# The two commands: `make serve` (set up, build, serve the cpu profile on 127.0.0.1:8000/8001/8002) and
# `make test` (set up, run the test suite against the real server). Both create .venv on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= server,build,test,images,cli,loadtest,deploy,trace
WEIGHTS ?= imagenet

.PHONY: serve test install build gpu-configs bench loadtest clean dali-envs wheel-venv

# The DALI releases of the oldest and newest NGC tritonserver images supported (26.02, 26.06), each in a
# virtual environment of its own: tests/test_dali_versions.py runs the gpu profile's dali.py under each.
DALI_VERSIONS ?= 1.53.0 2.1.1
DALI_ENVS ?= $(VENV)-dali
# The built wheel (not the editable checkout) installed into a clean environment: tests/test_wheel.py.
WHEEL_VENV ?= $(VENV)-wheel
PACKAGE_FILES := pyproject.toml $(shell find client server -type f -not -path '*/__pycache__/*' 2>/dev/null)

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
test: $(STAMP) dali-envs wheel-venv
	TRITONVISION_DALI_ENVS=$(abspath $(DALI_ENVS)) TRITONVISION_WHEEL_VENV=$(abspath $(WHEEL_VENV)) \
		$(PY) -m pytest $(PYTEST_ARGS)

dali-envs: $(foreach v,$(DALI_VERSIONS),$(DALI_ENVS)/$(v)/.installed)

$(DALI_ENVS)/%/.installed:
	rm -rf $(DALI_ENVS)/$*
	$(PYTHON) -m venv $(DALI_ENVS)/$*
	$(DALI_ENVS)/$*/bin/python -m pip install -q 'nvidia-dali-cuda130==$*' 'numpy<2'
	touch $@

wheel-venv: $(WHEEL_VENV)/.installed

$(WHEEL_VENV)/.installed: $(PACKAGE_FILES) $(STAMP)
	rm -rf build/dist $(WHEEL_VENV)
	$(PY) -m pip wheel -q --no-deps -w build/dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q build/dist/tritonvision-*.whl -c constraints.txt
	touch $@

## Regenerate the committed gpu-profile configs from the spec.
gpu-configs: $(STAMP)
	$(PY) build_engines.py configs

## In-process pipeline vs. through-Triton benchmark (table + results/bench_pipeline.json).
bench: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py

## Locust sweep: configurations x concurrency in interleaved rounds, a recommendation under --budget-ms
## (table, results/loadtest_sweep.{json,jsonl,csv,png}); LOADTEST_ARGS for more (loadtest/sweep.py --help).
loadtest: $(STAMP)
	$(PY) loadtest/sweep.py $(LOADTEST_ARGS)

clean:
	rm -rf build results $(DALI_ENVS) $(WHEEL_VENV)
