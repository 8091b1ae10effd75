"""Ten million listed images through the real producer and Redis, drained at a fixed rate: is memory flat?

    python -m bench.long_run                       # 10,000,000 images, drained at 12,000 images/s (about 14 minutes)
    python -m bench.long_run --images 200000 --png /tmp/x.png   # a short try

What runs: the product's producer (``run_producer``: plan -> backpressure -> compact Celery message ->
register with checkpoint) over a synthetic source of 10 M S3-style URIs (nothing is written per image),
into a private Redis with the default backpressure marks. A drain process stands in for the GPU fleet: it
pops chunk messages oldest first, at a fixed rate, parses them as a worker does (``ChunkMessage``) and
makes the worker's real job-state calls (``mark_chunk_started``, ``record_chunk``). A sampler records the
producer's RSS and Redis ``used_memory`` every second; the plot goes to bench/long_run.png. At the end the
job state left in Redis is measured per image, key by key (MEMORY USAGE).
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.redis_probe import PrivateRedis, used_memory
from sam3_batch.contracts.jobstate import JOB_PARTS, RedisJobStore, job_key
from sam3_batch.contracts.queue import make_celery
from sam3_batch.contracts.schemas import ChunkMessage, ItemOutcome, JobSpec
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.producer.backpressure import Backpressure, QueueDepth
from sam3_batch.producer.dispatch import CeleryDispatcher
from sam3_batch.producer.feed import run_producer
from sam3_batch.producer.sources import SourceEntry, SourceItem

QUEUE = "sam3-long-run"
JOB_ID = "20261129-170000-10e7aa"
_PAGE_S = 1.0


class SyntheticSource:
    """``count`` S3-style keys in listing order (1,000 per folder), generated, never stored."""

    def __init__(self, count: int) -> None:
        self.count = count

    def entries(self, start_after: str | None) -> Iterator[SourceEntry]:
        start = int(start_after) + 1 if start_after else 0
        for index in range(start, self.count):
            key = f"{index // 1000:05d}/{index:08d}.jpg"
            yield SourceItem(uri=f"s3://lake/images/{key}", out_key=key, position=f"{index:08d}")


# ------------------------------------------------------------------------------------------------ drain


def drain(redis_url: str, queue: str, images_per_s: float, stop_at_images: int) -> None:
    """The stand-in fleet: pop, parse and count chunks (worker job-state calls), no faster than the rate."""
    client = redis.Redis.from_url(redis_url)
    store = RedisJobStore(redis_url)
    started, drained = time.perf_counter(), 0
    while drained < stop_at_images:
        popped = client.brpop([queue], timeout=5)
        if popped is None:
            continue
        envelope = json.loads(popped[1])
        args, _kwargs, _embed = json.loads(zlib.decompress(base64.b64decode(envelope["body"])))
        chunk = ChunkMessage.model_validate(args[0])
        store.mark_chunk_started(chunk.job_id, chunk.chunk_id)
        # The counts are what job state keeps of outcomes; building them unvalidated keeps the drain cheap.
        outcomes = [ItemOutcome.model_construct(uri=i.uri, status="done", out_key=i.out_key, instances=0)
                    for i in chunk.items]
        store.record_chunk(chunk.job_id, chunk.chunk_id, outcomes, 0.0, generation=chunk.generation)
        drained += len(chunk.items)
        ahead = drained / images_per_s - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(ahead)


# ---------------------------------------------------------------------------------------------- sampler


@dataclass
class Samples:
    t_s: list[float] = field(default_factory=list)
    producer_rss_mb: list[float] = field(default_factory=list)
    redis_used_mb: list[float] = field(default_factory=list)
    queue_depth: list[int] = field(default_factory=list)
    enqueued: list[int] = field(default_factory=list)
    done: list[int] = field(default_factory=list)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    """Every second: this (producer) process's RSS, Redis used_memory, queue depth, images planned and done."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(daemon=True)
        self.client, self.samples, self.stop = redis.Redis.from_url(redis_url), Samples(), threading.Event()
        self.started = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            counters = self.client.hmget(job_key(JOB_ID, "counters"), "total", "done")
            s = self.samples
            s.t_s.append(time.perf_counter() - self.started)
            s.producer_rss_mb.append(_rss_mb())
            s.redis_used_mb.append(used_memory(self.client) / 1e6)
            s.queue_depth.append(int(self.client.llen(QUEUE)))
            s.enqueued.append(int(counters[0] or 0))
            s.done.append(int(counters[1] or 0))
            self.stop.wait(_PAGE_S)


# ------------------------------------------------------------------------------------------------- run


@dataclass(frozen=True)
class Figures:
    images: int
    chunk_size: int
    drain_images_per_s: float
    wall_s: float
    producer_s: float
    producer_cpu_s: float
    rss_mb_start: float
    rss_mb_max: float
    rss_mb_end: float
    redis_mb_empty: float
    redis_mb_max: float
    job_state_bytes: dict[str, int]

    @property
    def job_state_per_image(self) -> float:
        return sum(self.job_state_bytes.values()) / self.images


