"""Pipeline bench: end-to-end images/s against the bare model, the naive loop, and mask encoding's share.

    python -m bench.pipeline_efficiency                # 192 images, chunks 8/32/128, 2 pools, 2 io modes: ~8 min
    python -m bench.pipeline_efficiency --chunk-sizes 32 --io-modes processes   # the defaults and solo: ~3 min
    python -m bench.pipeline_efficiency --queries 8,50 --chunk-sizes 32 --pools threads:2 --io-modes processes \
        --images 48 --naive-images 12 --no-probes      # crowded images (50 masks each) beside 8: ~6 min

Everything runs on one set of JPEG photos in a SeaweedFS S3 server (its own process) and one private Redis:

  1. pipeline efficiency: a real worker (``python -m sam3_batch worker``) and a real ``submit`` of the S3
     prefix; timed from the submit call until the job's counters say complete (listing, queueing,
     download, decode, resize, model, RLE, upload and the per-chunk bookkeeping all included). Divided
     by the bare model's images/s on pre-decoded tensors at the same batch size
     (``bench.common.bare_forward``), measured in this process before and after the worker runs.
  2. the naive loop: the same images one at a time in this process (download, decode, prepare, segment
     a batch of one, write), as a user of a per-image API would: speed-up of the pipeline over it.
  3. (chunk boundaries, I/O placement) the same job at several chunk sizes, with the solo pool (one chunk
     at a time) and the threads pool with two chunks in flight (one loads while the other is on the model),
     with the worker's loaders and writers as processes (the default) and as threads of its process.
  4. mask encoding: RLE / PNG encoding and upload per image, measured on the naive loop's detections,
     as a share of an image's total, and the worker's own encode+upload stage time.

The "accelerator" is ``--model-threads`` CPU cores (1 of the 2 here): the worker's model and the bare
model get the same intra-op threads, so the rest of the machine plays the host that does the I/O.
The bench model (bench.common.BENCH_SHAPE) is sized so one forward costs ~30-100 ms per image on one
core, as SAM 3 on a GPU costs relative to the I/O around it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import boto3
import torch
from PIL import Image

from bench.common import (
    BENCH_SHAPE,
    DEFAULT_WORK_DIR,
    STAGES,
    Service,
    WorkerProcess,
    bare_images_per_s,
    batches,
    bench_checkpoint,
    descendants,
    free_port,
    load_runtime,
    machine_line,
    parse_size,
    photo_jpegs,
    prepare_all,
    process_cpu_seconds,
    redis_server,
    s3_server,
    stage_diff,
    table,
    tree_cpu_seconds,
    use_fake_aws_credentials,
    wait_for,
)
from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.keys import OutputLayout
from sam3_batch.contracts.schemas import JobSpec, OutputOptions, Thresholds, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.jobs import JobRequest, submit
from sam3_batch.worker.decode import decode_image, rgb_pixels
from sam3_batch.worker.encode import encode_masked_image, encode_png_mask, union_of
from sam3_batch.worker.model_input import PreparedImage, Preparer
from sam3_batch.worker.runtime import Sam3Runtime
from sam3_batch.worker.writer import WriteRequest, build_metadata, write_image_outputs

BUCKET = "bench"
QUEUE = "sam3-pipeline-bench"
PROMPT = "object"
WARM_UP_IMAGES = 16
CEILING_SAMPLE = 32  # images the ceiling is re-measured on before each timed run
ENCODING_SAMPLE = 16  # images whose encoding steps are timed one by one


@dataclass(frozen=True)
class Config:
    images: int
    size_wh: tuple[int, int]
    batch_size: int
    chunk_sizes: tuple[int, ...]
    pools: tuple[tuple[str, int], ...]
    io_modes: tuple[str, ...]
    io_workers: int
    model_threads: int
    naive_images: int
    threshold: float
    work_dir: Path
    json_out: Path | None
    queries: tuple[int, ...] = (BENCH_SHAPE.num_queries,)
    probes: bool = True


def _arguments(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192, help="images in the S3 bucket")
    parser.add_argument("--size", default="640x480", help="photo size WxH")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-sizes", default="8,32,128", help="images per chunk message, comma-separated")
    parser.add_argument("--pools", default="threads:2,solo:1", help="worker pool:concurrency, comma-separated")
    parser.add_argument("--io-modes", default="processes,threads", help="where the worker's I/O stages run")
    parser.add_argument("--io-workers", type=int, default=0,
                        help="loaders, and as many writers (0: the worker's default for this machine)")
    parser.add_argument("--model-threads", type=int, default=1, help="CPU cores the model gets")
    parser.add_argument("--naive-images", type=int, default=64, help="images for the one-at-a-time loop")
    parser.add_argument("--threshold", type=float, default=0.0, help="score threshold (0: every query kept)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--queries", default=str(BENCH_SHAPE.num_queries),
                        help="the model's queries, comma-separated: every one is kept at threshold 0, so this is "
                             "the instances per image (8,50: the crowded case beside the usual one)")
    parser.add_argument("--no-probes", action="store_true", help="skip the encoding and GIL probes (sections 4, 5)")
    args = parser.parse_args(argv)
    pools = tuple((name, int(count)) for name, _, count in (p.partition(":") for p in args.pools.split(",")))
    return Config(
        images=args.images, size_wh=parse_size(args.size), batch_size=args.batch_size,
        chunk_sizes=tuple(int(c) for c in args.chunk_sizes.split(",")), pools=pools,
        io_modes=tuple(args.io_modes.split(",")), io_workers=Settings(io_workers=args.io_workers).io_worker_count(),
        model_threads=args.model_threads, naive_images=min(args.naive_images, args.images),
        threshold=args.threshold, work_dir=args.work_dir, json_out=args.json,
        queries=tuple(int(q) for q in args.queries.split(",")), probes=not args.no_probes,
    )


# ------------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Ceiling:
    """The model alone in this process, measured right before the figure it is compared with."""

    bare: float  # images/s of the bare forward on pre-decoded tensors
    segment: float  # images/s of the model plus post-processing to full-size host bool masks
    instances_per_image: float


@dataclass
class NaiveFigures:
    images: int
    wall_s: float
    stage_ms: dict[str, float]
    ceiling: Ceiling

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s


@dataclass
class EncodingFigures:
    images: int
    masks_per_image: float
    ms: dict[str, float]  # per image: metadata (RLE + JSON), upload_metadata, png, upload_png, masked_png


@dataclass
class RunFigures:
    io_mode: str
    pool: str
    concurrency: int
    chunk_size: int
    images: int
    wall_s: float
    stage_ms: dict[str, float]
    worker_peak_rss_mb: float
    stage_pss_mb: float  # the worker's stage processes (and their forkserver) at the end of the run
    ceiling: Ceiling
    cpu_ms: dict[str, float]  # per image, by process: worker (+ its stage processes), s3, bench (submit + polling)

    @property
    def label(self) -> str:
        return f"{self.pool} x{self.concurrency}, I/O in {self.io_mode}"

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def efficiency(self) -> float:
        return self.images_per_s / self.ceiling.bare


@dataclass(frozen=True)
class ContentionFigures:
    """Bare model images/s alone and while the worker's own I/O steps run in a thread or in a process."""

    alone: float
    io_thread: float
    io_process: float
    io_images_per_s_thread: float
    io_images_per_s_process: float


