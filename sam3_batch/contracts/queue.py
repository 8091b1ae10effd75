"""The queue contract both sides share: task name and Celery configuration (see DESIGN.md)."""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery

from sam3_batch.contracts.settings import Settings

TASK_NAME = "sam3.process_chunk"


def _ssl_options(url: str) -> dict[str, Any] | None:
    # rediss:// needs explicit options in Celery; verify certificates by default.
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED} if url.startswith("rediss://") else None


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for a broker and queue taken from settings."""
    broker = settings.broker_url.get_secret_value()
    return {
        "broker_url": broker,
        "broker_use_ssl": _ssl_options(broker),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # keep reconnecting through a Redis restart
        # visibility_timeout: an unacked chunk is redelivered after this; keep chunks far shorter.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        # Pickle over a network broker executes code: accept and produce JSON only.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_compression": "zlib",
        "task_ignore_result": True,  # results go to object storage, not a result backend
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        "task_routes": {TASK_NAME: {"queue": settings.queue}},
        "task_create_missing_queues": True,
        "worker_proc_alive_timeout": 900,  # a prefork child loads the model in worker_process_init
        "worker_send_task_events": True,  # Flower
        # No task-sent events: one extra publish per chunk on the producer's hot path; Flower still
        # sees received/started/succeeded from the workers.
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def make_celery(settings: Settings, name: str = "sam3_batch", include: list[str] | None = None) -> Celery:
    """A Celery app configured from settings (the producer sends with it; the worker adds its task)."""
    app = Celery(name, include=include or [])
    app.conf.update(celery_config(settings))
    return app
