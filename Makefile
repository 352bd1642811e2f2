# unlearn-exp: `make help` lists the targets.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
SCALE   ?= sd14
JOBS    ?= 1
STAMP   := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: help setup test test-fast lint format demo demo-methods demo-attacks reproduce-table toy-pretrain bench gpu-check clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the package with its test tools

test: setup  ## run the test suite (CPU, a few minutes)
	$(PYTHON) -m pytest

test-fast: setup  ## the tests not marked slow (about a minute)
	$(PYTHON) -m pytest -m "not slow"

lint: setup  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## ruff format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: setup  ## the newcomer's command: run what the framework has, on the embedded default (JOBS=N: N worker processes; MODEL=toy_mmdit: the toy MMDiT)
	$(PYTHON) -m unlearn_exp.demo --jobs $(JOBS) $(if $(MODEL),--model $(MODEL))

demo-methods: setup  ## beyond DUO: the toy methods grid (original, DUO, ESD-u, ESD-x, UCE x guidance x concept source) and its table (MODEL=toy_mmdit: the toy MMDiT's)
	$(PYTHON) -m unlearn_exp.demo --methods --jobs $(JOBS) $(if $(MODEL),--model $(MODEL))

demo-attacks: setup  ## the toy grid on Ring-A-Bell prompts made against the toy model, and UnlearnDiffAtk on every cell (then: make reproduce-table SCALE=toy)
	$(PYTHON) -m unlearn_exp +experiment=toy_duo benchmark=toy_ring_a_bell_generated multirun
	$(PYTHON) -m unlearn_exp +experiment=toy_duo stage=attack multirun

reproduce-table: setup  ## rebuild the paper's tables under reports/ (SCALE or MODEL=sd14|sd3|toy TASK=nudity|violence|all NO_RUN=1 ARGS="model.path=...")
	$(PYTHON) -m unlearn_exp.report --scale $(or $(MODEL),$(SCALE)) $(if $(TASK),--task $(TASK)) $(if $(NO_RUN),--no-run) $(if $(ARGS),-- $(ARGS))

toy-pretrain: setup  ## retrain the shipped toy model and judge, and measure them (unlearn_exp/toy/RECIPE.md; MODEL=toy_mmdit: the toy MMDiT only)
ifeq ($(MODEL),toy_mmdit)
	$(PYTHON) -m unlearn_exp.toy.pretrain --model toy_mmdit
	$(PYTHON) -m unlearn_exp.toy.measure --model toy_mmdit --out unlearn_exp/toy/weights/measurements_mmdit.json
else
	$(PYTHON) -m unlearn_exp.toy.pretrain
	$(PYTHON) -m unlearn_exp.toy.judge
	$(PYTHON) -m unlearn_exp.toy.measure --out unlearn_exp/toy/weights/measurements.json
endif

bench: setup  ## print the speed benchmarks (sampling against diffusers, inversion against a plain loop)
	$(PYTHON) -m unlearn_exp.bench.sampling --threads 1
	$(PYTHON) -m unlearn_exp.bench.inversion

gpu-check: setup  ## on a GPU machine: throughput, memory, parity with diffusers, options (ARGS="--path ...")
	$(PYTHON) -m unlearn_exp.bench.gpu $(ARGS)

clean:  ## remove caches and outputs (not the venv)
	rm -rf .cache outputs multirun/*/ reports/_work .pytest_cache
