# A worker (prefill, decode or colocated) for one GPU platform, chosen by build arguments:
#   CUDA 12: docker build -f deploy/docker/worker.Dockerfile -t pdmesh-worker:cuda12 .
#   CUDA 13: --build-arg BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 --build-arg MOONCAKE=mooncake-transfer-engine-cuda13
#   ROCm:    --build-arg BASE=rocm/dev-ubuntu-24.04:6.4 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/rocm6.4 --build-arg MOONCAKE=mooncake-transfer-engine-non-cuda
ARG BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG MOONCAKE=mooncake-transfer-engine
ARG EXTRAS=worker
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# libibverbs: Mooncake links it for every transport; the RDMA NIC's provider comes from the host's device plugin
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libibverbs1 ibverbs-providers \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/pdmesh
ENV PATH=/opt/pdmesh/bin:$PATH
RUN pip install --index-url ${TORCH_INDEX} torch
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services services
COPY proto proto
RUN pip install ".[${EXTRAS}]" "${MOONCAKE}" && rm -rf /src
RUN useradd --uid 10001 --user-group --create-home pdmesh
USER 10001:10001
WORKDIR /home/pdmesh
EXPOSE 50051
ENTRYPOINT ["pdmesh"]
