"""How the model computes: the weights' dtype, an optional autocast, and heads kept in float32 under it.

``autocast-bf16`` keeps the weights in float32 and runs the matrix work in bfloat16 (``torch.autocast``);
the heads whose outputs are boxes and scores (box refinement, presence, query-text scoring) run in
float32 with autocast off, so the last roundings of boxes and scores are float32 ones. A plain
``bfloat16`` cast instead sends boxes and logits through bfloat16 (README: "Running on GPUs").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# The choices of ``SAM3_BATCH_DTYPE`` / ``--dtype`` (also the job spec's ``dtype``).
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST_DTYPES = {"autocast-bf16": torch.bfloat16}
DTYPE_NAMES = ("auto", *WEIGHT_DTYPES, *AUTOCAST_DTYPES)


@dataclass(frozen=True)
class Precision:
    """The weights' dtype and, for autocast modes, the dtype matrix work runs in."""

    name: str
    weights: torch.dtype
    autocast: torch.dtype | None = None

    def compute(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """The context every model call runs in: autocast for autocast modes, else nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


def resolve_precision(dtype: str, device: torch.device) -> Precision:
    """``auto`` is bfloat16 on GPU and float32 on CPU; ``autocast-bf16`` is float32 weights, bf16 compute."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype in AUTOCAST_DTYPES:
        return Precision(dtype, torch.float32, AUTOCAST_DTYPES[dtype])
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return Precision(dtype, WEIGHT_DTYPES[dtype])


def float32_heads(model: Any) -> list[torch.nn.Module]:
    """The SAM 3 modules whose outputs become boxes and scores (transformers' ``Sam3Model`` layout)."""
    decoder = model.detr_decoder
    return [decoder.box_head, decoder.presence_head, decoder.presence_layer_norm, model.dot_product_scoring]


def keep_heads_in_float32(model: Any) -> None:
    """Under autocast, run the box and score heads in float32 with autocast off; outside it, as they are."""
    for module in float32_heads(model):
        if not getattr(module.forward, "keeps_float32", False):  # once: a bench converts one model many times
            module.forward = _in_float32(module.forward)


def _in_float32(forward: Callable[..., Any]) -> Callable[..., Any]:
    def float32_forward(*args: Any, **kwargs: Any) -> Any:
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        if not torch.is_autocast_enabled(device_type):
            return forward(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return forward(*(_float(a) for a in args), **{k: _float(v) for k, v in kwargs.items()})

    float32_forward.keeps_float32 = True  # type: ignore[attr-defined]
    return float32_forward


def _float(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value
