"""Prometheus metrics of a worker (served on ``SAM3_BATCH_METRICS_PORT`` when set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

IMAGES = Counter("sam3_images_total", "Images finished, by status", ["status"])
INSTANCES = Counter("sam3_instances_total", "Instances (masks) found")
FAILURES = Counter("sam3_failures_total", "Failed images, by reason class", ["reason"])
STAGE_SECONDS = Histogram(
    "sam3_stage_seconds", "Time per image in each stage", ["stage"], buckets=_STAGE_BUCKETS
)
BATCH_SIZE = Histogram("sam3_batch_size", "Images per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
CHUNKS = Counter("sam3_chunks_total", "Chunks handled, by result", ["result"])
TRANSIENT_ERRORS = Counter(
    "sam3_transient_errors_total", "Transient errors per image, by operation (load, model, write, chunk)",
    ["operation"],
)
TASK_RETRIES = Counter("sam3_task_retries_total", "Chunk task retries scheduled after transient errors")
MODEL_LOAD_SECONDS = Gauge("sam3_model_load_seconds", "Time the resident model took to load")
GPU_MEMORY_BYTES = Gauge("sam3_gpu_memory_bytes", "GPU memory", ["kind"])


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
        GPU_MEMORY_BYTES.labels(kind="peak").set(torch.cuda.max_memory_allocated())
