# The control-plane image: producer (`sam3-batch submit`), Flower and the bucket set-up. CPU only, and
# without the GPU stack: no torch, transformers, pillow or pycocotools (the `worker` extra), so it is a small
# fraction of the worker image and starts in well under a second. Built from the repository root:
#
#   docker build -f infra/control.Dockerfile -t sam3-batch-control .
#
# Reproducible: everything comes from infra/requirements/control.lock (PyPI, exact versions and hashes;
# `bash infra/lock.sh` regenerates it).

ARG BASE_IMAGE=ubuntu:24.04

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY infra/requirements/control.lock ./infra/requirements/
RUN pip install --require-hashes --no-deps --only-binary :all: -r infra/requirements/control.lock

COPY pyproject.toml README.md ./
COPY worker ./worker
COPY producer ./producer
COPY sam3_batch ./sam3_batch
# No build isolation: the build backend (setuptools) is the locked one. The last check keeps the GPU
# stack out of this image for good.
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && sam3-batch --help > /dev/null \
    && python3 -c "from importlib.util import find_spec as f; assert not any(f(m) for m in ('torch', 'transformers', 'PIL', 'pycocotools'))"

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv

# tini is PID 1: it forwards SIGTERM, so an interrupted `submit --wait` stops cleanly (resume it later).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# The same numeric non-root UID as the worker image (Kubernetes' runAsNonRoot checks it without a passwd).
RUN groupadd --gid 10001 sam3 \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/sam3 --shell /usr/sbin/nologin sam3

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/sam3

# 5555: Flower, when this image runs it (`celery flower`).
EXPOSE 5555

ENTRYPOINT ["/usr/bin/tini", "--", "sam3-batch"]
CMD ["--help"]
