"""What the host-budget bench counts, and how: the stand-in's device work done on this CPU (memoised, kept
apart from the host's), the model stage's time and bytes, the stage pools' per-step CPU, memory peaks."""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import torch

from sam3_batch.contracts.schemas import Thresholds
from sam3_batch.worker.detections import PromptDetections
from sam3_batch.worker.io_stages import LoadedImage, WrittenImage
from sam3_batch.worker.model_input import DeviceNormalizer, PreparedImage
from sam3_batch.worker.runtime import Sam3Runtime
from sam3_batch.worker.stage_pools import StagePool

# Device-side steps, by module and name: memoised by their inputs, their runs' CPU counted as device work.
# Names that do not exist in this tree are skipped (the device-side post-processing has moved between modules:
# sam3_adapter, then device_post).
DEVICE_SIDE_STEPS = (
    ("sam3_batch.worker.sam3_adapter", "_upsample_and_threshold"),
    ("sam3_batch.worker.sam3_adapter", "gather_instances"),
    ("sam3_batch.worker.device_post", "mask_codes"),
    ("sam3_batch.worker.device_post", "pack_bits"),
    ("sam3_batch.worker.device_post", "sigmoid_then_upsample"),
    ("sam3_batch.worker.sam3_adapter", "sigmoid_then_upsample"),
)
# Switches that make a CPU "device" take the path a GPU takes (RLE in torch on the device, not pycocotools).
# Mask work stays on the "device" too: not deferred to the writers, as the product does when the device is the CPU.
GPU_PATH_SWITCHES = (
    ("sam3_batch.worker.device_post", "TORCH_ENCODER_ON_CPU", True),
    ("sam3_batch.worker.device_post", "DEFER_ON_CPU", False),
)
# Where the device's results are copied to the host: every tensor handed to it is counted as device->host bytes.
DEVICE_TO_HOST_FETCHES = (("sam3_batch.worker.device_post", "_fetch"),)
_SMALL = 4096  # elements: a tensor this small is keyed by its values
P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C")


