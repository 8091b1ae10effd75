"""Where planned chunks go: onto the Celery queue (with backpressure), or straight to a local processor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from celery import Celery

from sam3_batch.contracts.queue import TASK_NAME
from sam3_batch.contracts.schemas import ChunkMessage
from sam3_batch.producer.backpressure import Backpressure

_RETRY_POLICY = {"max_retries": 30, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 5.0}


class Dispatcher(Protocol):
    """Takes chunk messages; ``wait_for_room`` blocks while the consumer side is full."""

    def wait_for_room(self, should_stop: Callable[[], bool]) -> None: ...

    def send(self, chunk: ChunkMessage) -> None: ...


def task_message(chunk: ChunkMessage) -> tuple[list[Any], dict[str, str]]:
    """A Celery protocol-2 task message for one chunk, as (body, headers), with only what a worker reads.

    ``app.send_task`` adds ~1 KB of headers and properties per message (origin, root id, reprs, stamps,
    a reply queue ...), most of Redis's bytes per queued image at 32 images per chunk. A Celery worker
    needs just ``task`` and ``id`` (celery.worker.request.Request); everything else has a default there.
    The chunk id is the task id: it names the chunk in Flower and in the worker's logs.
    """
    body = chunk.model_dump(mode="json", exclude_defaults=True)
    return [[body], {}, {}], {"task": TASK_NAME, "id": chunk.chunk_id}


class CeleryDispatcher:
    """Publishes each chunk as one compact JSON Celery task message (zlib-compressed body) on the job queue."""

    def __init__(self, app: Celery, queue: str, backpressure: Backpressure) -> None:
        self.app, self.queue, self.backpressure = app, queue, backpressure

    def wait_for_room(self, should_stop: Callable[[], bool]) -> None:
        self.backpressure.wait_for_room(should_stop)

    def send(self, chunk: ChunkMessage) -> None:
        body, headers = task_message(chunk)
        with self.app.producer_or_acquire() as producer:
            # The default exchange routes by queue name: on Redis the message goes straight onto the LIST
            # named after the queue, as Celery's own publish does. kombu retries through a broker reconnect.
            producer.publish(
                body, exchange="", routing_key=self.queue, headers=headers, serializer="json",
                compression="zlib", delivery_mode=2, retry=True, retry_policy=_RETRY_POLICY,
            )
