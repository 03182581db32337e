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

$(STAMP): pyproject.toml
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[train,dev]'
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

engine: $(STAMP)  ## TensorRT engines from the ONNX models (needs tensorrt: Jetson / NVIDIA GPU)
	$(PYTHON) -m deploy.build_engine $(RUN)/onnx/student.int8-tensorrt.onnx --precision int8
	$(PYTHON) -m deploy.build_engine $(RUN)/onnx/student.fp16.onnx --precision fp16

MODEL ?= $(RUN)/onnx/student.int8-cpu.onnx
IMAGES ?= $(wordlist 1,4,$(sort $(wildcard $(DATA)/images/P*.jpg)))
predict: $(STAMP)  ## on-device inference with the torch-free runtime (MODEL=..., IMAGES=...)
	$(PYTHON) -m deploy.predict $(MODEL) $(IMAGES)

bench: $(STAMP)  ## accuracy + latency of every artifact: report.md / report.json / plots
	$(PYTHON) -m benchmarks.bench --config $(CONFIG) $(OVERRIDES)

test: $(STAMP)  ## the test suite (CPU, a few minutes)
	$(PYTHON) -m pytest -q

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check deploy train compress benchmarks tests

clean:  ## remove generated data and runs (keeps .venv)
	rm -rf data runs .pytest_cache .ruff_cache

# --- KD recipe sweep (issue 9) --------------------------------------------------------------------
# Needs trained teachers (`make teachers`). Each grid point trains the student from the cached soft
# targets for SWEEP_STEPS optimizer steps and is scored on the validation split: runs/<name>/sweep/.
# The default student takes ~0.75 s a step on 2 cores (README: 382 steps in 4.7 min), so the default
# grid (6 points + the baseline at 150 steps) is ~15 min; widen it with SWEEP_ARGS="--temperature 1 2 4 ...".
SWEEP_STEPS ?= 150
SWEEP_ARGS ?= --alpha 0.5 0.8 0.95 --weighting mean quality_weighted
.PHONY: sweep-kd probe
sweep-kd: $(STAMP)  ## KD sweep (alpha, temperature, schedule, ensemble weighting) on validation: sweep.md
	$(PYTHON) -m train.sweep --config $(CONFIG) --steps $(SWEEP_STEPS) $(SWEEP_ARGS) $(OVERRIDES)

probe: $(STAMP)  ## linear probe floor: frozen student backbone + logistic regression, test split
	$(PYTHON) -m train.probe --config $(CONFIG) $(OVERRIDES)
