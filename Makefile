# The README's commands work from a fresh clone on a machine with only python3 (3.11 or newer; 3.11 for tests):
#   make dataset    build the default dataset (Snakemake, params.yaml), then record it in DVC's cache
#   make pull       fetch the dataset that dvc.lock describes from the DVC remote instead of building it
#                   (the shard sets; each split's one Caffe database is then assembled locally)
#   make test       lint and run every test tier, including the reproducibility check (what CI runs)
#   make test-fast  lint and run the quick tier only (no workflow runs, servers, cluster or fuzzing)
# Each creates .venv itself. `make dataset` and `make pull` install only what building needs
# (requirements-dataset.lock); the test targets add the test tools (requirements-test.lock) and
# torch (requirements-torch.lock). Every lock pins exact versions with hashes (`pip --require-hashes`).

PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
DATASET_DEPS := $(VENV)/.dataset-deps
BYTECODE := $(VENV)/.bytecode
TEST_DEPS := $(VENV)/.test-deps
CORES ?= 8
# Where pip finds the torch CPU wheel pinned in requirements-torch.lock when its own configuration
# does not say (PyTorch publishes CPU builds on its own index, not on PyPI), e.g.
#   make test TORCH_FIND_LINKS=https://download.pytorch.org/whl/torch/
TORCH_FIND_LINKS ?=
# The tool `make lock` compiles the locks with, pinned so that a re-lock is repeatable.
UV_VERSION := 0.13.9
FAST_TIER := not (integration or cluster or network or fuzz or slow)

.PHONY: dataset pull push repro report test test-fast lint system-deps bench lock clean

# The locks are compiled for CPython 3.11 on Linux x86-64 (`make lock`); the same pins install on
# 3.12 and 3.13 (checked with pip's resolver), except torch's CPU wheel, whose hash is the cp311 one.
$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "make: datumdb needs Python 3.11 or newer; run e.g. 'make PYTHON=python3.11 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(DATASET_DEPS): $(VENV)/bin/python requirements-dataset.lock pyproject.toml
	$(PIP) install --quiet --require-hashes -r requirements-dataset.lock
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

# datumdb's bytecode, as pip writes it for a regular install (an editable install leaves src/ to
# Python): each step of the pipeline is a new process, and where PYTHONDONTWRITEBYTECODE is set
# (as in many containers) every step would compile datumdb's modules again, 0.1 s each.
$(BYTECODE): $(DATASET_DEPS) $(shell find src/datumdb -name '*.py')
	$(BIN)/python -m compileall -q src/datumdb
	touch $@

# Test tools on top of the dataset's environment (the same versions of everything they share), then
# torch without its dependencies: they are pinned in requirements-test.lock, and `pip check` proves
# they satisfy torch's requirements.
$(TEST_DEPS): $(DATASET_DEPS) requirements-test.lock requirements-torch.lock
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
	  { echo "make: requirements-torch.lock pins torch's CPython 3.11 wheel; make clean && make test PYTHON=python3.11"; exit 1; }
	$(PIP) install --quiet --require-hashes -r requirements-test.lock
	$(PIP) install --quiet --require-hashes --no-deps $(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS)) \
	  -r requirements-torch.lock || \
	  { echo "make: torch 2.13.0+cpu not found; its CPU wheel is on PyTorch's index: make test TORCH_FIND_LINKS=https://download.pytorch.org/whl/torch/"; exit 1; }
	$(PIP) check
	touch $@

# Snakemake builds and, at its end (onsuccess, workflow/rules/common.smk), runs `dvc commit`,
# which stores the outputs in DVC's cache and checks them against dvc.lock (unchanged when the
# bytes are identical), so `dvc status` is clean and `dvc push` works.
dataset: $(DATASET_DEPS) $(BYTECODE)
	PATH="$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES)
	PATH="$(BIN):$$PATH" $(BIN)/dvc status

