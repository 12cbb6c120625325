# Set-up is part of every target: a fresh clone needs only `make convert` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch's CPU wheel for this version lies on the build machines' disk; a newer one would pull a CUDA build.
TORCH_VERSION ?= 2.13.0
TRANSFORMERS_VERSION ?= 5.24.0
BIN := $(VENV)/bin

SRC ?=
DST ?=
ARGS ?=
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: install convert test test-slow wheel-smoke bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[test]' transformers==$(TRANSFORMERS_VERSION)
	touch $@

# `make convert` converts a small random Gemma-4 demo checkpoint; `make convert SRC=dir [DST=dir] [ARGS=...]`
# converts a given folder (DST defaults to SRC-FP8).
convert: install
ifeq ($(SRC),)
	rm -rf $(DEMO_DIR)/gemma-4-tiny
	$(BIN)/python -m converter.demo $(DEMO_DIR)/gemma-4-tiny
	$(BIN)/convert-fp8 --src $(DEMO_DIR)/gemma-4-tiny --dst $(DEMO_DIR)/gemma-4-tiny-FP8 --overwrite $(ARGS)
else
	$(BIN)/convert-fp8 --src $(SRC) --dst $(if $(DST),$(DST),$(patsubst %/,%,$(SRC))-FP8) $(ARGS)
endif

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# The package as users install it: the wheel (dist/), installed into a fresh venv under SMOKE_DIR, converts and
# verifies the demo checkpoint from outside the checkout (.ci/wheel_smoke.sh; CI runs it before the tests).
SMOKE_DIR ?= /tmp/convert-fp8-wheel-smoke
wheel-smoke:
	PYTHON=$(PYTHON) bash .ci/wheel_smoke.sh $(SMOKE_DIR) $(TORCH_VERSION)

# Conversion speed and memory on two real-shape slices of gemma-4-31B (6.3 GiB, and 26 GB with the real mix of
# bytes), beside `cp -r` (needs ~60 GB of disk under BENCH_DIR, ARGS="--mix-layers 0" skips the large slice; run as
# root for cold-cache figures and the memory cgroup).
BENCH_DIR ?= /tmp/convert-fp8-bench
bench: install
	$(BIN)/python bench/bench.py --dir $(BENCH_DIR) $(ARGS)
	$(BIN)/python bench/dialects.py --dir $(BENCH_DIR)

# On a GPU machine: the builtin kernel on real shapes and tiny + real-shape Gemma-4 conversions validated on the
# GPU (uses the machine's own python, torch and transformers).
gpu-check:
	bash bench/gpu_check.sh $(ARGS)

clean:
	rm -rf $(DEMO_DIR) build dist *.egg-info .pytest_cache
