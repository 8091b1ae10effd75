# The sam3-batch image. Built from the repository root (the build context is `.`):
#
#   GPU worker (default):
#     docker build -f infra/worker.Dockerfile -t sam3-batch:gpu .
#   CPU image for the producer, Flower and bucket set-up (about 1/5 of the size, no CUDA libraries):
#     docker build -f infra/worker.Dockerfile -t sam3-batch:cpu \
#       --build-arg BASE_IMAGE=ubuntu:24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The CUDA base only carries the driver hooks and NVIDIA_* variables; the CUDA runtime and cuDNN come with
# the torch wheels. CUDA 12.8 needs an NVIDIA driver >= 570 on the host; for an older driver build with
# BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04 and TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------
# Build stage: compilers live here only (pycocotools builds from source where no wheel fits).
FROM ${BASE_IMAGE} AS build

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG EXTRAS=flower

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu's Python is "externally managed" (PEP 668): everything goes into one venv that the runtime copies.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, from pyproject alone, so a code change does not reinstall torch (several GB).
# --extra-index-url: the PyTorch index serves torch+cu128 (or +cpu), whose local version sorts above
# the plain PyPI wheel, so the pins in pyproject.toml still decide the version.
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c "import tomllib, sys; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in sys.argv[1].split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
    "${EXTRAS}" > /tmp/requirements.txt \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt

COPY README.md ./
COPY contracts ./contracts
COPY worker ./worker
COPY producer ./producer
COPY sam3_batch ./sam3_batch
RUN pip install --no-deps . && sam3-batch --help > /dev/null

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

# 9300: Prometheus metrics of the worker (SAM3_BATCH_METRICS_PORT); 5555: Flower, when this image runs it.
EXPOSE 9300 5555

ENTRYPOINT ["/usr/bin/tini", "--", "sam3-batch"]
# One process per GPU: the model stays resident and CUDA is never touched in a fork. Two chunks in flight
# (threads pool) keep the GPU busy across chunk boundaries: bench/RESULTS.md, "Pipeline".
CMD ["worker", "--concurrency", "2", "--pool", "threads"]
