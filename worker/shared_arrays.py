"""How big numpy arrays cross between the worker and its stage processes: in shared memory, not through a pipe.

The stage data types hold plain numpy arrays (masks, RGB pixels). ``install`` teaches multiprocessing's
pickler (the one ``ProcessPoolExecutor`` sends arguments and results with) to hand an array of at least
``SHARED_MIN_BYTES`` over as a torch tensor: torch moves its storage into shared memory and passes a file
descriptor, and the receiver gets a numpy view of that memory. Small arrays, and arrays torch cannot wrap
(read-only, non-native dtypes, negative strides), are pickled as usual. Torch tensors (the model's prepared
pixels) that lie in a pixel slot cross as the slot's number (``worker.pixel_slots``); others take torch's own
shared-memory path, which importing ``torch.multiprocessing`` installs.
"""

from __future__ import annotations

import resource
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.multiprocessing  # registers torch's shared-memory reductions for tensors
from torch.multiprocessing.reductions import reduce_tensor

from sam3_batch.worker.pixel_slots import reduce_slot_tensor

# Below this, a pipe copy costs less than a shared-memory segment (a file descriptor and a mapping).
SHARED_MIN_BYTES = 64 * 1024


def install() -> None:
    """Send big arrays through shared memory from this process on (both sides of a pool call this)."""
    ForkingPickler.register(np.ndarray, _reduce_array)
    ForkingPickler.register(torch.Tensor, _reduce_tensor)
    _allow_many_descriptors()


def _reduce_array(array: npt.NDArray[Any]) -> str | tuple[Any, ...]:
    if array.nbytes < SHARED_MIN_BYTES or not array.flags.writeable:
        return array.__reduce__()
    try:
        tensor = torch.from_numpy(array)
    except (TypeError, ValueError):  # a dtype torch has no tensor for, or negative strides
        return array.__reduce__()
    return (_array_of, (tensor,))


def _reduce_tensor(tensor: torch.Tensor) -> tuple[Any, ...]:
    return reduce_slot_tensor(tensor) or reduce_tensor(tensor)  # type: ignore[no-untyped-call]


def _array_of(tensor: torch.Tensor) -> npt.NDArray[Any]:
    return tensor.numpy()


def _allow_many_descriptors() -> None:
    """Each shared array in flight holds a file descriptor: lift the soft open-file limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
