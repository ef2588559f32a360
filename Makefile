# vilms developer entry points. `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build of torch for sentence-transformers; CI machines hold this wheel locally. On a laptop add
# PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu" to avoid the multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
PYTEST_ARGS ?=

.PHONY: help install system test test-fast lint demo demo-down demo-local bench bench-cost bench-bigbodies bench-preflight bench-ollama-ship image-arm64 clean fleet-up fleet-rollout fleet-down fleet-bench

help:
	@echo "make demo | demo-down | demo-local | test | test-fast | lint | bench | clean"
	@echo "make fleet-up N=20 [REGISTRY=1] | fleet-rollout [ARGS=...] | fleet-down | fleet-bench N=20"

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_EXTRA) -e '.[dev]'
	touch $(STAMP)

# LlamaIndex's OpenAILike pins openai<3 (the project runs openai 3): its contract test (tests/test_api_clients.py)
# runs it from this separate, pinned venv.
LLAMAINDEX_VENV ?= .venv-llamaindex
LLAMAINDEX_STAMP := $(LLAMAINDEX_VENV)/.installed
LLAMAINDEX_SPEC ?= llama-index-llms-openai-like==0.8.1 llama-index-core==0.14.25 openai==2.54.0

$(LLAMAINDEX_STAMP):
	python3 -m venv $(LLAMAINDEX_VENV)
	$(LLAMAINDEX_VENV)/bin/python -m pip install -q $(PIP_EXTRA) $(LLAMAINDEX_SPEC)
	touch $(LLAMAINDEX_STAMP)

install: $(STAMP) $(LLAMAINDEX_STAMP)

# Docker CLI/engine, compose v2 plugin, debootstrap, wrk (Debian; needs root).
system:
	@if [ "$$(id -u)" = 0 ]; then bash devkit/setup-system.sh; else echo "make system: not root, skipping (compose tests need 'docker compose')"; fi

# As root with dockerd: the rig (daemon, base image, image archives) is made ready before pytest, outside any test's
# timeout; the daemon is stopped afterwards only if the rig started it. Elsewhere the rig tests skip.
test: install system
	@if [ "$$(id -u)" = 0 ] && command -v dockerd >/dev/null; then \
	  bash devkit/rig/rig.sh daemon-up && bash devkit/rig/rig.sh images && export VILMS_RIG_READY=1; \
	  rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; bash devkit/rig/rig.sh daemon-down; exit $$rc; \
	else $(PY) -m pytest $(PYTEST_ARGS); fi

test-fast: install
	$(PY) -m pytest -m "not molecule" $(PYTEST_ARGS)

lint: install
	ANSIBLE_ROLES_PATH=roles $(VENV)/bin/ansible-lint --profile production

# A local two-host fleet (dgpu + Jetson) provisioned by site.yml on Docker-in-Docker hosts (needs root).
demo: install system
	bash devkit/fleet_demo.sh up

demo-down:
	-bash devkit/fleet_demo.sh down
	-$(PY) -m devkit.demo down

# Just the gateway on localhost: llama.cpp engine (tiny offline model) + MiniLM embeddings.
demo-local: install
	$(PY) -m devkit.demo

bench: install system
	$(PY) -m bench.run

# Gateway CPU µs per request (all its processes) beside req/s: chat, stream, embeddings (bench/cost.py).
COST_ARGS ?= --rounds 3 --duration 5 --workers 2,4
bench-cost: install system
	$(PY) -m bench.cost $(COST_ARGS)

# /health_check while 8 maximum-size bodies (images, huge text, many values) are processed (bench/bigbodies.py).
BIGBODIES_ARGS ?= --rounds 2
bench-bigbodies: install system
	$(PY) -m bench.bigbodies $(BIGBODIES_ARGS)

# A simulated fleet of N edge boxes (half dgpu, half Jetson) on the rig's Docker-in-Docker hosts (README, "Fleet").
N ?= 20
FLEET ?= vilms-fleet
FLEET_ENV = VILMS_RIG_CACHE=$${VILMS_RIG_CACHE:-$(CURDIR)/.cache/rig}
fleet-up: install system
	bash devkit/rig/rig.sh daemon-up
	$(FLEET_ENV) bash devkit/rig/rig.sh images
	$(FLEET_ENV) $(PY) -m devkit.fleet up --n $(N) --prefix $(FLEET) $(if $(REGISTRY),--registry)

fleet-rollout: install
	$(FLEET_ENV) $(PY) -m devkit.fleet rollout --prefix $(FLEET) -- $(ARGS)

fleet-down:
	$(PY) -m devkit.fleet down --prefix $(FLEET)

# The gateway image for Jetsons (linux/arm64) as a `docker save` archive, built on any controller without emulation
# (debootstrap --foreign + pip --platform): .cache/images/gateway-arm64.tar. Needs root, debootstrap, PyPI or a mirror.
image-arm64: install
	$(PY) gateway/cross_image.py --arch arm64 --tag vilms/gateway:0.1.0 --out .cache/images/gateway-arm64.tar

# The preflight of a HOSTS-box fleet shaped like inventories/example: `ansible-playbook site.yml --tags preflight`
# (no host contacted), and its render alone, in one process vs one process per host (bench/results/preflight.md).
HOSTS ?= 500
bench-preflight: install
	$(PY) -m bench.preflight --hosts $(HOSTS) --ansible

# Ollama models shipped from the controller to N Jetson boxes of the simulated fleet (bytes per box, reruns): needs root.
bench-ollama-ship: install system
	$(FLEET_ENV) $(PY) -m bench.ollama_ship --n $(or $(N),4) --mib $(or $(MIB),256)

fleet-bench: install system
	$(FLEET_ENV) $(PY) -m bench.fleet --n $(N)

clean: demo-down
	rm -rf .cache/demo .pytest_cache

# The Ansible collection vilms.fleet (dist/vilms-fleet-<version>.tar.gz) and the vilms wheel beside it: what
# execution-environment.yml ships (docs/_incoming/collection.md).
.PHONY: collection
collection: install
	$(VENV)/bin/ansible-galaxy collection build --force --output-path dist/
	$(PY) -m pip wheel --no-deps --wheel-dir dist/ .
