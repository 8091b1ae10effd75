"""The worker process's context, filled once at start-up: the resident model, storage, job store, stage pools."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from sam3_batch.contracts.errors import ModelLoadError, reason_of
from sam3_batch.contracts.jobstate import JobStore, RedisJobStore
from sam3_batch.contracts.redact import display_uri
from sam3_batch.contracts.schemas import JobSpec
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker import metrics
from sam3_batch.worker.decode import limit_pillow_pixels
from sam3_batch.worker.pipeline import ChunkContext, SegmentationRuntime

log = logging.getLogger(__name__)


def load_runtime(settings: Settings) -> SegmentationRuntime:
    """Load the resident SAM 3 model named by settings (``tiny-random`` builds one offline)."""
    from transformers.utils import logging as hf_logging

    from sam3_batch.worker.device_check import check_device
    from sam3_batch.worker.runtime import Sam3Runtime
    from sam3_batch.worker.torch_env import prepare_torch

    prepare_torch(settings)  # allocator and thread settings before anything touches CUDA
    check_device(settings)  # before the load: a worker that must not run on the CPU stops at once
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # progress bars are log noise
    start = time.perf_counter()
    try:
        runtime = Sam3Runtime.load(
            settings.model, settings.model_revision, device=settings.device, dtype=settings.dtype,
            compile=settings.compile,
        )
    except Exception as exc:  # a missing path, a corrupt checkpoint, missing weights, a gated hub id...
        raise ModelLoadError(f"cannot load model {display_uri(settings.model)}: {reason_of(exc)}") from exc
    metrics.MODEL_LOAD_SECONDS.set(time.perf_counter() - start)
    log.info("model %s loaded in %.1fs", settings.model, time.perf_counter() - start)
    return runtime


def warm_up_compiled(context: ChunkContext) -> None:
    """With compile on, run every batch size once now, before the worker takes work (no compile mid-chunk)."""
    warm_up = getattr(context.runtime, "warm_up", None)
    if not context.settings.compile or not callable(warm_up):
        return
    start = time.perf_counter()
    sizes = warm_up(context.settings.batch_size)
    log.info("torch.compile warm-up of batch sizes %s took %.1fs", sizes, time.perf_counter() - start)


@dataclass
class WorkerContext:
    """Everything a chunk task needs, built once per worker process."""

    settings: Settings
    store: JobStore
    chunk_context: ChunkContext
    _specs: dict[str, JobSpec] = field(default_factory=dict)

    def spec(self, job_id: str) -> JobSpec:
        """The job's spec, fetched from the store once and cached (specs never change)."""
        if job_id not in self._specs:
            if len(self._specs) > 256:
                self._specs.clear()
            self._specs[job_id] = self.store.spec(job_id)
        return self._specs[job_id]


_context: WorkerContext | None = None
_lock = threading.Lock()


def init_worker_context(settings: Settings, runtime: SegmentationRuntime | None = None) -> WorkerContext:
    """Build the process-wide worker context (loads the model unless one is given)."""
    global _context
    with _lock:
        if _context is None:
            limit_pillow_pixels(settings.max_image_pixels)  # this process decodes when loaders are threads
            storage = Storage(settings)
            store = RedisJobStore(settings.state_redis_url())
            runtime = runtime or load_runtime(settings)
            context = ChunkContext.create(runtime, storage, settings)
            warm_up_compiled(context)
            _context = WorkerContext(settings, store, context)
        return _context


def worker_context() -> WorkerContext:
    """The context built by ``init_worker_context``; a task running without it is a set-up bug."""
    if _context is None:
        raise RuntimeError("worker context is not initialised: start workers with `sam3-batch worker`")
    return _context
