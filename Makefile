# fundus-mtkd: `make all` runs the whole pipeline on the embedded synthetic dataset; `make test` runs
# the tests. Both create .venv and install the project on first use.
#   make all DATA=data/idrid                      # your own dataset (a folder made by `python -m train.data.adapt`)
#   make student DATA=data/idrid OVERRIDES="student.kd.alpha=0.5 student.kd.temperatures={dr_grade: 2}"
#   make student OVERRIDES_FILE=my_overrides.yaml # a partial config mapping
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

SYNTHETIC := data/synthetic
DATA ?= $(SYNTHETIC)
override DATA := $(patsubst %/,%,$(DATA))
ifneq ($(words $(DATA)),1)
$(error DATA='$(DATA)' contains a space; make cannot pass such a path safely: rename or symlink the folder)
endif
DATA_CONFIG ?= configs/data.yaml
# The synthetic default gets the CPU config tuned for it; any other dataset the real-photograph config.
ifeq ($(DATA),$(SYNTHETIC))
CONFIG ?= configs/default.yaml
NAME ?= default
else
CONFIG ?= configs/real.yaml
NAME ?= $(notdir $(patsubst %/,%,$(DATA)))
endif
# Overrides travel through the environment as one string, so spaces, commas and braces reach Python
# intact (train.config.split_overrides splits them); OVERRIDES_FILE is a YAML mapping.
OVERRIDES ?=
# Teachers trained at once, each its own process ('auto': one per GPU, else one per core with one thread).
TEACHER_JOBS ?= auto
FRACTIONS_ARGS ?=
OVERRIDES_FILE ?=
export OVERRIDES OVERRIDES_FILE
STAGE_ARGS = --config '$(CONFIG)' 'data.root=$(DATA)' 'name=$(NAME)' --set "$$OVERRIDES" \
	$${OVERRIDES_FILE:+--overrides-file "$$OVERRIDES_FILE"}
