"""Control-plane bench: a job of 1,000,000 images through the real producer, Redis and Celery workers.

    python -m bench.control_plane            # 1,000,000 images (about 16 minutes on 2 idle cores)
    python -m bench.control_plane --quick    # 20,000 images (under a minute)

What it measures, and what it does not: the model is the no-op stand-in (bench/noop_runtime.py), so the
figures are the cost of everything around the model. Inputs are real PNG files (8x8) under one folder
on tmpfs, sharded 1,000 per sub-folder; they are hard links to 1,000 distinct images, so 1,000,000 keys
cost no disk. Local storage instead of moto S3 keeps the moto server (a single Python process) from
being the thing measured: S3 request rates are arithmetic in SCALING.md. Each image is still listed,
planned, enqueued, fetched by a real ``worker.tasks`` Celery task, read, decoded, "segmented",
written as a metadata JSON, and counted in Redis.

Phases, each on a freshly flushed private Redis:
  1. enqueue: the producer alone (no workers, high-water mark above the job) fills the queue with
     every chunk: enqueue rate, Redis bytes per queued image, message anatomy.
  2. end to end: N no-op worker processes drain while the producer enqueues with the product's
     backpressure marks: images/s, peak Redis memory (bounded by the high-water mark), Redis CPU and
     commands per image, messages per image, worker CPU per image.
  3. skip-existing: the same job submitted again with --skip-existing finds every image done from
     one listing of the output folder and enqueues nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
from PIL import Image

from bench.common import settings_env, tree_cpu_seconds
from bench.noop_runtime import NOOP_MODEL_ID
from bench.redis_probe import PrivateRedis, RedisTotals, Sampler, used_memory
from sam3_batch.contracts.jobstate import JOB_PARTS, RedisJobStore, job_key
from sam3_batch.contracts.queue import make_celery
from sam3_batch.contracts.settings import Settings
from sam3_batch.jobs import JobRequest, submit

REPO_ROOT = Path(__file__).resolve().parents[1]
QUEUE = "sam3-bench"
SHARD = 1000  # files per input folder, as a sharded S3 key layout would have
DISTINCT_IMAGES = 1000


@dataclass(frozen=True)
class Config:
    images: int
    workers: int
    chunk_size: int
    high_water: int
    low_water: int
    work_dir: Path
    fleet_images_per_s: float
    keep: bool
    redis_server: str
    skip_phase: bool
    json_out: Path | None

    @property
    def chunks(self) -> int:
        return math.ceil(self.images / self.chunk_size)


# --------------------------------------------------------------------------------------------- inputs


def prepare_inputs(work_dir: Path, count: int) -> str:
    """``count`` real PNG files under ``work_dir/in`` (reused when already there); returns the prefix URI."""
    root, marker = work_dir / "in", work_dir / "in.count"
    if not (marker.exists() and marker.read_text() == str(count)):
        shutil.rmtree(root, ignore_errors=True)
        originals = _tiny_pngs(work_dir / "originals", DISTINCT_IMAGES)
        for index in range(count):
            target = root / f"{index // SHARD:04d}" / f"{index:07d}.png"
            if index % SHARD == 0:
                target.parent.mkdir(parents=True, exist_ok=True)
            os.link(originals[index % len(originals)], target)
        marker.write_text(str(count))
    return f"file://{root}"


def _tiny_pngs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:04d}.png"
        Image.new("RGB", (8, 8), (index % 256, (index // 256) * 40, 128)).save(path, format="PNG")
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- settings


def bench_settings(config: Config, redis_url: str, *, high: int, low: int) -> Settings:
    """The settings every process of a phase shares (the workers get them through the environment)."""
    return Settings(
        broker_url=redis_url, queue=QUEUE, chunk_size=config.chunk_size, queue_high_water=high,
        queue_low_water=low, model=NOOP_MODEL_ID, io_workers=4, batch_size=8,
    )


def job_request(input_prefix: str, out_root: str, *, skip_existing: bool = False) -> JobRequest:
    return JobRequest(inputs=[input_prefix], prompts=["object"], output_root=out_root,
                      skip_existing=skip_existing)


def fresh_redis(url: str) -> redis.Redis:
    """A client on the bench's Redis, emptied, with its command statistics reset."""
    client = redis.Redis.from_url(url)
    client.flushall()
    client.config_resetstat()
    return client


# ------------------------------------------------------------------------------------ phase 1: enqueue


