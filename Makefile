# Two commands on a fresh machine:
#   make serve   set up (venv, pinned packages, model) and serve HTTP :8501 and gRPC :8500
#   make test    set up and run the whole test suite
# WEIGHTS picks the model make serve saves when the store has none (auto), or when the store's
# latest model has other weights than those named:
#   auto (default: ImageNet, or random weights if the download fails) | imagenet (download or fail)
#   | random (offline) | /path/to/weights.h5 (offline)
# READY_ARGS: what make serve's (and make run's) readiness check needs to connect, e.g. with
# mutual TLS: READY_ARGS="--cert probe.pem --key probe.key" (it trusts ssl.ca_certs, or --ca-cert).
# GPU=1 (make setup GPU=1, make serve GPU=1) also installs TensorFlow's CUDA libraries
# (requirements-gpu.txt); the runner then uses the host's NVIDIA GPU.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WEIGHTS ?= auto
GPU ?=
INSTALLED := $(VENV)/.installed$(if $(GPU),-gpu)
RUN_DIR := .run
BENTO_TAG := inception_v3:latest

export BENTOML_CONFIG ?= $(CURDIR)/configuration.yaml
export PYTHONUNBUFFERED := 1
# BentoML's usage reports: off, as in the image (bentofile.yaml); BENTOML_DO_NOT_TRACK=false sends them.
export BENTOML_DO_NOT_TRACK ?= true

ifeq ($(WEIGHTS),auto)
WEIGHTS_ARGS := --imagenet-or-random
else ifeq ($(WEIGHTS),imagenet)
WEIGHTS_ARGS :=
else ifeq ($(WEIGHTS),random)
WEIGHTS_ARGS := --random-weights
else
WEIGHTS_ARGS := --weights $(WEIGHTS)
endif

.PHONY: setup model serve stop reload test lint clean

setup: $(INSTALLED)

$(INSTALLED): requirements.txt requirements-tensorflow.txt requirements-dev.txt requirements-gpu.txt constraints.txt container/bentoml_patch.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt $(if $(GPU),-r requirements-gpu.txt) -c constraints.txt
	$(PY) -m container.bentoml_patch   # BentoML issue 5566: bentoml containerize with our Dockerfile template
	touch $@

model: setup
	@$(PY) -m inception_v3.weights has $(WEIGHTS) || $(PY) save_model.py $(WEIGHTS_ARGS)

serve: model stop
	@mkdir -p $(RUN_DIR)
	nohup $(PY) -m inception_v3.launcher > $(RUN_DIR)/serve.log 2>&1 & echo $$! > $(RUN_DIR)/serve.pid
	@$(PY) -m inception_v3.launcher --wait-ready --timeout 180 --pid $$(cat $(RUN_DIR)/serve.pid) $(READY_ARGS) || { tail -n 30 $(RUN_DIR)/serve.log; $(MAKE) --no-print-directory stop; exit 1; }
	@$(PY) -m inception_v3.launcher --addresses
	@echo "logs  $(RUN_DIR)/serve.log; stop with: make stop"
	@$(PY) -m inception_v3.weights notice

stop:
	@if [ -f $(RUN_DIR)/serve.pid ]; then \
		pid=$$(cat $(RUN_DIR)/serve.pid); \
		if kill -TERM $$pid 2>/dev/null; then \
			echo "stopping server (pid $$pid)"; \
			for i in $$(seq 1 90); do kill -0 $$pid 2>/dev/null || break; sleep 0.5; done; \
		fi; \
		rm -f $(RUN_DIR)/serve.pid; \
	fi
	@if [ -f $(RUN_DIR)/container.json ]; then $(PY) -m container.image stop; fi

# Look at the model store for new versions now (the runner also looks every model_poll_s seconds).
reload:
	@if [ -f $(RUN_DIR)/serve.pid ]; then kill -HUP $$(cat $(RUN_DIR)/serve.pid) && echo "asked make serve to look for new model versions"; \
	elif [ -f $(RUN_DIR)/container.json ]; then $(PY) -m container.image reload; \
	else echo "nothing is serving (make serve or make run)" >&2; exit 1; fi

test: setup browser-deps
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean: stop
	rm -rf $(RUN_DIR) build .pytest_cache

# --- deployable image (bentoml build / containerize) -------------------------
# build_all: model (if the store has none) -> `bentoml build` -> `bentoml containerize` (printed) -> inception_v3:latest.
# run: the image's default command, HTTP :8501 and gRPC :8500 under one launcher; `make stop` stops it.
# It stops a `make serve` for the ports, once it knows an engine holds the image.
# MODEL_STORE=DIR (run): serve the versions of that model store folder (e.g. ~/bentoml/models), watched.
# The engine is docker, or buildah where no Docker engine answers (CONTAINER_BACKEND=docker|buildah);
# buildah starts from a Debian base built offline once (container/build-base.sh). docs/deployment.md
.PHONY: bento build_all run image-test

bento: model
	$(VENV)/bin/bentoml build

build_all: bento
	$(PY) -m container.image build $(if $(filter random,$(WEIGHTS)),--allow-random-weights)

run: setup
	@$(PY) -m container.image check
	@$(MAKE) --no-print-directory stop
	$(PY) -m container.image run $(if $(MODEL_STORE),--model-store $(MODEL_STORE))
	@$(PY) -m inception_v3.launcher --wait-ready --timeout 300 $(READY_ARGS) || { $(MAKE) --no-print-directory stop; exit 1; }
	@$(PY) -m inception_v3.launcher --addresses
	@echo "(a container; stop with: make stop)"

# `bentoml containerize` from the project folder (the test store's model), serves the image, asks both protocols (slow, opt-in).
image-test: setup
	RUN_IMAGE_TESTS=1 $(PY) -m pytest -m image tests/test_image.py -v -s

# --- hardening: browser, audit ---------------------------------------------

.PHONY: browser-deps audit

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# Debian's chromium for tests/test_swagger_ui.py; Playwright drives it (no `playwright install`).
browser-deps:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -q \
		&& DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

# Known vulnerabilities in every pinned package (constraints.txt: what ships, and the
# test tools), from PyPI's advisory data (https://pypi.org/pypi/NAME/VERSION/json).
# --strict: a package that cannot be checked fails the audit instead of passing it.
# `make test` runs this through tests/test_audit.py where that API answers.
audit: setup
	$(VENV)/bin/pip-audit --strict --no-deps --disable-pip --progress-spinner off -r constraints.txt

# --- benchmark ----------------------------------------------------------------
.PHONY: bench bench-quick bench-swaps

# Served HTTP and gRPC vs in-process TensorFlow on this machine (about 10 minutes on 2 cores):
# a table, JSON and a PNG plot in benchmarks/results/. BENCH_ARGS="--publish"
# also copies them to docs/ for docs/performance.md.
bench: setup
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

bench-quick: setup
	$(PY) -m benchmarks.bench --quick $(BENCH_ARGS)

# Five model version swaps under load: lost requests, p99 while swapping, memory across swaps.
bench-swaps: setup
	$(PY) -m benchmarks.swaps $(BENCH_ARGS)