# The same pipeline through DVC (one stage at a time). DVC reads params.yaml itself before any stage
# (a billion-laughs file would hang it): datumdb's check comes first, one line and exit 2 if bad.
repro: $(DATASET_DEPS) $(BYTECODE)
	$(BIN)/datumdb pipeline check --params params.yaml > /dev/null
	PATH="$(BIN):$$PATH" $(BIN)/dvc repro

# The dataset dvc.lock describes, from the default DVC remote (`dvc remote list`), and back. The
# remote holds the shard sets only: `dvc repro` then assembles each split's Caffe database from
# them (its bytes are those dvc.lock records; nothing else reruns), as `dvc repro` would anyway.
pull: $(DATASET_DEPS) $(BYTECODE)
	PATH="$(BIN):$$PATH" $(BIN)/dvc pull --allow-missing
	$(BIN)/datumdb pipeline check --params params.yaml > /dev/null
	PATH="$(BIN):$$PATH" $(BIN)/dvc repro

push: $(DATASET_DEPS)
	PATH="$(BIN):$$PATH" $(BIN)/dvc push

# Snakemake's HTML report: contact sheets, metrics, label histograms, the summary.
report: $(DATASET_DEPS)
	PATH="$(BIN):$$PATH" $(BIN)/snakemake --report report.html

# Debian packages the tests start for real: a one-node SLURM cluster (munge, slurmctld, slurmd,
# slurm-client) and an OpenSSH server for the DVC SSH remote. Installed once, as root.
SYSTEM_PACKAGES := munge slurmctld slurmd slurm-client openssh-server
SYSTEM_PROGRAMS := /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/sshd

system-deps:
	@for program in $(SYSTEM_PROGRAMS); do test -x $$program || missing=yes; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make test needs these Debian packages (run as root to install): $(SYSTEM_PACKAGES)"; exit 1; fi; \
	  echo "installing $(SYSTEM_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	fi

lint: $(TEST_DEPS)
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks)

test: lint system-deps
	PATH="$(BIN):$$PATH" $(BIN)/python -m pytest

test-fast: lint
	PATH="$(BIN):$$PATH" $(BIN)/python -m pytest -m "$(FAST_TIER)"

bench: $(TEST_DEPS)
	PATH="$(BIN):$$PATH" $(BIN)/python -m benchmarks

# Re-pin every dependency (needs the package registry, and TORCH_FIND_LINKS, by default this machine's
# /opt/wheels, to find the torch CPU wheel); commit the four .lock files. The test lock is compiled first, with
# torch, so that torch's dependencies are pinned in it; torch's own entry then moves to
# requirements-torch.lock. The dataset and runtime locks are compiled under the test lock as a
# constraint, so that every environment has the same version of every package it shares.
LOCK_FLAGS = --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --custom-compile-command "make lock"
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv && .lockvenv/bin/pip install --quiet uv==$(UV_VERSION)
	.lockvenv/bin/uv pip compile $(LOCK_FLAGS) --find-links $(or $(TORCH_FIND_LINKS),/opt/wheels) \
	  requirements-test.in -o requirements-test.lock
	{ echo "# torch, pinned with the hash of its CPU wheel, which is published on PyTorch's index (not on PyPI)."; \
	  echo "# Installed by \`make test\` with --no-deps; its dependencies are in requirements-test.lock."; \
	  awk '/^torch==/ {keep=1; print; next} keep && /^[^ ]/ {keep=0} keep && /--hash/' requirements-test.lock; } \
	  > requirements-torch.lock
	awk '/^torch==/ {skip=1; next} skip && /^[^ ]/ {skip=0} !skip' requirements-test.lock > requirements-test.lock.tmp
	mv requirements-test.lock.tmp requirements-test.lock
	.lockvenv/bin/uv pip compile $(LOCK_FLAGS) -c requirements-test.lock requirements-dataset.in -o requirements-dataset.lock
	.lockvenv/bin/uv pip compile $(LOCK_FLAGS) -c requirements-test.lock requirements.in -o requirements.lock
	rm -rf .lockvenv

clean:
	rm -rf $(VENV) .lockvenv .pytest_cache .ruff_cache .hypothesis .snakemake logs report.html
