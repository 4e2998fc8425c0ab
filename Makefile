# megaclm: `make demo` and `make test` do all set-up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# DeepSpeed JIT-builds its CPU comm op on first launch (~50 s); keep the build between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# ...with the venv's ninja (a DeepSpeed dependency) for every build: a second ninja on PATH hashes
# build commands differently, and alternating the two rebuilds the op (~60 s) each time.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-unit test-slurm slurm-install fuzz data bench gpu-wheels gpu-check clean

install: $(VENV)/.installed

# torch==2.13.0 first, from the local CPU wheel; every later step is pinned to it by
# constraints.txt so no dependency pulls a multi-GB CUDA build. -qq: errors only (pip's notes on this machine's
# index configuration and setuptools' editable-install notice are not the user's concern).
$(VENV)/.installed: pyproject.toml setup.py constraints.txt $(wildcard csrc/*.cpp)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq -c constraints.txt torch==2.13.0
	$(BIN)/pip install -qq -c constraints.txt -e '.[dev]'
	touch $@

demo: install
	bash examples/demo.sh $(BIN)

test: install slurm-install
	bash tests/run_all.sh $(BIN)/python

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

# tests/cluster runs slurm/ under a real SLURM on this machine (Debian's slurm-wlm 22.05 + munge, as root);
# `make test` includes it, this runs it alone. slurm-install: the packages, when missing (apt-get, as root).
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
slurm-install:
	@if ! (command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged) >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	        $(SLURM_PACKAGES); fi

test-slurm: install slurm-install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/cluster

# The layout fuzzer (README "Prove a layout"): N random layouts through tools/check_layout.py, then the
# pinned regression cases; `make test` runs a fixed-seed sample of it.
N    ?= 300
SEED ?= 1
fuzz: install
	$(BIN)/python tests/fuzz/fuzz.py --n $(N) --seed $(SEED) --regressions

# Full corpora for the benchmarks (not needed by tests or the demo).
data: install
	$(BIN)/python tools/fetch_corpora.py --out .cache/data

bench: install data
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/indices.py

# The GPU proof (README "GPU check"): build the carried wheel folder .whl/ here, then run the check on
# the GPU machine (`make gpu-check`, no venv there), or rehearse it here: make gpu-check GPU_CHECK_ARGS=--dry-run
gpu-wheels: install
	PYTHON=$(BIN)/python bash tools/gpu_wheels.sh

gpu-check:
	bash tools/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .cache .pytest_cache
