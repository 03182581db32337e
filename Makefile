# fundus-mtkd: `make all` runs the whole pipeline on the embedded synthetic dataset; `make test` runs
# the tests. Both create .venv and install the project on first use.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

CONFIG ?= configs/default.yaml
DATA_CONFIG ?= configs/data.yaml
DATA ?= data/synthetic
# Everything a stage writes lands in the run folder named in the config (runs/<name>/).
RUN ?= $(shell test -x $(PYTHON) && $(PYTHON) -m train.experiment --config $(CONFIG) --print run_dir 2>/dev/null || echo runs/default)
OVERRIDES ?=

.PHONY: all venv data validate teachers student experiment-fractions export compress engine bench \
	predict test lint clean help

all: data teachers student export compress bench  ## the whole pipeline on the default config

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints/train.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -c constraints/train.txt -e '.[train,dev]'
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the project

data: $(STAMP)  ## generate the synthetic default dataset + contact sheet (DATA=..., DATA_CONFIG=...)
	$(PYTHON) -m train.make_data --config $(DATA_CONFIG) --out $(DATA)

validate: $(STAMP)  ## check a dataset folder and list every problem with its row (DATA=...)
	$(PYTHON) -m train.validate $(DATA)

teachers: $(STAMP)  ## train every teacher of the ensemble (resumes finished/interrupted ones)
	$(PYTHON) -m train.teachers --config $(CONFIG) $(OVERRIDES)

teacher-%: $(STAMP)  ## train one teacher by name; `make -j N teacher-a teacher-b` runs them in parallel
	$(PYTHON) -m train.teachers --config $(CONFIG) --only $* $(OVERRIDES)

student: $(STAMP)  ## distill the student and train the labels-only baseline, evaluate all on test
	$(PYTHON) -m train.student --config $(CONFIG) $(OVERRIDES)

experiment-fractions: $(STAMP)  ## teachers/student/baseline at 15/30/45/60/70% labels: table + plot
	$(PYTHON) -m train.fractions --config $(CONFIG) $(OVERRIDES)

export: $(STAMP)  ## ONNX FP32 of the student, baseline, teachers and ensemble, verified against PyTorch
	$(PYTHON) -m compress.export --config $(CONFIG) $(OVERRIDES)

compress: $(STAMP)  ## INT8 (cpu + tensorrt flavours) and FP16 ONNX with the accuracy guard
	$(PYTHON) -m compress.quantize --config $(CONFIG) $(OVERRIDES)

engine:  ## TensorRT engines, on the device (DEPLOY_PY=python3 with tensorrt + pycuda or cuda-python)
	$(DEPLOY_PY) -m deploy.build_engine $(RUN)/onnx/student.int8-tensorrt.onnx --precision int8 $(ENGINE_FLAGS)
	$(DEPLOY_PY) -m deploy.build_engine $(RUN)/onnx/student.fp16.onnx --precision fp16 $(ENGINE_FLAGS)

MODEL ?= $(RUN)/onnx/student.int8-cpu.onnx
IMAGES ?= $(wordlist 1,4,$(sort $(wildcard $(DATA)/images/P*.jpg)))
predict:  ## on-device inference with the torch-free runtime (MODEL=..., IMAGES=..., DEPLOY_PY=...)
	$(DEPLOY_PY) -m deploy.predict $(MODEL) $(IMAGES)

bench: $(STAMP)  ## accuracy + latency of every artifact: report.md / report.json / plots
	$(PYTHON) -m benchmarks.bench --config $(CONFIG) $(OVERRIDES)

test: $(STAMP)  ## the test suite (CPU, a few minutes)
	$(PYTHON) -m pytest -q

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check deploy train compress benchmarks tests

clean:  ## remove generated data and runs (keeps .venv)
	rm -rf data runs .pytest_cache .ruff_cache

# --- Device side ------------------------------------------------------------------------------------
# engine, predict and bench-device run with the deploy interpreter, never the training venv: on a Jetson
# the system python3 (JetPack's tensorrt lives there) or a venv made with --system-site-packages and
# `pip install '.[jetson]'` (deploy/README.md); no torch. gpu-check also trains a few AMP steps on
# CUDA, so it uses the training venv (install tensorrt there too to check engines).
DEPLOY_PY ?= python3
ENGINE_FLAGS ?=
ENGINES ?= $(wildcard $(RUN)/onnx/*.trt.engine)
.PHONY: bench-device gpu-check device-deps

bench-device:  ## latency, GPU memory and mJ/image per engine/model on the device (ENGINES=..., IMAGES=...)
	$(DEPLOY_PY) -m benchmarks.device_bench $(or $(ENGINES),$(MODEL)) --images $(IMAGES) --out $(RUN)/bench-device

gpu-check: $(STAMP)  ## any NVIDIA GPU: engines, CUDA FP16 + graphs, ORT-CUDA, AMP steps -> JSON + Markdown
	$(PYTHON) -m benchmarks.gpu_check --run $(RUN) --out $(RUN)/gpu-check

device-deps: $(STAMP)  ## CI: the device install resolves for JetPack 6 / x86-64; deploy tests pass at the lower bounds
	$(PYTHON) .ci/device_deps.py all