@dataclass
class Figures:
    machine: str
    config: dict[str, Any]
    ceiling: Ceiling
    naive: NaiveFigures | None = None
    encoding: EncodingFigures | None = None
    runs: list[RunFigures] = field(default_factory=list)
    ceiling_after: Ceiling | None = None
    contention: ContentionFigures | None = None


# ---------------------------------------------------------------------------------------------- setup


def bench_settings(config: Config, redis_url: str, s3_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker_url": redis_url, "queue": QUEUE, "s3_endpoint_url": s3_url, "model": "unset", "device": "cpu",
        "dtype": "float32", "batch_size": config.batch_size, "io_workers": config.io_workers,
        "queue_high_water": 100_000, "queue_low_water": 0,
    }
    values.update(overrides)
    return Settings(**values)


def upload_inputs(settings: Settings, config: Config) -> list[str]:
    """The photos under s3://bench/in/ (and a few under warm/ for warming the worker up); their URIs."""
    client = boto3.session.Session().client("s3", endpoint_url=settings.s3_endpoint_url)
    client.create_bucket(Bucket=BUCKET)
    files = photo_jpegs(config.images, config.size_wh)
    for index, data in enumerate(files):
        client.put_object(Bucket=BUCKET, Key=f"in/{index:05d}.jpg", Body=data)
    for index, data in enumerate(files[:WARM_UP_IMAGES]):
        client.put_object(Bucket=BUCKET, Key=f"warm/{index:05d}.jpg", Body=data)
    print(f"inputs: {config.images} JPEGs of {config.size_wh[0]}x{config.size_wh[1]}, "
          f"{sum(map(len, files)) / len(files) / 1024:.0f} KiB on average", flush=True)
    return [f"s3://{BUCKET}/in/{index:05d}.jpg" for index in range(config.images)]


