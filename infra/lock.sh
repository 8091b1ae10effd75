#!/usr/bin/env bash
# Regenerates the lock files the images install from (infra/requirements/*.lock), from pyproject.toml's
# ranges, for the images' Python (Ubuntu 24.04: CPython 3.12, x86_64 glibc), with hashes, from PyPI only.
#
#   python3 -m pip install uv && bash infra/lock.sh
#
# torch and torchvision are NOT in the worker lock: the image installs them in their own step, pinned to an
# exact CUDA build (+cu128) from the PyTorch index and from that index alone (infra/worker.Dockerfile), so
# PyPI's torch (another CUDA build) can never be picked. The CUDA runtime wheels (nvidia-*, triton) that
# build pins exactly come with it from the same index; they are left out here too. Everything else torch
# needs (sympy, networkx, jinja2, ...) is locked here, from PyPI, with hashes.
set -euo pipefail
cd "$(dirname "$0")/.."

common=(--python-version 3.12 --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple
        --no-build --quiet)
header="bash infra/lock.sh"

# The control plane (producer, Flower, bucket set-up): no GPU stack at all.
uv pip compile pyproject.toml infra/requirements/build.in --extra flower "${common[@]}" --generate-hashes \
    --custom-compile-command "$header" -o infra/requirements/control.lock

# The worker: resolve with torch (so its other dependencies get versions it accepts), emit without the
# packages the PyTorch-index step installs.
resolved=$(uv pip compile pyproject.toml --extra worker "${common[@]}" --no-header --no-annotate)
skip=()
for name in $(grep -oE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' <<<"$resolved" | tr -d '='); do
    skip+=(--no-emit-package "$name")
done
uv pip compile pyproject.toml infra/requirements/build.in --extra worker "${common[@]}" --generate-hashes "${skip[@]}" \
    --custom-compile-command "$header" -o infra/requirements/worker.lock
