"""Shared-memory slots for the 8-bit pixels loader processes hand to the model, made once and reused.

A tensor that crosses processes the usual way (torch's shared-memory reduction) is copied into a new
shared-memory segment whose every page is first touched in the loader and again in the worker, and its file
descriptor is passed over a socket: measured ~7 ms of loader CPU and ~1 ms of the worker's per 3 MB image on
top of the copy (bench/RESULTS.md, "Host budget"). Here the worker makes ``count`` slots of one model input
each before its loader processes start; a loader resizes straight into a free slot (``take``; or copies
pixels made elsewhere into one: ``hold``) and only the slot's number crosses. In the worker, the tensor of a
slot lends the slot for as long as any tensor viewing it is alive: when the last view is gone the slot is free
again.

When every slot is lent (more images in flight than slots) or the pixels do not fit, the image crosses the
usual way: slots only ever save work. A loader that dies between taking a slot and handing it over leaves the
slot taken for the life of the worker (it is then one slot fewer).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import uuid
import weakref
from dataclasses import dataclass, field
from multiprocessing.synchronize import Lock
from typing import Any

import numpy as np
import torch

TAKE_TIMEOUT_S = 0.2  # a live taker holds the lock for microseconds

# Slots of each set by its token, in each process that has unpickled (loaders) or made (the worker) it; a set
# lives as long as its owner (the loader pool's setup) or a tensor lent from it.
_SETS: weakref.WeakValueDictionary[str, PixelSlots] = weakref.WeakValueDictionary()


@dataclass(eq=False)
class PixelSlots:
    """``count`` slots of ``slot_bytes`` each in shared memory, and which of them are lent."""

    memory: torch.Tensor  # (count, slot_bytes) uint8, shared
    lent: torch.Tensor  # (count,) uint8, shared: 1 while a slot holds pixels on their way or in use
    lock: Lock
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    owner_pid: int = field(default_factory=os.getpid)  # the worker process, which lends the slots
    lock_lost: bool = False  # in a loader: a taker died holding the lock; this process stops using slots

    @classmethod
    def create(cls, count: int, slot_bytes: int) -> PixelSlots:
        """In the worker, before its loader processes start (they receive the slots with their setup)."""
        context = multiprocessing.get_context("forkserver")
        lent = _shared_bytes(count)
        lent.zero_()
        slots = cls(_shared_bytes(count * slot_bytes).view(count, slot_bytes), lent, context.Lock())
        _SETS[slots.token] = slots
        return slots

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _SETS.setdefault(self.token, self)

    @property
    def free(self) -> int:
        return int((self.lent == 0).sum())

    def hold(self, pixels: torch.Tensor) -> torch.Tensor:
        """In a loader: ``pixels`` copied into a free slot (same shape and memory layout), or ``pixels`` as they
        are when no slot is free or they do not fit. The copy crosses to the worker as the slot's number."""
        if pixels.dtype != torch.uint8 or pixels.nbytes > self.memory.shape[1] or not _dense(pixels):
            return pixels
        index = self._take()
        if index is None:
            return pixels
        target = _in_layout_of(pixels, self.memory[index])
        target.copy_(pixels)
        return target

    def take(self, shape_chw: tuple[int, int, int]) -> torch.Tensor | None:
        """In a loader: a free slot as a uint8 (C, H, W) tensor laid out H x W x C in memory (what a resize of
        pixels in that layout writes), to be filled in place; None when none is free or the shape does not fit.
        It crosses to the worker as the slot's number, as ``hold``'s copy does; ``give_back`` one that will not."""
        channels, height, width = shape_chw
        if channels * height * width > self.memory.shape[1]:
            return None
        index = self._take()
        if index is None:
            return None
        return self.memory[index][: channels * height * width].view(height, width, channels).permute(2, 0, 1)

    def give_back(self, tensor: torch.Tensor) -> None:
        """In a loader: the slot ``tensor`` lies in is free again (it was taken, and will not cross after all)."""
        index = self.slot_of(tensor)
        if index is not None:
            self.release(index)

    def _take(self) -> int | None:
        # Only takers (loaders) lock, for microseconds: one killed while holding the lock costs the others a
        # timeout each, then the usual way. The worker never waits on it: releasing is one byte written.
        if self.lock_lost or not self.lock.acquire(timeout=TAKE_TIMEOUT_S):
            self.lock_lost = True
            return None
        try:
            free = (self.lent == 0).nonzero()
            if not len(free):
                return None
            index = int(free[0])
            self.lent[index] = 1
            return index
        finally:
            self.lock.release()

    def release(self, index: int) -> None:
        self.lent[index] = 0

    def slot_of(self, tensor: torch.Tensor) -> int | None:
        """The slot ``tensor`` lies in, if it lies in one of these (a loader's copy, or a tensor lent from it)."""
        start = tensor.data_ptr() - self.memory.data_ptr()
        if not 0 <= start < self.memory.nbytes:
            return None
        return start // self.memory.shape[1]

    def lend(self, index: int, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
        """In the worker: a tensor viewing slot ``index``, which stays lent while any view of it is alive."""
        flat = torch.from_numpy(np.asarray(_Lease(self, index)))
        return flat.as_strided(shape, stride, offset)


class _Lease:
    """One slot's memory as numpy sees it; its end (the last tensor over it freed) frees the slot."""

    def __init__(self, slots: PixelSlots, index: int) -> None:
        self.slots, self.index = slots, index
        size = slots.memory.shape[1]
        self.__array_interface__ = {
            "data": (slots.memory.data_ptr() + index * size, False), "shape": (size,), "typestr": "|u1",
            "version": 3,
        }

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the memory may be gone, and whoever would wait
            self.slots.release(self.index)


def _shared_bytes(size: int) -> torch.Tensor:
    """Bytes made in shared memory directly: no page is touched (made resident) before it is written to."""
    storage = torch.UntypedStorage._new_shared(size)  # type: ignore[no-untyped-call]
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _dense(pixels: torch.Tensor) -> bool:
    return pixels.is_contiguous() or (pixels.dim() == 3 and pixels.permute(1, 2, 0).is_contiguous())


def _in_layout_of(pixels: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """A view of the start of ``slot`` shaped and laid out in memory as ``pixels`` (so copying is a memcpy)."""
    if pixels.is_contiguous():
        return slot[: pixels.numel()].view(pixels.shape)
    channels, height, width = pixels.shape
    return slot[: pixels.numel()].view(height, width, channels).permute(2, 0, 1)


def reduce_slot_tensor(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """How a tensor a loader put in a slot crosses to the worker: as the slot's number (``None``: it lies in
    none). In the worker itself, a lent tensor crosses as any shared tensor does."""
    for slots in _SETS.values():
        if slots.owner_pid == os.getpid():
            continue
        index = slots.slot_of(tensor)
        if index is not None:
            offset = tensor.data_ptr() - slots.memory.data_ptr() - index * slots.memory.shape[1]
            return (_lent, (slots.token, index, offset, tuple(tensor.shape), tuple(tensor.stride())))
    return None


def _lent(token: str, index: int, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    slots = _SETS.get(token)
    if slots is None:
        raise RuntimeError("pixels in a shared slot reached a process that does not hold the slots")
    return slots.lend(index, offset, shape, stride)