def thresholds(config: Config) -> Thresholds:
    return Thresholds(score=config.threshold, mask=0.5)


# ------------------------------------------------------------------------------------------ ceilings


def measure_ceiling(runtime: Sam3Runtime, prepared: list[PreparedImage], config: Config) -> Ceiling:
    """Bare forward images/s, and the model with post-processing (what the worker's model stage does)."""
    bare = bare_images_per_s(runtime, prepared, config.batch_size, PROMPT)
    start = time.perf_counter()
    instances = 0
    for batch in batches(prepared, config.batch_size):
        found = runtime.segment(batch, [[PROMPT]] * len(batch), thresholds(config))
        instances += sum(len(d) for per_image in found for d in per_image)
    segment = len(prepared) / (time.perf_counter() - start)
    return Ceiling(bare=bare, segment=segment, instances_per_image=instances / len(prepared))


# ------------------------------------------------------------------------------------- the naive loop


def naive_loop(runtime: Sam3Runtime, settings: Settings, uris: list[str], config: Config,
               keep: list[WriteRequest], ceiling: Ceiling) -> NaiveFigures:
    """One image at a time, each stage waiting for the last: what a per-image API loop does."""
    spec = JobSpec(job_id="naive", prompts=[PROMPT], thresholds=thresholds(config),
                   output_root=f"s3://{BUCKET}/out-naive/")
    stage_s = dict.fromkeys(STAGES, 0.0)
    storage = Storage(settings)
    start = time.perf_counter()
    for uri in uris:
        mark = time.perf_counter()
        data = storage.read_bytes(uri)
        mark = _lap(stage_s, "download", mark)
        image = decode_image(data, max_pixels=settings.max_image_pixels)
        mark = _lap(stage_s, "decode", mark)
        prepared = runtime.prepare(image)
        mark = _lap(stage_s, "preprocess", mark)
        [detections] = runtime.segment([prepared], [[PROMPT]], spec.thresholds)
        mark = _lap(stage_s, "model", mark)
        item = WorkItem(uri=uri, out_key=uri.rsplit("/", 1)[-1])
        job = WriteRequest.of_image(spec, "naive", item, image, detections, {})
        write_image_outputs(job, storage)
        _lap(stage_s, "encode_upload", mark)
        if len(keep) < ENCODING_SAMPLE:  # with the pixels, for the masked-image encoding cost
            keep.append(replace(job, rgb=rgb_pixels(image)))
    wall = time.perf_counter() - start
    return NaiveFigures(len(uris), wall, {s: 1000.0 * v / len(uris) for s, v in stage_s.items()}, ceiling)


