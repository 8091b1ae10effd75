"""sam3-batch: the command line, the embedded (single-process) runner, and a small Python API.

``segment``, ``Segmenter``, ``read_results`` and ``Result`` are loaded on first use, so that importing
``sam3_batch`` (and every control-plane command) stays free of torch, transformers and Pillow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sam3_batch.api import Segmenter, segment
    from sam3_batch.results import Result, read_results

__all__ = ["Result", "Segmenter", "read_results", "segment"]
_LAZY = {"segment": "sam3_batch.api", "Segmenter": "sam3_batch.api",
         "read_results": "sam3_batch.results", "Result": "sam3_batch.results"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sam3_batch' has no attribute {name!r}")