# Everything a stage writes lands in the run folder (runs/<name>/): asked from the resolved config, so
# an override of name or runs_root is followed too; computed once.
RUN ?= $(eval RUN := $(shell test -x $(PYTHON) && $(PYTHON) -m train.experiment --config '$(CONFIG)' \
	'data.root=$(DATA)' 'name=$(NAME)' --set '$(subst ','\'',$(OVERRIDES))' \
	$(if $(OVERRIDES_FILE),--overrides-file '$(OVERRIDES_FILE)') \
	--print run_dir 2>/dev/null || echo runs/$(NAME)))$(RUN)

.PHONY: all pipeline verdict venv data check validate teachers student experiment-fractions export compress engine bench \
	bench-architectures readme-results \
	predict test lint clean help

# The verdict runs even when a stage failed (a missed floor, a failed guard): it says what is wrong or
# which stage to run; `make all` still exits with the failed stage's code.
all:  ## the whole pipeline, then the verdict (DATA=<dataset folder> for yours)
	@$(MAKE) --no-print-directory pipeline; code=$$?; $(MAKE) --no-print-directory verdict || exit $$?; exit $$code

pipeline: data check teachers student export compress bench  ## the pipeline without the verdict

help:
	@grep -E '^[a-z%-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints/train.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -c constraints/train.txt -e '.[train,dev]'
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the project

data: $(STAMP)  ## generate the synthetic default dataset (with DATA=<your folder>: check it exists)
ifeq ($(DATA),$(SYNTHETIC))
	$(PYTHON) -m train.data.make_data --config $(DATA_CONFIG) --out $(DATA)
else
	@test -f '$(DATA)/dataset.yaml' || { echo "error: $(DATA)/dataset.yaml not found; make the dataset folder with \
	\`python -m train.data.adapt ... --out $(DATA)\` first (README: Your own data)" >&2; exit 2; }
endif

check: $(STAMP)  ## check every stage's config against the dataset and validate it (fast; before training)
	$(PYTHON) -m train.check $(STAGE_ARGS)

validate: $(STAMP)  ## check a dataset folder and list every problem with its row (DATA=...)
	$(PYTHON) -m train.data.validate '$(DATA)'

teachers: $(STAMP)  ## train every teacher of the ensemble (resumes finished/interrupted ones)
	$(PYTHON) -m train.teachers $(STAGE_ARGS) --jobs $(TEACHER_JOBS)

teacher-%: $(STAMP)  ## train one teacher by name; `make -j N teacher-a teacher-b` runs them in parallel
	$(PYTHON) -m train.teachers $(STAGE_ARGS) --only $*

student: $(STAMP)  ## distill the student and train the labels-only baseline, evaluate all on test
	$(PYTHON) -m train.student $(STAGE_ARGS)

experiment-fractions: $(STAMP)  ## teachers/student/baseline at 15/30/45/60/70/100% labels: table + plot
	$(PYTHON) -m train.fractions $(STAGE_ARGS) --jobs $(TEACHER_JOBS) $(FRACTIONS_ARGS)

export: $(STAMP)  ## ONNX FP32 of the student, baseline, teachers and ensemble, verified against PyTorch
	$(PYTHON) -m compress.export $(STAGE_ARGS)

compress: $(STAMP)  ## INT8 (cpu + tensorrt flavours) and FP16 ONNX with the accuracy guard
	$(PYTHON) -m compress.quantize $(STAGE_ARGS)

engine:  ## TensorRT engines, on the device (DEPLOY_PY=python3 with tensorrt + pycuda or cuda-python)
	$(DEPLOY_PY) -m deploy.build_engine '$(RUN)/onnx/student.int8-tensorrt.onnx' --precision int8 $(ENGINE_FLAGS)
	$(DEPLOY_PY) -m deploy.build_engine '$(RUN)/onnx/student.fp16.onnx' --precision fp16 $(ENGINE_FLAGS)

MODEL ?= $(RUN)/onnx/student.int8-cpu.onnx
# The demo predicts test-split images of DATA (never training images), taken in turn from each class,
# with the true labels next to the predictions; IMAGES=... predicts those files instead.
IMAGES ?=
PREDICT_LIMIT ?= 8
predict:  ## torch-free inference on DATA's test images with true labels (MODEL=..., IMAGES=..., DEPLOY_PY=...)
	$(DEPLOY_PY) -m deploy.predict '$(MODEL)' $(or $(IMAGES),--manifest '$(DATA)/manifest.csv' --limit $(PREDICT_LIMIT))

bench: $(STAMP)  ## accuracy + latency of every artifact: report.md / report.json / plots
	$(PYTHON) -m benchmarks.bench $(STAGE_ARGS)

readme-results: $(STAMP)  ## rewrite README.md's results blocks from the run files (CHECK=1: only list drifted blocks)
	$(PYTHON) -m benchmarks.readme_results $(STAGE_ARGS) $(if $(CHECK),--check)

verdict: $(STAMP)  ## READY TO DEPLOY or not, the file for the device, stage times: runs/<name>/README.md
	$(PYTHON) -m benchmarks.verdict $(STAGE_ARGS)

# Random weights, so it needs no training: e.g. CONFIG=configs/paper.yaml (7 ResNet-50 teachers at 224 px).
bench-architectures: $(STAMP)  ## latency only, random weights: the config's teachers vs its student FP32/INT8
	$(PYTHON) -m benchmarks.architectures $(STAGE_ARGS) --out 'runs/bench-architectures/$(basename $(notdir $(CONFIG)))'

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
	$(DEPLOY_PY) -m benchmarks.device_bench $(or $(ENGINES),$(MODEL)) \
		--images $(or $(IMAGES),$(wordlist 1,4,$(sort $(wildcard $(DATA)/images/*.jpg $(DATA)/images/*.png)))) \
		--out '$(RUN)/bench-device'

gpu-check: $(STAMP)  ## any NVIDIA GPU: engines, CUDA FP16 + graphs, ORT-CUDA, AMP steps -> JSON + Markdown
	$(PYTHON) -m benchmarks.gpu_check --run '$(RUN)' --out '$(RUN)/gpu-check'

device-deps: $(STAMP)  ## CI: the device install resolves for JetPack 6 / x86-64; deploy tests pass at the lower bounds
	$(PYTHON) .ci/device_deps.py all

# --- KD recipe sweep (issue 9) --------------------------------------------------------------------
# Needs trained teachers (`make teachers`). Each grid point trains the student from the cached soft
# targets for the student's own budget (SWEEP_STEPS=N for a shorter one) and is scored on the
# validation split: runs/<name>/sweep/. Each point trains as long as `make student`'s student (the
# README's weighting sweep: 3 points in 9.9 min on 2 cores); widen the grid with
# SWEEP_ARGS="--temperature 1 2 4 ...", repeat it per training seed with SWEEP_ARGS="--seeds 0 1 2".
SWEEP_STEPS ?=
SWEEP_ARGS ?= --alpha 0.5 0.9 --weighting mean quality_weighted --labelled-share natural 0.5
.PHONY: sweep-kd probe
sweep-kd: $(STAMP)  ## KD sweep (alpha, temperature, schedule, weighting, labelled share, length, seeds) on validation: sweep.md
	$(PYTHON) -m train.sweep $(STAGE_ARGS) $(if $(SWEEP_STEPS),--steps $(SWEEP_STEPS)) $(SWEEP_ARGS)

probe: $(STAMP)  ## linear probe floor: frozen student backbone + logistic regression, test split
	$(PYTHON) -m train.probe $(STAGE_ARGS)