def _lap(stage_s: dict[str, float], stage: str, mark: float) -> float:
    now = time.perf_counter()
    stage_s[stage] += now - mark
    return now


def encoding_costs(jobs: list[WriteRequest], storage: Storage) -> EncodingFigures:
    """Per image: the metadata document (RLE of every mask + JSON), PNG of every mask, the masked image,
    and their uploads, each step timed on its own."""
    totals = dict.fromkeys(("metadata", "upload_metadata", "png", "upload_png", "masked_png"), 0.0)
    masks = 0
    for job in jobs:
        layout = OutputLayout(f"s3://{BUCKET}/out-encoding/", job.item.out_key)
        stacked = [found.masks for found in job.detections]
        masks += sum(len(m) for m in stacked)
        mark = time.perf_counter()
        document = build_metadata(job, layout, None).model_dump_json().encode()
        mark = _lap(totals, "metadata", mark)
        storage.write_bytes(layout.metadata_uri, document, "application/json")
        mark = _lap(totals, "upload_metadata", mark)
        pngs = [encode_png_mask(mask) for m in stacked for mask in m]
        mark = _lap(totals, "png", mark)
        for index, data in enumerate(pngs):
            storage.write_bytes(layout.mask_png_uri(0, index), data, "image/png")
        mark = _lap(totals, "upload_png", mark)
        assert job.rgb is not None
        image = Image.fromarray(job.rgb)
        for m in stacked:
            encode_masked_image(image, union_of(m), "png")
        _lap(totals, "masked_png", mark)
    return EncodingFigures(len(jobs), masks / len(jobs), {k: 1000.0 * v / len(jobs) for k, v in totals.items()})


# -------------------------------------------------------------------------------- GIL contention


def _io_loop(settings: Settings, preparer: Preparer, uris: list[str], job: WriteRequest,
             keep_going: Callable[[], bool], count: Callable[[], None]) -> None:
    """The worker's per-image I/O, flat out: download, decode, prepare, then write the outputs."""
    storage, index = Storage(settings), 0
    while keep_going():
        image = decode_image(storage.read_bytes(uris[index % len(uris)]), max_pixels=settings.max_image_pixels)
        preparer(image)
        item = job.item.model_copy(update={"out_key": f"contention/{index}"})
        write_image_outputs(replace(job, item=item), storage)
        index += 1
        count()


def _in_process(settings: Settings, preparer: Preparer, uris: list[str], job_pickle: bytes,
                stop: Any, done: Any) -> None:
    job: WriteRequest = pickle.loads(job_pickle)
    def count() -> None:
        with done.get_lock():
            done.value += 1

    torch.set_num_threads(1)
    _io_loop(settings, preparer, uris, job, lambda: not stop.is_set(), count)


def contention(runtime: Sam3Runtime, sample: list[PreparedImage], settings: Settings, uris: list[str],
               job: WriteRequest, config: Config) -> ContentionFigures:
    """The same I/O work beside the model in a thread (sharing its GIL) and in a process (not sharing it)."""
    alone = bare_images_per_s(runtime, sample, config.batch_size, PROMPT)
    stop, done = threading.Event(), [0]
    worker = threading.Thread(target=_io_loop, args=(settings, runtime.preparer, uris, job, lambda: not stop.is_set(),
                                                     lambda: done.__setitem__(0, done[0] + 1)))
    worker.start()
    start = time.perf_counter()
    with_thread = bare_images_per_s(runtime, sample, config.batch_size, PROMPT)
    thread_rate = done[0] / (time.perf_counter() - start)
    stop.set()
    worker.join()
    # As the worker starts its stage processes: from a forkserver, never a fork of this threaded process.
    server = multiprocessing.get_context("forkserver")
    process_stop, process_done = server.Event(), server.Value("i", 0)
    child = server.Process(target=_in_process,
                           # plain pickle: shared-memory arrays cannot be handed to a process being started
                           args=(settings, runtime.preparer, uris, pickle.dumps(job), process_stop, process_done))
    child.start()
    wait_for(lambda: process_done.value > 0, 120, "the I/O process to get going")  # past its start-up
    start, first = time.perf_counter(), process_done.value
    with_process = bare_images_per_s(runtime, sample, config.batch_size, PROMPT)
    process_rate = (process_done.value - first) / (time.perf_counter() - start)
    process_stop.set()
    child.join()
    return ContentionFigures(alone, with_thread, with_process, thread_rate, process_rate)