@dataclass
class DeviceWork:
    """CPU this process spends on what a GPU would do (post-processing kernels, normalising pixels)."""

    cpu_s: float = 0.0
    fetched_bytes: int = 0  # device -> host, counted where the runtime fetches its results (if it has such a step)
    memo: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # keeps every result alive: addresses stay unique
    # Storage addresses whose contents never change while they are alive: memoised results, and whatever
    # ``constant`` says (the stand-in's outputs). A tensor in them is keyed by where it is, not by a pass over it.
    stable: set[int] = field(default_factory=set)
    constant: Callable[[torch.Tensor], bool] = lambda _tensor: False

    def key(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        storage = value.untyped_storage().data_ptr()
        if value.dtype == torch.bool or storage in self.stable or self.constant(value):
            return ("at", storage, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if value.numel() <= _SMALL:
            return ("values", tuple(value.shape), value.dtype, tuple(value.flatten().tolist()))
        return ("sum", tuple(value.shape), value.dtype, float(value.float().sum()))

    def remember(self, key: tuple[Any, ...], result: Any) -> Any:
        self.memo[key] = result
        for tensor in result if isinstance(result, tuple) else (result,):
            if isinstance(tensor, torch.Tensor):
                self.stable.add(tensor.untyped_storage().data_ptr())
        return result


def memoised_device_step(fn: Callable[..., Any], work: DeviceWork,
                         key_of: Callable[..., tuple[Any, ...]] | None = None) -> Callable[..., Any]:
    """``fn`` run once per distinct input (the stand-in repeats its masks), its CPU counted as device work.

    The cached result itself is returned (steps only read their inputs), so a later step given it (RLE of
    the upsampled masks, say) recognises it by address instead of reading megabytes to make a key.
    ``key_of``: what makes inputs distinct, from the arguments (default: each argument's ``DeviceWork.key``).
    """
    def wrapped(*args: Any) -> Any:
        start = time.thread_time()  # the lookup too: it stands in for the kernel, which would run on the device
        key = (fn.__name__, *(key_of(*args) if key_of is not None else (work.key(arg) for arg in args)))
        found = work.memo[key] if key in work.memo else work.remember(key, fn(*args))
        work.cpu_s += time.thread_time() - start
        return found
    return wrapped


def _attributes(names: tuple[tuple[str, str], ...]) -> list[tuple[Any, str, Any]]:
    """(module, name, value) of each that exists in this tree."""
    found = []
    for module_name, name in names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            found.append((module, name, getattr(module, name)))
    return found


def counted_fetch(fn: Callable[..., Any], work: DeviceWork) -> Callable[..., Any]:
    def wrapped(*args: Any) -> Any:
        work.fetched_bytes += sum(arg.nbytes for arg in args if isinstance(arg, torch.Tensor))
        return fn(*args)
    return wrapped


@contextmanager
def device_side_accounted(work: DeviceWork) -> Iterator[None]:
    """Make this CPU take a GPU's post-processing path, memoise its device-side steps (normalising pixels
    included) and count their CPU as device work, and the bytes fetched back to the host."""
    patches: list[tuple[Any, str, Any, Any]] = [(module, name, memoised_device_step(fn, work), fn)
               for module, name, fn in _attributes(DEVICE_SIDE_STEPS)]
    patches += [(module, name, counted_fetch(fn, work), fn)
                for module, name, fn in _attributes(DEVICE_TO_HOST_FETCHES)]
    switches = {(m, n): v for m, n, v in GPU_PATH_SWITCHES}
    patches += [(module, name, switches[module.__name__, name], old)
                for module, name, old in _attributes(tuple(switches))]
    # Normalising, run once per batch shape: the stand-in never reads the values of its pixels, and on this CPU
    # the "kernels" would cost about half its budget (stacking the batch stays the host's, and counted).
    normalise = DeviceNormalizer.normalised
    patches.append((DeviceNormalizer, "normalised", memoised_device_step(
        normalise, work, lambda normalizer, batch, dtype: (normalizer, tuple(batch.shape), batch.dtype, dtype)),
        normalise))
    for module, name, new, _old in patches:
        setattr(module, name, new)
    try:
        yield
    finally:
        for module, name, _new, old in patches:
            setattr(module, name, old)


@dataclass
class ModelCounters:
    calls: int = 0
    images: int = 0
    wall_s: float = 0.0
    thread_cpu_s: float = 0.0
    host_to_device_bytes: int = 0
    device_to_host_bytes: int = 0
    instances: int = 0


class AccountedRuntime:
    """``Sam3Runtime`` as the pipeline sees it, counting the model stage's wall, CPU and bytes in and out."""

    def __init__(self, runtime: Sam3Runtime, work: DeviceWork) -> None:
        self.runtime, self.counters, self.work = runtime, ModelCounters(), work
        self.spans: list[tuple[float, float]] = []  # each batch's model part: (start, end), perf_counter seconds
        self.model_id, self.revision = runtime.model_id, runtime.revision

    @property
    def preparer(self) -> Any:
        return self.runtime.preparer

    def segment(self, images: list[PreparedImage], prompts: list[list[str]], thresholds: Thresholds,
                *more: Any) -> list[list[PromptDetections]]:
        """``Sam3Runtime.segment``, counted; ``more``: whatever else the pipeline passes (the mask delivery)."""
        return self.start_segment(images, prompts, thresholds, *more)()

    def stage(self, images: list[PreparedImage]) -> torch.Tensor:
        """``Sam3Runtime.stage``, its CPU counted with the model call's (it is the same thread's work for it)."""
        cpu_start = time.thread_time()
        staged = self.runtime.stage(images)
        self.counters.thread_cpu_s += time.thread_time() - cpu_start
        return staged

    def start_segment(self, images: list[PreparedImage], prompts: list[list[str]], thresholds: Thresholds,
                      *more: Any, **named: Any) -> Callable[[], list[list[PromptDetections]]]:
        """``Sam3Runtime.start_segment``, counted: the model stage's wall is the model's part (the pipeline
        holds the model's turn for it); its CPU, the model's part and the host's part after it."""
        start, cpu_start, fetched = time.perf_counter(), time.thread_time(), self.work.fetched_bytes
        finish = self.runtime.start_segment(images, prompts, thresholds, *more, **named)
        fetched = self.work.fetched_bytes - fetched  # the fetch is in the model's part: no other batch's in it
        counters = self.counters
        end = time.perf_counter()
        counters.wall_s += end - start
        self.spans.append((start, end))
        counters.thread_cpu_s += time.thread_time() - cpu_start
        counters.calls += 1
        counters.images += len(images)
        counters.host_to_device_bytes += sum(image.pixel_values.nbytes for image in images)

        def finished() -> list[list[PromptDetections]]:
            cpu_start = time.thread_time()
            found = finish()
            counters.thread_cpu_s += time.thread_time() - cpu_start
            small = 0  # scores, boxes and masks as the host holds them: where the runtime has no fetch step
            for per_image in found:
                for d in per_image:
                    small += _host_bytes(d)
                    counters.instances += len(d)
            counters.device_to_host_bytes += fetched or small
            return found

        return finished


def _host_bytes(found: PromptDetections) -> int:
    """What of one prompt's detections crossed to the host: every numpy array it holds (masks as the host
    received them, scores, boxes, and whatever encoded form a newer runtime delivers)."""
    total = 0
    for value in vars(found).values():
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif hasattr(value, "__dict__"):
            total += sum(v.nbytes for v in vars(value).values() if isinstance(v, np.ndarray))
    return total


class CountingPool(StagePool[C]):
    """A stage pool that keeps the per-step CPU times its load and write steps report."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_cpu_ms: dict[str, float] = {}
        self.results = 0
        self._count_lock = threading.Lock()

    def start(self, fn: Callable[Concatenate[C, P], R], *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        future = super().start(fn, *args, **kwargs)
        future.add_done_callback(self._collect)
        return future

    def _collect(self, future: Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        steps = result.cpu_ms if isinstance(result, LoadedImage) else (
            {"encode + upload": result.cpu_ms} if isinstance(result, WrittenImage) else {})
        with self._count_lock:
            self.results += 1
            for step, ms in steps.items():
                self.step_cpu_ms[step] = self.step_cpu_ms.get(step, 0.0) + ms


def vm_kib(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pids: list[int]) -> None:
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        except OSError:
            continue


class MemorySampler:
    """Peak shared memory mapped by the worker and its stage processes (RssShmem, summed), sampled."""

    def __init__(self, pids: Callable[[], list[int]], period_s: float = 0.25) -> None:
        self.pids, self.period_s, self.peak_kib = pids, period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hb-memory", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak_kib = max(self.peak_kib, sum(vm_kib(pid, "RssShmem") for pid in self.pids()))
