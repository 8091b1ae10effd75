"""The worker's Celery app: the shared queue configuration plus the chunk task module."""

from __future__ import annotations

from celery import Celery

from sam3_batch.contracts.queue import celery_config
from sam3_batch.contracts.settings import Settings

app = Celery("sam3_batch", include=["sam3_batch.worker.tasks"])


def configure_app(settings: Settings) -> Celery:
    """Configure the module-level app from settings (once, at the entry point) and return it."""
    app.conf.update(celery_config(settings))
    return app