# ---------------------------------------------------------------------------------------- end to end


def run_job(settings: Settings, worker: WorkerProcess, prefix: str, out: str, chunk_size: int,
            expected: int, threshold: float) -> tuple[float, dict[str, float]]:
    """Submit the prefix with this chunk size; seconds until the job reads complete, and stage ms/image."""
    store = RedisJobStore(settings.state_redis_url())
    before = worker.stage_seconds()
    request = JobRequest(inputs=[prefix], prompts=[PROMPT], output_root=out,
                         thresholds=Thresholds(score=threshold, mask=0.5), outputs=OutputOptions())
    start = time.perf_counter()
    summary = submit(request, settings.model_copy(update={"chunk_size": chunk_size}))
    deadline = start + 600
    while True:
        counters = store.counters(summary.job_id)
        if counters.complete:
            break
        if time.perf_counter() > deadline or worker.process.poll() is not None:
            raise RuntimeError(f"job {summary.job_id} did not complete: {counters}; see {worker.log_path}")
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if counters.done != expected:
        raise RuntimeError(f"job {summary.job_id} ended with {counters}, expected {expected} done")
    return wall, stage_diff(worker.stage_seconds(), before)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pss_mb(pids: list[int]) -> float:
    """Proportional set size (shared pages split among their users) of these processes, in MiB."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith("Pss:"))
    return total / 1024


def end_to_end(config: Config, settings: Settings, runtime: Sam3Runtime, sample: list[PreparedImage],
               s3_pid: int, io_mode: str, pool: str, concurrency: int) -> list[RunFigures]:
    """One worker with this pool; a warm-up job, then the timed job at each chunk size, each right after
    a ceiling measurement on ``sample`` (the worker idles meanwhile), so machine noise hits both alike."""
    log = config.work_dir / f"worker-{io_mode}-{pool}{concurrency}.log"
    settings = settings.model_copy(update={"io_mode": io_mode})
    worker = WorkerProcess(settings, log, pool=pool, concurrency=concurrency, threads=config.model_threads)
    runs = []
    try:
        worker.wait_ready()
        run_job(settings, worker, f"s3://{BUCKET}/warm/", f"s3://{BUCKET}/out-warm/", 8, WARM_UP_IMAGES,
                config.threshold)
        for chunk_size in config.chunk_sizes:
            ceiling = measure_ceiling(runtime, sample, config)
            out = f"s3://{BUCKET}/out-{io_mode}-{pool}{concurrency}-c{chunk_size}/"
            pids = {"worker": worker.process.pid, "s3": s3_pid, "bench": os.getpid()}
            # The worker with its stage processes; S3 and this process alone (the others are our children).
            cpu_of = {"worker": tree_cpu_seconds, "s3": process_cpu_seconds, "bench": process_cpu_seconds}
            cpu_before = {name: cpu_of[name](pid) for name, pid in pids.items()}
            wall, stages = run_job(settings, worker, f"s3://{BUCKET}/in/", out, chunk_size, config.images,
                                   config.threshold)
            cpu_ms = {name: 1000.0 * (cpu_of[name](pid) - cpu_before[name]) / config.images
                      for name, pid in pids.items()}
            run = RunFigures(io_mode, pool, concurrency, chunk_size, config.images, wall, stages,
                             peak_rss_mb(worker.process.pid), pss_mb(descendants(worker.process.pid)), ceiling,
                             cpu_ms)
            runs.append(run)
            print(f"  {run.label}, chunks of {chunk_size}: {run.images_per_s:.2f} images/s, "
                  f"bare model just before {ceiling.bare:.2f}: {run.efficiency:.2f}", flush=True)
    finally:
        worker.stop()
    return runs


# ------------------------------------------------------------------------------------------------ main


def measure(config: Config, checkpoint: Path, redis_url: str, s3: Service) -> Figures:
    settings = bench_settings(config, redis_url, s3.url, model=str(checkpoint), metrics_port=free_port())
    uris = upload_inputs(settings, config)
    storage = Storage(settings)
    runtime = load_runtime(checkpoint, config.model_threads)
    images = [decode_image(storage.read_bytes(uri), max_pixels=settings.max_image_pixels) for uri in uris]
    prepared = prepare_all(runtime, images)
    del images
    sample = prepared[: min(len(prepared), CEILING_SAMPLE)]
    figures = Figures(machine_line(), _config_dict(config), measure_ceiling(runtime, prepared, config))
    print(f"bare model: {figures.ceiling.bare:.2f} images/s at batch {config.batch_size}", flush=True)
    kept: list[WriteRequest] = []
    naive_ceiling = measure_ceiling(runtime, sample, config)
    figures.naive = naive_loop(runtime, settings, uris[: config.naive_images], config, kept, naive_ceiling)
    print(f"naive loop: {figures.naive.images_per_s:.2f} images/s", flush=True)
    if config.probes:
        figures.encoding = encoding_costs(kept[:ENCODING_SAMPLE], storage)
        figures.contention = contention(runtime, sample, settings, uris, kept[0], config)
    del kept
    for io_mode in config.io_modes:
        for pool, concurrency in config.pools:
            figures.runs += end_to_end(config, settings, runtime, sample, s3.pid, io_mode, pool, concurrency)
    figures.ceiling_after = measure_ceiling(runtime, prepared, config)
    print(f"bare model again: {figures.ceiling_after.bare:.2f} images/s", flush=True)
    return figures


def _config_dict(config: Config) -> dict[str, Any]:
    values = asdict(config)
    values["work_dir"], values["json_out"] = str(config.work_dir), str(config.json_out)
    return values


def main(argv: list[str] | None = None) -> None:
    config = _arguments(argv)
    use_fake_aws_credentials()
    config.work_dir.mkdir(parents=True, exist_ok=True)
    measured: list[tuple[int, Figures]] = []
    for queries in config.queries:
        checkpoint = bench_checkpoint(config.work_dir, replace(BENCH_SHAPE, num_queries=queries))
        shutil.rmtree(config.work_dir / "redis", ignore_errors=True)
        print(f"-- {queries} queries per image (all kept at threshold {config.threshold:g})", flush=True)
        with redis_server(config.work_dir) as redis_url, s3_server(config.work_dir) as s3:
            figures = measure(config, checkpoint, redis_url, s3)
        print(report(figures, config), flush=True)
        measured.append((queries, figures))
    if len(measured) > 1:
        print("\n" + crowded_section(measured))
    if config.json_out:
        config.json_out.write_text(json.dumps([asdict(figures) for _, figures in measured], indent=2))


# ---------------------------------------------------------------------------------------------- report


def report(figures: Figures, config: Config) -> str:
    return "\n\n".join([
        f"# Pipeline bench\n{figures.machine}",
        efficiency_section(figures, config),
        naive_section(figures),
        stall_section(figures),
        encoding_section(figures),
        contention_section(figures),
    ])


def _default_run(figures: Figures) -> RunFigures:
    """The run with the worker's defaults (I/O in processes, two chunks in flight, chunks of 32), else the best."""
    preferred = [r for r in figures.runs
                 if (r.io_mode, r.pool, r.concurrency, r.chunk_size) == ("processes", "threads", 2, 32)]
    return preferred[0] if preferred else max(figures.runs, key=lambda r: r.efficiency)