@dataclass
class EnqueueFigures:
    images: int
    chunks: int
    wall_s: float
    producer_cpu_s: float
    baseline_bytes: int
    full_bytes: int
    queue_list_bytes: int
    job_state_bytes: int
    message_bytes: int
    message_body_bytes: int
    message_envelope_bytes: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def bytes_per_image(self) -> float:
        """Keys only: the queue LIST and the job's state (MEMORY USAGE), what grows with the queue."""
        return (self.queue_list_bytes + self.job_state_bytes) / self.images

    @property
    def used_memory_per_image(self) -> float:
        """used_memory above empty: also counts ~0.5 MB that Redis keeps after FLUSHALL (fixed, not per image)."""
        return (self.full_bytes - self.baseline_bytes) / self.images


def enqueue_phase(config: Config, redis_url: str, input_prefix: str) -> EnqueueFigures:
    """The producer alone: nothing drains the queue, and the high-water mark is above the whole job."""
    client = fresh_redis(redis_url)
    settings = bench_settings(config, redis_url, high=config.chunks + 1, low=0)
    baseline = used_memory(client)
    cpu_start, start = time.process_time(), time.perf_counter()
    summary = submit(job_request(input_prefix, f"file://{config.work_dir}/out-enqueue"), settings)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if summary.images_enqueued != config.images or client.llen(QUEUE) != config.chunks:
        raise RuntimeError(f"enqueued {summary.images_enqueued} images, {client.llen(QUEUE)} chunks queued")
    anatomy = message_anatomy(client.lindex(QUEUE, -1))  # type: ignore[arg-type]  # the oldest: a full chunk
    return EnqueueFigures(
        images=summary.images_enqueued, chunks=summary.chunks_sent, wall_s=wall, producer_cpu_s=cpu,
        baseline_bytes=baseline, full_bytes=used_memory(client),
        queue_list_bytes=int(client.memory_usage(QUEUE, samples=0) or 0),
        job_state_bytes=job_state_bytes(client, summary.job_id), **anatomy,
    )


def job_state_bytes(client: redis.Redis, job_id: str) -> int:
    """MEMORY USAGE of every key of the job's state, summed."""
    return sum(int(client.memory_usage(job_key(job_id, part), samples=0) or 0) for part in JOB_PARTS)


def message_anatomy(raw: bytes) -> dict[str, int]:
    """Sizes of one queued kombu message: whole, its (zlib + base64) body, and the rest (headers, properties)."""
    envelope = json.loads(raw)
    return {"message_bytes": len(raw), "message_body_bytes": len(envelope["body"]),
            "message_envelope_bytes": len(raw) - len(envelope["body"])}


# ------------------------------------------------------------------------------- phase 2: end to end


@dataclass
class EndToEndFigures:
    images: int
    workers: int
    wall_s: float
    producer_done_s: float
    baseline_bytes: int
    peak_bytes: int
    max_queue_depth: int
    redis_cpu_s: float
    redis_calls: dict[str, int]
    worker_cpu_s: float
    job_state_bytes: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s


def end_to_end_phase(config: Config, redis_url: str, input_prefix: str) -> EndToEndFigures:
    """N no-op workers drain while the producer enqueues with backpressure; timed to the job's completion."""
    client = fresh_redis(redis_url)
    shutil.rmtree(config.work_dir / "out", ignore_errors=True)
    settings = bench_settings(config, redis_url, high=config.high_water, low=config.low_water)
    workers = start_workers(settings, config.workers, config.work_dir / "logs")
    try:
        wait_until_ready(settings, workers)
        figures = drive_job(config, settings, client, workers, input_prefix)
    finally:
        stop_workers(workers)
    return figures


def drive_job(config: Config, settings: Settings, client: redis.Redis, workers: list[subprocess.Popen[bytes]],
              input_prefix: str) -> EndToEndFigures:
    """Submit the job (producer in a thread) and sample Redis until the workers have finished it."""
    redis_url = settings.broker_url.get_secret_value()
    baseline, before = used_memory(client), RedisTotals.read(client)
    cpu_before = sum(tree_cpu_seconds(w.pid) for w in workers)  # with their stage processes
    with Sampler(redis_url, QUEUE, watch_job=True) as sampler, ThreadPoolExecutor(1) as pool:
        start = time.perf_counter()
        producer = pool.submit(_timed_submit, job_request(input_prefix, f"file://{config.work_dir}/out"), settings)
        try:
            completed_at = sampler.wait_complete(timeout_s=120 + config.images / 100)
        except BaseException:
            if sampler.samples.job_id:  # a cancelled job releases a producer blocked on backpressure
                RedisJobStore(redis_url).cancel(sampler.samples.job_id)
            raise
        producer_done_at = producer.result()
    worker_cpu = sum(tree_cpu_seconds(w.pid) for w in workers) - cpu_before
    totals = RedisTotals.read(client).since(before, discount=sampler.samples.own_calls)
    found = sampler.samples
    if found.counters is None or found.counters.done != config.images or found.counters.failed:
        raise RuntimeError(f"job ended with {found.counters}, expected {config.images} done")
    return EndToEndFigures(
        images=found.counters.done, workers=len(workers), wall_s=completed_at - start,
        producer_done_s=producer_done_at - start, baseline_bytes=baseline, peak_bytes=found.peak_memory,
        max_queue_depth=found.max_depth, redis_cpu_s=totals.cpu_seconds, redis_calls=totals.calls,
        worker_cpu_s=worker_cpu, job_state_bytes=job_state_bytes(client, found.job_id or ""),
    )


