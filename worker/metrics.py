"""Prometheus metrics of a worker (served on ``SAM3_BATCH_METRICS_PORT`` when set)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, Info

_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

IMAGES = Counter("sam3_images_total", "Images finished, by status", ["status"])
INSTANCES = Counter("sam3_instances_total", "Instances (masks) found")
FAILURES = Counter("sam3_failures_total", "Failed images, by reason class", ["reason"])
STAGE_SECONDS = Histogram(
    "sam3_stage_seconds", "Time per image in each stage", ["stage"], buckets=_STAGE_BUCKETS
)
BATCH_IMAGES = Histogram("sam3_batch_images", "Images per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
CHUNKS = Counter("sam3_chunks_total", "Chunks handled, by result", ["result"])
TRANSIENT_ERRORS = Counter(
    "sam3_transient_errors_total", "Transient errors per image, by operation (load, model, write, chunk)",
    ["operation"],
)
TASK_RETRIES = Counter("sam3_task_retries_total", "Chunk task retries scheduled after transient errors")
MODEL_LOAD_SECONDS = Gauge("sam3_model_load_seconds", "Time the resident model took to load")
GPU_MEMORY_BYTES = Gauge("sam3_gpu_memory_bytes", "GPU memory in use now, by kind (allocated, reserved)", ["kind"])
GPU_MEMORY_PEAK_BYTES = Gauge("sam3_gpu_memory_peak_bytes", "Peak GPU memory allocated since the worker started")
DEVICE_FALLBACK_CPU = Gauge(
    "sam3_device_fallback_cpu", "1 when device=auto fell back to the CPU on a machine that shows an NVIDIA GPU"
)
BYTES_READ = Counter("sam3_read_bytes_total", "Input image bytes read")
BYTES_WRITTEN = Counter(
    "sam3_written_bytes_total",
    "Bytes written to the output root, by kind (output: per-image files written by the writers; part: Parquet)",
    ["kind"],
)
LAST_CHUNK_FINISHED = Gauge(
    "sam3_last_chunk_finished_timestamp_seconds", "Unix time the worker last finished a chunk (stall alerts)"
)
CHUNKS_IN_FLIGHT = Gauge("sam3_chunks_in_flight", "Chunks this worker is running now")
QUEUE_DEPTH = Gauge("sam3_queue_chunks", "Chunks waiting on the worker's queue (read at scrape time)")
BUILD_INFO = Info("sam3_build", "Package version, model and resolved model commit of this worker")


def describe_build(version: str, model: str, revision: str | None, commit: str | None) -> None:
    """``sam3_build_info{version, model, revision, commit} 1``."""
    BUILD_INFO.info({"version": version, "model": model, "revision": revision or "", "commit": commit or ""})


def watch_gauges(in_flight: Callable[[], float], queue_depth: Callable[[], float]) -> None:
    """Gauges computed when Prometheus scrapes (no polling thread)."""
    CHUNKS_IN_FLIGHT.set_function(in_flight)
    QUEUE_DEPTH.set_function(queue_depth)


def observe_stage(stage: str, seconds: float) -> None:
    STAGE_SECONDS.labels(stage=stage).observe(seconds)


def count_image(status: str, instances: int = 0, reason_class: str | None = None) -> None:
    IMAGES.labels(status=status).inc()
    if instances:
        INSTANCES.inc(instances)
    if reason_class:
        FAILURES.labels(reason=reason_class).inc()


def record_gpu_memory() -> None:
    """Sample GPU memory (only when CUDA is already initialised: never touch CUDA from here first)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        GPU_MEMORY_BYTES.labels(kind="allocated").set(torch.cuda.memory_allocated())
        GPU_MEMORY_BYTES.labels(kind="reserved").set(torch.cuda.memory_reserved())
        GPU_MEMORY_PEAK_BYTES.set(torch.cuda.max_memory_allocated())