def crowded_section(measured: list[tuple[int, Figures]]) -> str:
    """Pipeline against its naive loop at each instance count (the crowded case: dozens of masks per image)."""
    rows = []
    for _queries, figures in measured:
        run, naive = _default_run(figures), figures.naive
        if naive is None:
            continue
        rows.append((f"{run.ceiling.instances_per_image:.0f}", f"{naive.images_per_s:.2f}",
                     f"{run.images_per_s:.2f}", f"**{run.images_per_s / naive.images_per_s:.2f}x**",
                     f"{run.efficiency:.2f}", f"{run.stage_ms.get('model', 0.0):.0f}",
                     f"{naive.stage_ms.get('model', 0.0):.0f}",
                     " / ".join(f"{run.cpu_ms[name]:.0f}" for name in ("worker", "s3", "bench"))))
    header = ("instances per image", "naive loop images/s", "pipeline images/s", "pipeline ÷ naive",
              "pipeline ÷ bare model", "worker model stage ms/image", "naive model ms/image (batch of 1)",
              "CPU ms/image: worker / S3 server / submit")
    return "## Crowded images: the pipeline against its own naive loop, by instances per image\n" + table(header, rows)


def efficiency_section(figures: Figures, config: Config) -> str:
    run = _default_run(figures)
    ceiling, after = run.ceiling, figures.ceiling_after
    rows = [
        (f"bare model on pre-decoded tensors, all {config.images} images (at start / at end)",
         f"{figures.ceiling.bare:.2f} / {after.bare if after else 0.0:.2f}", ""),
        ("bare model, measured just before the end-to-end run", f"{ceiling.bare:.2f}", "1.00"),
        (f"model + post-processing to host bool masks ({ceiling.instances_per_image:.0f} masks per image)",
         f"{ceiling.segment:.2f}", f"{ceiling.segment / ceiling.bare:.2f}"),
        (f"end to end: S3 -> submit -> Redis -> worker ({run.label}, chunks of "
         f"{run.chunk_size}) -> S3", f"{run.images_per_s:.2f}", f"**{run.efficiency:.2f}**"),
    ]
    return (f"## 1. Pipeline efficiency (batch {config.batch_size}, {config.images} images, "
            f"model on {config.model_threads} core(s), {config.io_workers} loaders + {config.io_workers} writers)\n"
            + table(("path", "images/s", "÷ bare model"), rows)
            + f"\n\nend to end ÷ (model + post-processing): {run.images_per_s / ceiling.segment:.2f}")


