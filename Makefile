# ntt: `make help` lists the targets. Everything runs inside $(VENV) (created by `make setup`).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# The torch to install first. Default: the CPU build of our machines. On a GPU machine keep your own
# CUDA build with `make setup TORCH=` (empty: torch is not touched; pyproject only asks torch>=2.1).
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ntt-installed
ARGS ?=

.PHONY: help setup setup-lvis lock test test-slow test-all parity parity-avx2 parity-gpu lint format demo smoke report-smoke checkpoints bench bench-study bench-fastpaths clean \
	prepare-coco prepare-voc prepare-cdfsod prepare-lvis study-coco study-voc study-cdfsod study-lvis

help: ## list the targets
	@echo "ntt make targets (run from the repository root):"
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-15s\033[0m %s\n", $$1, $$2}'
	@echo "variables: TORCH='$(TORCH)' VENV=$(VENV) TEST_WORKERS=$(TEST_WORKERS) ARGS='<extra arguments of the target>' STUDY_ARGS='<study-ratio options (bench, bench-study)>'"
	@echo "  ARGS: hydra overrides for demo, smoke, study-*; pytest options for test*, parity*; tool options for bench*, prepare-*"

setup: $(STAMP) ## create $(VENV) and install ntt + torch + sam2/dinov2 (--no-deps) + dev tools

# The versions the test suite passed with (pip constraints; pyproject.toml keeps its ranges): `make lock`
# refreshes the file, `make test` then checks them.
LOCK := constraints.txt

$(STAMP): pyproject.toml Makefile $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade -c $(LOCK) pip setuptools wheel
	@if [ -n "$(TORCH)" ]; then echo "installing $(TORCH)"; $(PIP) install -q "$(TORCH)"; \
	 else echo "TORCH is empty: keeping the installed torch"; $(PY) -c "import torch; print('torch', torch.__version__)"; fi
	$(PIP) install -q -c $(LOCK) -e ".[dev]"
	@# sam2 and dinov2 declare dependencies that pull torchvision / CUDA torch / xformers: install them bare.
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation --no-deps sam2==1.1.0 dinov2==0.0.1.dev2
	@touch $@

setup-lvis: setup ## add the optional lvis package (official LVIS metric, eval=lvis) at its constraints.txt pins
	$(PIP) install -q -c $(LOCK) -e ".[dev,lvis]"

lock: ## refresh constraints.txt: the newest versions pyproject.toml allows, resolved in a fresh venv (then `make test`)
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools wheel
	@if [ -n "$(TORCH)" ]; then .venv-lock/bin/python -m pip install -q "$(TORCH)"; fi
	.venv-lock/bin/python -m pip install -q ".[dev,lvis]"
	@{ sed -n '1,6p' $(LOCK); \
	   echo "# This file: \`make lock\` on $$(date +%F), $$(.venv-lock/bin/python -V), $$(uname -m) $$(uname -s)."; \
	   .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -viE '^(torch|sam2|dinov2|ntt)==' ; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock
	@echo "$(LOCK) refreshed: run 'make test' (it reinstalls .venv with these versions) and commit the file if it passes"

# Worker processes of `make test` (pytest-xdist, one file per worker at a time, one torch thread each):
# on a busy 2-core machine 2 single-threaded workers finish the suite in about half the time of one
# 2-thread process (docs/testing.md). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: setup ## run the default test suite in TEST_WORKERS=2 worker processes (docs/testing.md: its measured time); fails if no test ran
	@set -o pipefail; $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS); rc=$$?; \
	 if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests"; exit 1; fi; exit $$rc

test-slow: setup ## run only the tests marked slow
	$(PY) -m pytest -q -m slow $(ARGS)

test-all: setup ## run every test, slow ones included
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

parity: setup ## parity with the authors' code (NTT and FSOD-VFM fixtures): default CPU kernels (+ NTT's forced AVX2)
	$(PY) -m pytest -q -s -m parity $(ARGS)

parity-avx2: setup ## the same comparisons with the AVX2 kernels forced (on an AVX-512 machine: the other rounding)
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 DNNL_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q -s -m parity $(ARGS)

parity-gpu: setup ## the same parity comparisons on CUDA with TF32 off (needs a GPU; skips without one)
	$(PY) -m pytest -q -s -m gpu tests/test_parity.py $(ARGS)

lint: setup ## ruff lint + format check
	$(VENV)/bin/ruff check ntt tests
	$(VENV)/bin/ruff format --check ntt tests

format: setup ## ruff format + autofix
	$(VENV)/bin/ruff format ntt tests
	$(VENV)/bin/ruff check --fix ntt tests

demo: setup ## main job: the whole pipeline on the synthetic dataset with SAM2.1-t + DINOv2-S/14 (fetches them)
	@$(PY) -m ntt download --quiet sam2.1_hiera_t dinov2_vits14 || echo "(could not fetch the checkpoints; going on with what is in ./checkpoints)"
	@$(PY) -m ntt run dataset=synthetic backbone/sam2=sam2.1_hiera_t backbone/dinov2=vits14 shots=3 variant=demo $(ARGS) || { \
	  echo; echo "make demo stopped (see the error above). Offline, without the checkpoints, run 'make smoke':"; \
	  echo "the same pipeline with tiny random weights (plumbing only)."; exit 1; }

smoke: setup ## the demo pipeline with tiny RANDOM weights (offline; numbers are plumbing only)
	$(PY) -m ntt run dataset=synthetic debug=smoke $(ARGS)

report-smoke: setup ## the smoke run into outputs/report-smoke/run, then its HTML page (`ntt report`: report.html)
	$(PY) -m ntt run dataset=synthetic debug=smoke run_dir=$(OUTPUTS)/report-smoke/run $(ARGS)
	$(PY) -m ntt report $(OUTPUTS)/report-smoke/run

checkpoints: setup ## download the paper's checkpoints (SAM2.0-L, DINOv2-L/14) into ./checkpoints
	$(PY) -m ntt download sam2_hiera_l dinov2_vitl14

bench: setup ## hot spots (ARGS=, e.g. "--device cuda ...") + the 60-bank study ratio (STUDY_ARGS=) -> benchmarks/
	$(PY) -m ntt.tools.bench $(ARGS)
	$(PY) -m ntt.tools.study_ratio $(if $(findstring --quick,$(ARGS)),--quick) $(STUDY_ARGS)

bench-study: setup ## only the N-bank study ratio: one run vs `ntt study` of 60 banks (~4 min on 2 CPU cores)
	$(PY) -m ntt.tools.study_ratio $(STUDY_ARGS)

bench-fastpaths: setup ## fast paths vs parity mode: images/s, memory, agreement (random weights); benchmarks/fastpaths-*
	$(PY) -m ntt.tools.fastpaths $(ARGS)

# Benchmark data: public downloads -> the jsons conf/dataset/* read (docs/reproducing.md).
# The data is checked first (--check-only: free, seconds); SAM ViT-H (2.5 GB) is downloaded only after that
# check passed, and only when it is the mask model asked for and masks are made (not with --boxes-only).
MASK_MODEL ?= sam_vit_h
FETCH_SAM_VIT_H = if [ "$(MASK_MODEL)" = sam_vit_h ] && [[ " $(ARGS) " != *" --boxes-only "* ]]; then \
	$(PY) -m ntt download sam_vit_h --quiet || true; fi
prepare-coco: setup ## check the COCO 2017 layout in data/coco (nothing to convert)
	$(PY) -m ntt prepare coco $(ARGS)

prepare-voc: setup ## VOC07+12 xml -> COCO jsons + SAM masks in data/voc (MASK_MODEL=sam_vit_h; GPU advised)
	$(PY) -m ntt prepare voc --check-only $(ARGS)
	$(FETCH_SAM_VIT_H)
	$(PY) -m ntt prepare voc --mask-model $(MASK_MODEL) $(ARGS)

prepare-cdfsod: setup ## CD-FSOD layout check + SAM masks for shot files and test.json in data/cdfsod
	$(PY) -m ntt prepare cdfsod --check-only $(ARGS)
	$(FETCH_SAM_VIT_H)
	$(PY) -m ntt prepare cdfsod --mask-model $(MASK_MODEL) $(ARGS)

prepare-lvis: setup ## LVIS v1 json fix-ups in data/lvis (keeps the fields the official LVIS metric, eval=lvis, reads)
	$(PY) -m ntt prepare lvis $(ARGS)

# The paper's accuracy studies: one each (experiments/study/*.yaml), then its tables in
# $(OUTPUTS)/tables/<study>/ (summary.md, seed_stats.csv, ap_vs_shots_<benchmark>.png). The table is written even when some runs failed (listed there).
# `ntt study` runs every job of the sweep with ONE pass over the test images for all their memory banks
# (results byte-identical to separate runs, tests/test_study.py). STUDY_RUN="$(PY) -m ntt run" runs the jobs one
# by one as a Hydra multirun instead (e.g. on SLURM with ARGS=hydra/launcher=slurm).
# (Not to be confused with the timing targets above: `bench*` measure speed, `study-*` measure accuracy.)
OUTPUTS ?= outputs
STUDY_RUN ?= $(PY) -m ntt study
define run_study
	@status=0; $(STUDY_RUN) study=$(1) $(ARGS) || status=$$?; \
	 $(PY) -m ntt summarize $(OUTPUTS) --study $(1) --out $(OUTPUTS)/tables/$(1); exit $$status
endef
study-coco: setup ## COCO few-shot: shots 1,2,3,5,10,30 x 10 seeds (60 runs) + table (GPU; paper 36.8 nAP)
	$(call run_study,coco)

study-voc: setup ## PASCAL VOC: 3 splits x shots 1,2,3,5,10 + table (GPU; paper 71.2 nAP50)
	$(call run_study,voc)

study-cdfsod: setup ## CD-FSOD: 6 datasets x shots 1,5,10 + table (GPU; paper 22.4 nAP)
	$(call run_study,cdfsod)

study-lvis: setup ## LVIS v1 val (pycocotools AP as the authors; ARGS=eval=lvis: official LVIS AP): shots 1,5,10 + table (GPU)
	$(call run_study,lvis)

clean: ## remove caches (keeps .venv, outputs and checkpoints)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
