"""GPU worker: Celery app, chunk task, resident SAM 3 runtime, batching pipeline, output writers."""
