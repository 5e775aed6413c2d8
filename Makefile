# selfsup — `make help` lists the targets. Everything runs inside .venv (created on first use).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# pytest-xdist processes for make test / test-fast (auto: one per core; each file runs in one of them)
TEST_WORKERS ?= auto
# the one-node SLURM cluster on localhost that tests/launch/test_slurm.py submits to (scripts: ../shared/slurm)
SLURM_SCRIPTS ?= ../shared/slurm
SLURM_UP_CPUS ?= 4
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast mutants lint format bench-cpu bench-data bench params publish export runs plot tsne mae-vis notebook slurm-up slurm-down clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install selfsup with the dev extras (pip install -e '.[dev]')

train: $(STAMP) ## default pretraining (SimCLR, ResNet-18, digits, CPU minute); extra overrides: make train ARGS="algo=odc"
	$(BIN)/python -m selfsup.train $(ARGS)

test: $(STAMP) ## the whole test suite on every core (CPU; see README "Development" for times; make slurm-up first)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP) ## the quicker subset: pytest -m "not slow", on every core
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

mutants: $(STAMP) ## plant known bugs in a copy of the repo, one at a time: the tests guarding each must fail (ARGS="mae lr" picks some)
	$(BIN)/python tests/mutants.py $(ARGS)

lint: $(STAMP) ## ruff lint + format check + mypy type check of selfsup/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## ruff autofix + format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-cpu: $(STAMP) ## training-step throughput of the default model on this CPU
	$(BIN)/python -m selfsup.tools.benchmark_step --steps 10 --warmup 3 -- device=cpu $(ARGS)

bench-data: $(STAMP) ## the data path: views per_sample vs batched (vs torchvision, kornia), each dataset.cache, training vs synthetic
	$(BIN)/python -m selfsup.tools.benchmark_data --compare -- $(ARGS)

bench: $(STAMP) ## benchmark a checkpoint: make bench CKPT=outputs/<run>/last.pt ARGS="bench=linear" (knn|linear|svm|semisup|finetune)
	$(BIN)/python -m selfsup.benchmark ckpt=$(CKPT) $(ARGS)

params: $(STAMP) ## parameters per module, all and trainable: make params ARGS="algo=mae backbone=vit_base" (or ARGS="ckpt=<run>/last.pt --json")
	$(BIN)/python -m selfsup.tools.count_params $(ARGS)

publish: $(STAMP) ## slim a checkpoint for release as <stem>-<sha8>.pth: make publish CKPT=outputs/<run>/last.pt OUT=zoo/simclr_r18
	$(BIN)/python -m selfsup.tools.publish $(CKPT) $(OUT)

export: $(STAMP) ## the backbone alone under torchvision (ResNet) or timm (ViT) key names: make export CKPT=... OUT=zoo/
	$(BIN)/python -m selfsup.tools.export $(CKPT) $(OUT) $(ARGS)

runs: $(STAMP) ## list the runs under outputs/ and multirun/: make runs ARGS="algo=simclr --sort=-knn"
	$(BIN)/python -m selfsup.tools.runs $(ARGS)

plot: $(STAMP) ## loss / lr / kNN curves of a run or a sweep into <dir>/curves.png: make plot RUN=outputs/simclr/<run>
	$(BIN)/python -m selfsup.tools.plot $(RUN) $(ARGS)

tsne: $(STAMP) ## t-SNE of every backbone stage into <ckpt folder>/tsne: make tsne CKPT=outputs/<run>/last.pt [ARGS="stages=[layer4]"]
	$(BIN)/python -m selfsup.tools.tsne ckpt=$(CKPT) $(ARGS)

mae-vis: $(STAMP) ## MAE reconstruction panels of one image: make mae-vis IMG=cat.jpg CKPT=outputs/mae/<run>/last.pt [OUT=cat_mae.png]
	$(BIN)/python -m selfsup.tools.mae_vis img=$(IMG) ckpt=$(CKPT) $(if $(OUT),out=$(OUT)) $(ARGS)

notebook: $(STAMP) ## run notebooks/walkthrough.ipynb into notebooks/walkthrough.out.ipynb (with outputs; git ignores it)
	cd notebooks && ../$(BIN)/jupyter execute --output=walkthrough.out walkthrough.ipynb

slurm-up: ## start a one-node SLURM cluster on localhost (as root; 4 CPUs: two 2-task jobs at once) for the SLURM tests
	$(SUDO) env SLURM_UP_CPUS=$(SLURM_UP_CPUS) bash $(SLURM_SCRIPTS)/slurm-up.sh

slurm-down: ## stop that cluster (cancels its jobs)
	$(SUDO) bash $(SLURM_SCRIPTS)/slurm-down.sh

clean: ## remove run outputs (outputs/, multirun/) and caches; keeps .venv
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +
