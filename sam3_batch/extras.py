"""The optional GPU stack: the control plane runs without it, `run` and `worker` need it."""

from __future__ import annotations

from importlib.util import find_spec

from sam3_batch.contracts.errors import Sam3BatchError

# Import name -> distribution of the `worker` extra in pyproject.toml (the model, decoding, mask encoding).
WORKER_EXTRA_MODULES = {
    "torch": "torch", "torchvision": "torchvision", "transformers": "transformers", "PIL": "pillow",
    "pycocotools": "pycocotools",
}
INSTALL_HINT = "pip install 'sam3-batch[worker]'"


class MissingExtraError(Sam3BatchError):
    """A command needs an install extra that is not installed."""


def missing_worker_modules() -> list[str]:
    """The distributions of the worker extra whose modules cannot be found in this environment."""
    return [dist for module, dist in WORKER_EXTRA_MODULES.items() if find_spec(module) is None]


def require_worker_extra() -> None:
    """Raise one readable error (not an ImportError traceback) when the GPU stack is not installed."""
    missing = missing_worker_modules()
    if missing:
        raise MissingExtraError(
            f"this command needs the worker extra ({', '.join(missing)} not installed): {INSTALL_HINT}"
        )
