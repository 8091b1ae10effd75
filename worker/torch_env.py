"""What the model's process sets up before torch touches the GPU: allocator, compile caches, CPU threads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from sam3_batch.contracts.cpus import usable_cpus
from sam3_batch.contracts.settings import Settings

log = logging.getLogger(__name__)

# Batches of varying sizes (last batch of a chunk, OOM splits, row slices) fragment the caching allocator;
# expandable segments let it grow blocks in place instead of reserving new ones.
ALLOCATOR_CONFIG = "expandable_segments:True"
GPU_TORCH_THREADS = 4  # the model's process only feeds the GPU: more threads just compete with the loaders


def prepare_torch(settings: Settings) -> None:
    """Allocator config, compile cache folders and CPU threads; call before the model loads."""
    _set_allocator_config()
    _set_compile_caches(settings.compile_cache_dir)
    threads = settings.torch_threads or _default_threads(settings.device)
    if threads:
        torch.set_num_threads(threads)
    log.debug("torch: %d CPU threads, allocator %s, compile caches in %s", torch.get_num_threads(),
             os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"),
             os.environ.get("TORCHINDUCTOR_CACHE_DIR"))


def _set_allocator_config() -> None:
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return  # the operator's choice wins
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        log.warning("CUDA was initialised before the worker could set PYTORCH_CUDA_ALLOC_CONF=%s", ALLOCATOR_CONFIG)
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_CONFIG


def _set_compile_caches(cache_dir: str | None) -> None:
    """Inductor's and Triton's caches on the model volume, so a restarted pod does not compile again."""
    from huggingface_hub import constants

    root = Path(cache_dir) if cache_dir else Path(constants.HF_HOME) / "torch-compile"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))


def _default_threads(device: str) -> int:
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return min(GPU_TORCH_THREADS, usable_cpus()) if on_gpu else 0
