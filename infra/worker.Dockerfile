# The GPU worker image. Built from the repository root (the build context is `.`):
#
#   docker build -f infra/worker.Dockerfile -t sam3-batch-worker .
#
# The producer, Flower and the bucket set-up use the CPU image, infra/control.Dockerfile (no torch at all).
#
# Reproducible: everything but torch comes from infra/requirements/worker.lock (PyPI, exact versions and
# hashes; `bash infra/lock.sh` regenerates it). torch and torchvision are ONE CUDA build, pinned exactly
# (+cu128) and taken from the PyTorch index in a step of their own with that index alone (never an
# --extra-index-url for every dependency: a second index could then serve any package, and pip could
# silently pick another CUDA build). That step brings the CUDA runtime wheels (nvidia-*, triton) that
# torch itself pins exactly; check_torch_build.py fails the build if it brought anything else, if the
# versions differ, or if torch is not built for CUDA 12.8.
#
# Driver: the CUDA base only carries the driver hooks and NVIDIA_* variables; the CUDA runtime and cuDNN come
# with the torch wheels. CUDA 12.8 needs an NVIDIA driver >= 570 on the host. To change the CUDA build, change
# BASE_IMAGE, TORCH_CUDA and TORCH_CUDA_VERSION together (e.g. 12.6: nvidia/cuda:12.6.3-base-ubuntu24.04,
# cu126, 12.6, driver >= 560); if the PyTorch index has no such build of TORCH_VERSION the build fails.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------
# Build stage: pip and the venv; nothing here compiles (the lock holds wheels only).
FROM ${BASE_IMAGE} AS build

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_CUDA=cu128
ARG TORCH_CUDA_VERSION=12.8

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu's Python is "externally managed" (PEP 668): everything goes into one venv that the runtime copies.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, from the lock alone, so a code change does not reinstall torch (several GB).
WORKDIR /src
COPY infra/requirements/worker.lock infra/check_torch_build.py ./infra/
RUN pip install --require-hashes --no-deps --only-binary :all: -r infra/requirements/worker.lock

# torch + torchvision: one CUDA build, from the PyTorch index only (see the header).
RUN python3 infra/check_torch_build.py snapshot /tmp/before-torch.json \
    && pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" --only-binary :all: \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}" "torchvision==${TORCHVISION_VERSION}+${TORCH_CUDA}" \
    && python3 infra/check_torch_build.py verify /tmp/before-torch.json --cuda "${TORCH_CUDA_VERSION}" \
        --torch "${TORCH_VERSION}+${TORCH_CUDA}" --torchvision "${TORCHVISION_VERSION}+${TORCH_CUDA}"

COPY pyproject.toml README.md ./
COPY worker ./worker
COPY producer ./producer
COPY sam3_batch ./sam3_batch
# No build isolation: the build backend (setuptools) is the locked one, not whatever PyPI serves today.
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && python3 -c "import torch; assert torch.version.cuda == '${TORCH_CUDA_VERSION}', torch.version.cuda" \
    && sam3-batch --help > /dev/null

# ---------------------------------------------------------------------------------------------------------
# Runtime stage: Python, the venv, tini; no compilers.
FROM ${BASE_IMAGE} AS runtime

# HF_HOME is the model cache (facebook/sam3 is about 3.4 GB): a volume there survives restarts.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HF_HOME=/models

# tini is PID 1: it forwards SIGTERM to the worker, whose warm shutdown finishes the chunk in hand.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric UID so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --gid 10001 sam3 \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/sam3 --shell /usr/sbin/nologin sam3 \
    && mkdir -p /models \
    && chown 10001:10001 /models

COPY --from=build /opt/venv /opt/venv

# Declared after the chown: a fresh named volume starts with this ownership, so the non-root user can write.
VOLUME ["/models"]

USER 10001:10001
WORKDIR /home/sam3

# 9300: Prometheus metrics of the worker (SAM3_BATCH_METRICS_PORT).
EXPOSE 9300

ENTRYPOINT ["/usr/bin/tini", "--", "sam3-batch"]
# One process per GPU: the model stays resident and CUDA is never touched in a fork. Two chunks in flight
# (threads pool) keep the GPU busy across chunk boundaries: bench/RESULTS.md, "Pipeline".
CMD ["worker", "--concurrency", "2", "--pool", "threads"]