def _timed_submit(request: JobRequest, settings: Settings) -> float:
    """Submit; returns the perf_counter time the producer finished."""
    submit(request, settings)
    return time.perf_counter()


def start_workers(settings: Settings, count: int, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    """``count`` worker processes (solo pool, one chunk at a time each: the no-op model needs no overlap)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = settings_env(settings)
    workers = []
    for index in range(count):
        with open(log_dir / f"worker-{index}.log", "wb") as log:
            command = [sys.executable, "-m", "bench.noop_worker", "--hostname", f"noop{index}@%h"]
            workers.append(subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT))
    return workers


def wait_until_ready(settings: Settings, workers: list[subprocess.Popen[bytes]], timeout_s: float = 120) -> None:
    """Until every worker answers a Celery ping (its consumer is up), so start-up is not timed."""
    app = make_celery(settings, name="bench-ping")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(w.poll() is not None for w in workers):
            raise RuntimeError("a worker exited during start-up; see its log under the work dir")
        if len(app.control.ping(timeout=1.0)) >= len(workers):
            return
    raise RuntimeError(f"workers did not answer a ping within {timeout_s:.0f}s")


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (warm shutdown), then SIGKILL whatever is still running after 30 s."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


# --------------------------------------------------------------------------- phase 3: skip-existing


@dataclass
class SkipFigures:
    images: int
    skipped: int
    enqueued: int
    wall_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s


def skip_phase(config: Config, redis_url: str, input_prefix: str) -> SkipFigures:
    """Resubmit the finished job with --skip-existing: one listing of the outputs, nothing enqueued."""
    fresh_redis(redis_url)
    settings = bench_settings(config, redis_url, high=config.high_water, low=config.low_water)
    start = time.perf_counter()
    request = job_request(input_prefix, f"file://{config.work_dir}/out", skip_existing=True)
    summary = submit(request, settings)
    return SkipFigures(config.images, summary.skipped, summary.images_enqueued, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------- report


@dataclass
class Figures:
    config: Config
    enqueue: EnqueueFigures
    end_to_end: EndToEndFigures
    skip: SkipFigures | None


def _row(label: str, measured: str, needed: str = "", ratio: str = "") -> str:
    return f"| {label} | {measured} | {needed} | {ratio} |"


def _ceiling_row(label: str, per_s: float, need: float) -> str:
    return _row(label, f"{per_s:,.0f}", f"{need:,.0f}", f"{per_s / need:.1f}x")


def throughput_rows(f: Figures) -> list[str]:
    """Rates, and the ceilings of the two shared parts (one producer, one Redis) at their CPU per image."""
    enq, e2e, need = f.enqueue, f.end_to_end, f.config.fleet_images_per_s
    redis_us = 1e6 * e2e.redis_cpu_s / e2e.images
    worker_us = 1e6 * e2e.worker_cpu_s / e2e.images
    return [
        _ceiling_row("producer enqueue rate, alone (images/s)", enq.images_per_s, need),
        _row("producer CPU per image (µs)", f"{1e6 * enq.producer_cpu_s / enq.images:.1f}"),
        _row("  the producer's ceiling at that CPU cost, one core (images/s)",
             f"{enq.images / enq.producer_cpu_s:,.0f}", "≥ 20,000"),
        _row(f"end to end, {e2e.workers} no-op workers sharing {os.cpu_count()} cores (images/s)",
             f"{e2e.images_per_s:,.0f}"),
        _row("Redis CPU per image (µs)", f"{redis_us:.1f}"),
        _ceiling_row("one Redis core's ceiling at that cost (images/s)", 1e6 / redis_us, need),
        _row("worker CPU per image: Celery, task, read + decode + metadata write (µs)", f"{worker_us:.0f}"),
        _row("  the same at 40 images/s per GPU (% of one core)", f"{40 * worker_us / 1e4:.1f}%"),
    ]


def traffic_rows(f: Figures) -> list[str]:
    """Redis commands and broker messages per image."""
    enq, e2e, need = f.enqueue, f.end_to_end, f.config.fleet_images_per_s
    commands = sum(e2e.redis_calls.values()) / e2e.images
    top = sorted(e2e.redis_calls.items(), key=lambda kv: -kv[1])[:10]
    return [
        _row("Redis commands per image (producer + workers)", f"{commands:.3f}"),
        _row("  by command", ", ".join(f"{n} {c / e2e.images:.3f}" for n, c in top)),
        _row("Redis commands/s at the fleet's rate", f"{need * commands:,.0f}"),
        _row("task messages per image", f"{enq.chunks / enq.images:.4f}"),
        _row("broker messages per image (tasks + Celery events)",
             f"{(enq.chunks + e2e.redis_calls.get('publish', 0)) / enq.images:.3f}"),
    ]


def memory_rows(f: Figures) -> list[str]:
    """Redis memory: per queued image, peaks with and without backpressure, job state left behind."""
    enq, e2e, config = f.enqueue, f.end_to_end, f.config
    return [
        _row("Redis bytes per queued image (queue + job state keys, MEMORY USAGE)", f"{enq.bytes_per_image:.1f}",
             "≤ 40"),
        _row("  queue LIST alone, per image", f"{enq.queue_list_bytes / enq.images:.1f}"),
        _row("  used_memory above empty, per image (with ~0.5 MB fixed)", f"{enq.used_memory_per_image:.1f}"),
        _row("  one message: whole / zlib+base64 body / envelope (bytes)",
             f"{enq.message_bytes} / {enq.message_body_bytes} / {enq.message_envelope_bytes}"),
        _row(f"Redis memory, all {enq.chunks:,} chunks queued (MB above empty)",
             f"{(enq.full_bytes - enq.baseline_bytes) / 1e6:.1f}"),
        _row(f"peak Redis memory with backpressure {config.high_water}/{config.low_water} chunks (MB above empty)",
             f"{(e2e.peak_bytes - e2e.baseline_bytes) / 1e6:.1f}"),
        _row("  deepest queue seen (chunks)", f"{e2e.max_queue_depth:,}"),
        _row("job state left in Redis when done, per image (bytes)", f"{e2e.job_state_bytes / e2e.images:.3f}",
             "≤ 0.5"),
    ]


def ratio_table(f: Figures) -> str:
    """All figures as one markdown table, with the ratio to what the fleet needs where one applies."""
    rows = ["| figure | measured | fleet needs | ratio |", "| --- | ---: | ---: | ---: |"]
    rows += throughput_rows(f) + traffic_rows(f) + memory_rows(f)
    if f.skip is not None:
        label = f"--skip-existing resubmit: {f.skip.skipped:,} found done, {f.skip.enqueued} enqueued (images/s)"
        rows.append(_row(label, f"{f.skip.images_per_s:,.0f}"))
    return "\n".join(rows)


def _parse(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="20,000 images")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--high-water", type=int, default=Settings().queue_high_water)
    parser.add_argument("--low-water", type=int, default=Settings().queue_low_water)
    parser.add_argument("--work-dir", type=Path, default=Path("/dev/shm/sam3-control-plane"))
    parser.add_argument("--fleet-images-per-s", type=float, default=100 * 40.0, help="100 GPUs x 40 images/s")
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument("--no-skip-phase", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep inputs and outputs for another run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    return Config(
        images=20_000 if args.quick else args.images, workers=args.workers, chunk_size=args.chunk_size,
        high_water=args.high_water, low_water=args.low_water, work_dir=args.work_dir,
        fleet_images_per_s=args.fleet_images_per_s, keep=args.keep, redis_server=args.redis_server,
        skip_phase=not args.no_skip_phase, json_out=args.json,
    )


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(config: Config) -> Figures:
    """All phases, on a private Redis."""
    _say(f"preparing {config.images:,} input images under {config.work_dir}")
    prefix = prepare_inputs(config.work_dir, config.images)
    with PrivateRedis(config.work_dir / "redis", config.redis_server) as server:
        _say("phase 1: producer alone")
        enq = enqueue_phase(config, server.url, prefix)
        _say(f"phase 1: {enq.images_per_s:,.0f} images/s; phase 2: {config.workers} workers, end to end")
        e2e = end_to_end_phase(config, server.url, prefix)
        _say(f"phase 2: {e2e.images_per_s:,.0f} images/s")
        skip = None
        if config.skip_phase:
            _say("phase 3: resubmit with --skip-existing")
            skip = skip_phase(config, server.url, prefix)
    return Figures(config, enq, e2e, skip)


def main(argv: list[str] | None = None) -> None:
    config = _parse(argv)
    try:
        figures = run(config)
    finally:
        if not config.keep:
            shutil.rmtree(config.work_dir, ignore_errors=True)
    if config.json_out:
        config.json_out.write_text(json.dumps(asdict(figures), indent=2, default=str))
    load = os.getloadavg()[0]
    print(f"control plane: {config.images:,} images, chunk {config.chunk_size}, {config.workers} no-op workers, "
          f"{os.cpu_count()} CPU cores, load average {load:.1f} at the end")
    print(ratio_table(figures))


if __name__ == "__main__":
    main()