def naive_section(figures: Figures) -> str:
    naive, run = figures.naive, _default_run(figures)
    if naive is None:
        return ""
    stages = ", ".join(f"{stage} {ms:.1f}" for stage, ms in naive.stage_ms.items())
    rows = [
        (f"naive loop, one image at a time ({naive.images} images)", f"{naive.images_per_s:.2f}",
         f"{naive.ceiling.bare:.2f}", "1.00"),
        (f"pipeline ({run.label}, chunks of {run.chunk_size})", f"{run.images_per_s:.2f}",
         f"{run.ceiling.bare:.2f}", f"**{run.images_per_s / naive.images_per_s:.2f}x**"),
    ]
    return ("## 2. Against the naive loop\n"
            + table(("path", "images/s", "bare model just before", "speed-up"), rows)
            + f"\n\nnaive loop, ms per image: {stages}")


def stall_section(figures: Figures) -> str:
    rows = []
    for run in figures.runs:
        # The model stage's share of the wall time (timed only while a batch has the model, in every pool).
        busy = run.stage_ms.get("model", 0.0) * run.images / 1000.0 / run.wall_s
        rows.append((run.io_mode, f"{run.pool} x{run.concurrency}", str(run.chunk_size), f"{run.images_per_s:.2f}",
                     f"{busy:.0%}",
                     f"{run.ceiling.bare:.2f}", f"{run.efficiency:.2f}",
                     f"{run.images_per_s / run.ceiling.segment:.2f}",
                     " / ".join(f"{run.cpu_ms[name]:.0f}" for name in ("worker", "s3", "bench")),
                     f"{run.worker_peak_rss_mb:.0f}", f"{run.stage_pss_mb:.0f}"))
    header = ("I/O stages in", "worker pool", "chunk size", "images/s", "model busy", "bare model just before",
              "÷ bare", "÷ model + post-processing", "CPU ms/image: worker / S3 server / submit",
              "worker peak RSS MiB", "stage processes PSS MiB")
    return ("## 3. Chunk boundaries and I/O placement: efficiency by chunk size, pool and io mode\n"
            + table(header, rows)
            + "\n\nworker model stage, ms per image (the model's own time; a chunk waiting for the other's "
              "batch does not count): "
            + ", ".join(f"{r.io_mode} {r.pool} x{r.concurrency} c{r.chunk_size} {r.stage_ms.get('model', 0.0):.0f}"
                        for r in figures.runs))


