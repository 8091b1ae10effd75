"""Did the worker get the GPU it was meant to have? Warn on a silent CPU fallback; refuse when told to.

`device=auto` falls back to the CPU whenever torch sees no CUDA device, which on a GPU machine means a
driver too old for the CUDA build in the image, or a container started without the GPU: the job would then
run, hundreds of times slower, without saying why.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sam3_batch.contracts.errors import Sam3BatchError
from sam3_batch.contracts.settings import Settings
from sam3_batch.worker import metrics
from sam3_batch.worker.runtime import resolve_device

log = logging.getLogger(__name__)
_NO_DEVICES = {"", "void", "none"}  # NVIDIA_VISIBLE_DEVICES values that mean "no GPU" to the NVIDIA runtime


class GpuRequiredError(Sam3BatchError):
    """SAM3_BATCH_REQUIRE_GPU is set and no GPU is usable."""


def gpu_signs(settings: Settings, dev_dir: Path = Path("/dev")) -> list[str]:
    """What says this machine has an NVIDIA GPU: NVIDIA_VISIBLE_DEVICES and /dev/nvidiaN device files."""
    signs = sorted(str(path) for path in dev_dir.glob("nvidia[0-9]*"))
    visible = settings.nvidia_visible_devices
    if visible is not None and visible.strip().lower() not in _NO_DEVICES:
        signs.insert(0, f"NVIDIA_VISIBLE_DEVICES={visible}")
    return signs


def _torch_build() -> str:
    return f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'})"


def check_device(settings: Settings, dev_dir: Path = Path("/dev")) -> str:
    """The device the model will use; raises GpuRequiredError or warns (and counts) as described above."""
    device = resolve_device(settings.device)
    usable = device.type == "cuda" and torch.cuda.is_available()
    signs = gpu_signs(settings, dev_dir)
    if settings.require_gpu and not usable:
        seen = f"; this machine shows {', '.join(signs)}" if signs else ""
        raise GpuRequiredError(
            f"SAM3_BATCH_REQUIRE_GPU=true but no GPU is usable: device {settings.device!r} resolves to "
            f"{device.type} and {_torch_build()} sees {torch.cuda.device_count()} CUDA devices{seen}"
        )
    fell_back = settings.device == "auto" and device.type == "cpu" and bool(signs)
    metrics.DEVICE_FALLBACK_CPU.set(1 if fell_back else 0)
    if fell_back:
        log.warning(
            "device auto fell back to the CPU although this machine shows an NVIDIA GPU (%s): %s cannot use "
            "it; check the driver (nvidia-smi) against that CUDA build. SAM3_BATCH_REQUIRE_GPU=true makes the "
            "worker refuse to start instead", ", ".join(signs), _torch_build(),
        )
    return str(device)
