# clipadapt: `make run` runs the default experiment, `make test` the offline test suite.
# TORCH=cpu (default) installs the local CPU torch wheel; TORCH=gpu a CUDA build from PyPI.
# ARGS='<hydra overrides>' is passed to run, demo, train and sweep.

VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= cpu
ARGS   ?=
export PIP_CONSTRAINT := $(CURDIR)/constraints-$(TORCH).txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install run demo train extract test bench gpu-check data report sweep clean-outputs

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed-$(TORCH): pyproject.toml constraints-$(TORCH).txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	@# an editable install leaves src/ uncompiled; Python reads these .pyc even under PYTHONDONTWRITEBYTECODE=1
	$(PY) -m compileall -q src
	rm -f $(VENV)/.installed-*
	touch $@

install: $(VENV)/.installed-$(TORCH) ## create .venv and install the project (TORCH=cpu|gpu)

run: install ## the default experiment: Tip-Adapter-F, EuroSAT, 16 shots, RN50/OpenAI (needs the internet once)
	$(PY) -m clipadapt.prepare eurosat
	$(PY) -m clipadapt.train $(ARGS)

# The demo's synthetic classes hold 32 images (16 train: the default 16 shots; a class short of K is refused).
demo: install ## the same pipeline offline, on synthetic images and a tiny random-init CLIP
	HF_HUB_OFFLINE=1 $(PY) -m clipadapt.train dataset=synthetic dataset.images_per_class=32 backbone=tiny logger=none $(ARGS)

train: install ## one cell (or a grid with ARGS='-m ...')
	$(PY) -m clipadapt.train $(ARGS)

extract: install ## compute and cache features only
	$(PY) -m clipadapt.extract $(ARGS)

test: install ## the offline test suite
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install ## speed figures (scripts/bench.py)
	$(PY) scripts/bench.py $(ARGS)

# Stops at once, in one line, where torch sees no CUDA device; the bench's gpu size is chosen to finish in < 8 min.
gpu-check: install ## on a CUDA machine (TORCH=gpu): the gpu tests, then every bench section on the GPU, one table
	@$(PY) scripts/bench.py --device cuda --check-device
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)
	$(PY) scripts/bench.py --size gpu --device cuda $(ARGS)

data: install ## download and prepare datasets: make data DATASETS='eurosat dtd'
	$(PY) -m clipadapt.prepare $(or $(DATASETS),eurosat)

report: install ## tables and plots of sweep folders (default: the grid's outputs/grid): make report SWEEPS='dir1 dir2'
	$(PY) -m clipadapt.report $(or $(SWEEPS),outputs/grid)

sweep: install ## the 11-dataset x shots x seeds grid for METHOD (default tip_adapter_f)
	$(PY) -m clipadapt.train -m +sweep=grid method=$(or $(METHOD),tip_adapter_f) $(ARGS)

clean-outputs: ## remove Hydra outputs (not the feature cache)
	rm -rf outputs multirun
