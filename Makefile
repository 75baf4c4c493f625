# `make run` and `make test` set everything up on a fresh machine by themselves (see scripts/setup.sh).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pdmesh-setup
PYTEST_ARGS ?=
UP_ARGS ?=

HELM := .tools/bin/helm

.PHONY: setup run test helm-test images lint format proto bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh
	@touch $@

run: $(STAMP)
	$(BIN)/pdmesh up $(UP_ARGS)

test: $(STAMP) $(HELM)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the Helm chart: helm lint --strict and kubernetes-validate over a matrix of values, and manifest tests
helm-test: $(STAMP) $(HELM)
	$(BIN)/python -m pytest -q tests/test_helm.py

$(HELM): scripts/helm.sh
	scripts/helm.sh

# container images (needs docker; see deploy/docker/*.Dockerfile for the platforms' build arguments)
DOCKER ?= docker
TAG ?= 0.1.0
images:
	$(DOCKER) build -f deploy/docker/router.Dockerfile -t pdmesh-router:$(TAG) .
	$(DOCKER) build -f deploy/docker/worker.Dockerfile -t pdmesh-worker:$(TAG)-cuda12 .
	$(DOCKER) build -f deploy/docker/worker.Dockerfile -t pdmesh-worker:$(TAG)-cuda12-ray --build-arg EXTRAS=worker,ray .
	$(DOCKER) build -f deploy/docker/worker.Dockerfile -t pdmesh-worker:$(TAG)-cuda13 \
		--build-arg BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 \
		--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 --build-arg MOONCAKE=mooncake-transfer-engine-cuda13
	$(DOCKER) build -f deploy/docker/worker.Dockerfile -t pdmesh-worker:$(TAG)-rocm \
		--build-arg BASE=rocm/dev-ubuntu-24.04:6.4 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/rocm6.4 \
		--build-arg MOONCAKE=mooncake-transfer-engine-non-cuda

lint: $(STAMP)
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix services tests bench
	$(BIN)/ruff format services tests bench

# CPU benchmarks (GPU ones: see docs/benchmarks.md for their commands)
bench: $(STAMP)
	$(BIN)/python bench/prefix_cache.py
	$(BIN)/python bench/transfer.py --device cpu --repeats 9
	$(BIN)/python bench/ranks.py

# regenerate the gRPC stubs next to the contract (committed, so installs need no protoc)
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
		proto/pdmesh/v1/worker.proto

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