def run(images: int, chunk_size: int, rate: float, work_dir: Path, png: Path) -> Figures:
    with PrivateRedis(work_dir / "redis") as server:
        settings = Settings(broker_url=server.url, queue=QUEUE, chunk_size=chunk_size)
        client = redis.Redis.from_url(server.url)
        store = RedisJobStore(server.url)
        spec = JobSpec(job_id=JOB_ID, prompts=["object"], output_root=f"file://{work_dir}/out")
        store.create(spec)
        empty = used_memory(client) / 1e6
        backpressure = Backpressure(QueueDepth(client, QUEUE), settings.queue_high_water, settings.queue_low_water)
        dispatcher = CeleryDispatcher(make_celery(settings), QUEUE, backpressure)
        fleet = multiprocessing.get_context("spawn").Process(target=drain, args=(server.url, QUEUE, rate, images))
        fleet.start()
        sampler = Sampler(server.url)
        sampler.start()
        start, cpu_start = time.perf_counter(), time.process_time()
        summary = run_producer(spec, SyntheticSource(images), store, Storage(settings), dispatcher, chunk_size)
        producer_s, producer_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        _say(f"producer done: {summary.images_enqueued:,} images in {producer_s:.0f}s; draining")
        fleet.join()
        wall = time.perf_counter() - start
        time.sleep(_PAGE_S * 1.5)  # one more sample after the drain
        sampler.stop.set()
        sampler.join()
        counters = store.counters(JOB_ID)
        if counters.done != images or not counters.complete:
            raise RuntimeError(f"job ended with {counters}, expected {images:,} done")
        state = {p: int(client.memory_usage(job_key(JOB_ID, p), samples=0) or 0) for p in JOB_PARTS}
    s = sampler.samples
    plot(s, png, images, chunk_size, rate)
    (png.with_suffix(".json")).write_text(json.dumps(s.__dict__))
    return Figures(
        images=images, chunk_size=chunk_size, drain_images_per_s=rate, wall_s=wall, producer_s=producer_s,
        producer_cpu_s=producer_cpu, rss_mb_start=s.producer_rss_mb[0], rss_mb_max=max(s.producer_rss_mb),
        rss_mb_end=s.producer_rss_mb[-1], redis_mb_empty=empty, redis_mb_max=max(s.redis_used_mb),
        job_state_bytes={k: v for k, v in state.items() if v},
    )


def plot(s: Samples, png: Path, images: int, chunk_size: int, rate: float) -> None:
    """Producer RSS and Redis used_memory over time (top), images planned and done (bottom)."""
    import matplotlib  # bench-only dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(s.t_s, s.producer_rss_mb, label="producer RSS (MB)")
    top.plot(s.t_s, s.redis_used_mb, label="Redis used_memory (MB)")
    top.set_ylim(bottom=0)
    top.set_ylabel("MB")
    top.legend(loc="center right")
    top.set_title(f"{images:,} images, chunk {chunk_size}, drained at {rate:,.0f} images/s")
    bottom.plot(s.t_s, [n / 1e6 for n in s.enqueued], label="planned (M images)")
    bottom.plot(s.t_s, [n / 1e6 for n in s.done], label="done (M images)")
    bottom.set_ylabel("M images")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000_000)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--rate", type=float, default=12_000.0, help="drain rate, images/s")
    parser.add_argument("--work-dir", type=Path, default=Path("/dev/shm/sam3-long-run"))
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("long_run.png"))
    args = parser.parse_args(argv)
    _say(f"{args.images:,} images, chunk {args.chunk_size}, drain {args.rate:,.0f} images/s")
    try:
        f = run(args.images, args.chunk_size, args.rate, args.work_dir, args.png)
    finally:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    print(f"long run: {f.images:,} images, chunk {f.chunk_size}, drain {f.drain_images_per_s:,.0f} images/s, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"| wall time (s) | {f.wall_s:,.0f} |")
    print(f"| producer: wall / CPU (s); CPU per image (µs) | {f.producer_s:,.0f} / {f.producer_cpu_s:,.0f}; "
          f"{1e6 * f.producer_cpu_s / f.images:.1f} |")
    print(f"| producer RSS: first sample / max / last (MB) | {f.rss_mb_start:.0f} / {f.rss_mb_max:.0f} / "
          f"{f.rss_mb_end:.0f} |")
    print(f"| Redis used_memory: empty / max (MB) | {f.redis_mb_empty:.1f} / {f.redis_mb_max:.1f} |")
    print(f"| job state left in Redis (bytes; per image) | {sum(f.job_state_bytes.values()):,}; "
          f"{f.job_state_per_image:.4f} |")
    print(f"|   by key | {', '.join(f'{k} {v:,}' for k, v in f.job_state_bytes.items())} |")
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
