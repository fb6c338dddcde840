# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned so pip takes the wheels this project is tested with; override for other platforms,
# e.g. make TORCH="torch torchvision" demo
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean edge-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'tensorrt-stubs>=10.12'  # types only: see pyproject
	touch $@

demo: $(STAMP)
	$(BIN)/resfuse-export --method masked --output artifacts
	$(BIN)/resfuse-check artifacts/masked-resnet18.json
	$(BIN)/resfuse-bench artifacts/masked-resnet18.json --shapes 1x3x512x512
	$(BIN)/python benchmarks/demo_images.py artifacts/demo-images
	$(BIN)/resfuse-optimize artifacts/masked-resnet18.json --images artifacts/demo-images \
		--shapes 1x3x512x512 --output artifacts/optimized

# The artifacts on an emulated aarch64 CPU against x86 (benchmarks/edge_check.py, docs/edge.md):
# the demo's float32, its fp16 variant and resfuse-optimize's INT8 by default, on a Cortex-A76
# (EDGE_CPU=cortex-a72: a core without FP16 arithmetic; EDGE_BACKENDS=onnxruntime,openvino)
EDGE_DEMO := artifacts/masked-resnet18.json artifacts/masked-resnet18-fp16.json \
	artifacts/optimized/artifacts/masked-resnet18-int8.json
ARTIFACTS ?= $(EDGE_DEMO)
EDGE_CPU  ?= cortex-a76
EDGE_BACKENDS ?= onnxruntime

edge-check: $(STAMP) $(filter $(EDGE_DEMO),$(ARTIFACTS))
	$(BIN)/python benchmarks/edge_check.py --cpu $(EDGE_CPU) --backends $(EDGE_BACKENDS) $(ARTIFACTS)

artifacts/masked-resnet18.json artifacts/optimized/artifacts/masked-resnet18-int8.json:
	$(MAKE) demo

artifacts/masked-resnet18-fp16.json: | artifacts/masked-resnet18.json
	$(BIN)/resfuse-export --method masked --precision fp16 -o artifacts \
		--weights $$($(BIN)/python -c "import json; print('artifacts/' + json.load(open('$|'))['files']['weights']['path'])")

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_latency.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy resfuse export runtime
	# the TensorRT calls against tensorrt-stubs (mypy skips them in site-packages: see the test)
	$(BIN)/python -m pytest -q tests/test_engines.py -k type_checks_against_the_stubs

clean:
	rm -rf artifacts site .pytest_cache .mypy_cache .ruff_cache .hypothesis