def encoding_section(figures: Figures) -> str:
    enc, naive, run = figures.encoding, figures.naive, _default_run(figures)
    if enc is None or naive is None:
        return ""
    before_output = sum(ms for stage, ms in naive.stage_ms.items() if stage != "encode_upload")
    rle_total = before_output + enc.ms["metadata"] + enc.ms["upload_metadata"]
    png_total = rle_total + enc.ms["png"] + enc.ms["upload_png"]
    rows = [
        ("RLE of every mask + metadata JSON", f"{enc.ms['metadata']:.2f}", f"{enc.ms['metadata'] / rle_total:.1%}",
         f"{enc.ms['metadata'] / png_total:.1%}"),
        ("metadata JSON upload", f"{enc.ms['upload_metadata']:.2f}", f"{enc.ms['upload_metadata'] / rle_total:.1%}",
         f"{enc.ms['upload_metadata'] / png_total:.1%}"),
        ("PNG of every mask (optional)", f"{enc.ms['png']:.2f}", "", f"{enc.ms['png'] / png_total:.1%}"),
        ("PNG uploads, one per mask (optional)", f"{enc.ms['upload_png']:.2f}", "",
         f"{enc.ms['upload_png'] / png_total:.1%}"),
        ("masked image as PNG (optional, not in the totals)", f"{enc.ms['masked_png']:.2f}", "", ""),
    ]
    worker = run.stage_ms
    thread_total = sum(worker.get(stage, 0.0) for stage in STAGES)
    return (f"## 4. Mask encoding and upload ({enc.masks_per_image:.0f} masks per image, {enc.images} images)\n"
            + table(("step", "ms per image", "share of sequential total, RLE only",
                     "share with PNG masks too"), rows)
            + f"\n\nsequential total per image: {rle_total:.1f} ms with RLE only, {png_total:.1f} ms with PNG "
              f"masks too.\nIn the worker ({run.label}, chunks of {run.chunk_size}), ms per "
              "image of stage time: " + ", ".join(f"{stage} {worker.get(stage, 0.0):.1f}" for stage in STAGES)
            + f"; encode+upload is {worker.get('encode_upload', 0.0) / thread_total:.1%} of it and runs in the "
              "writer pool, off the model's path.")


def contention_section(figures: Figures) -> str:
    found = figures.contention
    if found is None:
        return ""
    rows = [
        ("alone", f"{found.alone:.2f}", "1.00", ""),
        ("beside one thread doing the worker's I/O (same process, shared GIL)", f"{found.io_thread:.2f}",
         f"{found.io_thread / found.alone:.2f}", f"{found.io_images_per_s_thread:.1f}"),
        ("beside one process doing the same I/O (no shared GIL)", f"{found.io_process:.2f}",
         f"{found.io_process / found.alone:.2f}", f"{found.io_images_per_s_process:.1f}"),
    ]
    return ("## 5. The model thread and the GIL: bare model while the worker's I/O runs flat out\n"
            + table(("bare model", "images/s", "÷ alone", "I/O images/s meanwhile"), rows))


if __name__ == "__main__":
    main()
