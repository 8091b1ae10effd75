"""Redis bytes per queued image for each way of queueing a chunk (a few seconds).

    python -m bench.message_size                  # chunks of 32 S3-style URIs
    python -m bench.message_size --chunk-size 128

Each option queues the same 200 chunks on a private Redis; the figure is MEMORY USAGE of the queue LIST
over the images queued, plus the size of one message. JSON only: pickle is never an option.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import redis

from bench.redis_probe import PrivateRedis
from sam3_batch.contracts.queue import TASK_NAME, make_celery
from sam3_batch.contracts.schemas import ChunkMessage, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.producer.backpressure import Backpressure
from sam3_batch.producer.dispatch import _RETRY_POLICY, CeleryDispatcher, task_message

QUEUE = "sam3-message-size"
CHUNKS = 200
JOB_ID = "20261129-160000-abc123"


def chunks(chunk_size: int) -> list[ChunkMessage]:
    """Chunks of S3-style keys, 1,000 per folder, as a sharded bucket lists them."""
    out = []
    for seq in range(CHUNKS):
        items = [WorkItem(uri=f"s3://lake/images/{n // 1000:05d}/{n:08d}.jpg", out_key=f"{n // 1000:05d}/{n:08d}.jpg")
                 for n in range(seq * chunk_size, (seq + 1) * chunk_size)]
        out.append(ChunkMessage(job_id=JOB_ID, chunk_id=f"{JOB_ID}-g0-{seq:09d}", items=items))
    return out


def _send_task(settings: Settings, compression: str | None) -> Callable[[ChunkMessage], None]:
    app = make_celery(settings)
    app.conf.task_compression = compression

    def send(chunk: ChunkMessage) -> None:
        app.send_task(TASK_NAME, args=[chunk.model_dump(mode="json", exclude_defaults=True)], queue=QUEUE,
                      argsrepr=f"[chunk {chunk.chunk_id}: {len(chunk.items)} images]")
    return send


def _compact(settings: Settings, compression: str | None) -> Callable[[ChunkMessage], None]:
    app = make_celery(settings)

    def send(chunk: ChunkMessage) -> None:
        body, headers = task_message(chunk)
        with app.producer_or_acquire() as producer:
            producer.publish(body, exchange="", routing_key=QUEUE, headers=headers, serializer="json",
                             compression=compression, delivery_mode=2, retry=True, retry_policy=_RETRY_POLICY)
    return send


def _product(settings: Settings) -> Callable[[ChunkMessage], None]:
    dispatcher = CeleryDispatcher(make_celery(settings), QUEUE, Backpressure(lambda: 0, high=10, low=1))
    return dispatcher.send


def measure(url: str, chunk_size: int) -> list[tuple[str, int, float]]:
    settings = Settings(broker_url=url, queue=QUEUE)
    client = redis.Redis.from_url(url)
    options: list[tuple[str, Callable[[ChunkMessage], None]]] = [
        ("Celery send_task, JSON, no compression", _send_task(settings, None)),
        ("Celery send_task, JSON, zlib (the previous default)", _send_task(settings, "zlib")),
        ("compact envelope, JSON, no compression", _compact(settings, None)),
        ("compact envelope, JSON, zlib", _compact(settings, "zlib")),
        ("the product's CeleryDispatcher (now)", _product(settings)),
    ]
    rows = []
    planned = chunks(chunk_size)
    for label, send in options:
        client.delete(QUEUE)
        for chunk in planned:
            send(chunk)
        one = len(client.lindex(QUEUE, 0) or b"")
        stored = int(client.memory_usage(QUEUE, samples=0) or 0)
        rows.append((label, one, stored / (CHUNKS * chunk_size)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=Path("/dev/shm/sam3-message-size"))
    args = parser.parse_args(argv)
    with PrivateRedis(args.work_dir) as server:
        rows = measure(server.url, args.chunk_size)
    print(f"queued chunk messages, {args.chunk_size} S3-style URIs per chunk, {CHUNKS} chunks per option")
    print("| message format | bytes per message | Redis bytes per queued image |")
    print("| --- | ---: | ---: |")
    for label, one, per_image in rows:
        print(f"| {label} | {one:,} | {per_image:.1f} |")


if __name__ == "__main__":
    main()
