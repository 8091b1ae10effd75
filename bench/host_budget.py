"""Host budget: host CPU per image at real photo sizes, with a stand-in accelerator (bench/stand_in.py).

    python -m bench.host_budget             # 1500x1000 and 4000x3000 JPEGs, PNGs, PNG-mask outputs, variants: ~5 min
    python -m bench.host_budget --quick     # 1500x1000 JPEGs only, a few images: ~1 min (the test runs it)

The worker's real chunk path runs in this process, as the worker runs it: ``process_chunk`` with loader and
writer stage processes (forkserver), a SeaweedFS S3 server (its own process), and a private Redis where each
chunk is recorded (``record_chunk``: the chunk's Parquet part, then its counters), two chunks in flight (the
worker's default). The model is the product's ``Sam3Runtime`` over a stand-in for SAM 3 that holds each batch
a fixed time per image with the GIL released and returns SAM 3-shaped outputs (4 prompts x 5 kept instances
per image by default), so the real post-processing, RLE, JSON and uploads run on realistic masks.

Printed per case: host CPU ms per image by process and step (per-process CPU times; the S3 server and Redis
apart), the device-side work this CPU does for the stand-in (kept out of the host figure), end-to-end
images/s against the stand-in's rate, bytes host->device and device->host per image, peak RSS and shared
memory. Device-side post-processing (upsampling + thresholding full-size masks: a few kernels on a GPU) is
memoised here after its first run per shape, because on this CPU it would cost several times the stand-in's
whole budget; its first-run cost is shown as "device work emulated on the CPU".
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from bench.common import (
    DEFAULT_WORK_DIR,
    descendants,
    machine_line,
    parse_size,
    process_cpu_seconds,
    redis_server,
    s3_server,
    table,
    use_fake_aws_credentials,
)
from bench.host_accounting import (
    AccountedRuntime,
    CountingPool,
    DeviceWork,
    MemorySampler,
    ModelCounters,
    device_side_accounted,
    reset_peak_rss,
    vm_kib,
)
from bench.stand_in import StandInSam3, stand_in_runtime
from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.schemas import ChunkMessage, JobSpec, OutputOptions, Thresholds, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.decode import decode_image
from sam3_batch.worker.io_stages import LoaderSetup, WriterSetup, pixel_slots_for
from sam3_batch.worker.model_input import PixelHandOff
from sam3_batch.worker.pipeline import ChunkContext, pending_writes_limit, process_chunk
from sam3_batch.worker.runtime import Sam3Runtime

BUCKET = "hostbudget"
LARGE_PIXELS = 4_000_000
PROMPTS = ["person", "car", "dog", "tree"]


@dataclass(frozen=True)
class Case:
    """One measured job: its inputs, outputs, the stand-in's speed and the worker's variant."""

    kind: str  # jpeg | png
    size_wh: tuple[int, int]
    ms_per_image: float
    png_masks: bool = False
    layout: Literal["image", "chunk"] = "image"  # chunk: a Parquet shard per chunk, no per-image JSON (at scale)
    hand_off: PixelHandOff = "uint8"
    draft: bool = True

    @property
    def inputs(self) -> str:
        return f"{self.kind}-{self.size_wh[0]}x{self.size_wh[1]}"

    @property
    def label(self) -> str:
        outputs = "RLE + PNG masks" if self.png_masks else "RLE"
        outputs += ", chunk layout" if self.layout == "chunk" else ""
        draft = "draft" if self.draft else "full decode"
        speed = f"{self.ms_per_image:g} ms/image" if self.ms_per_image else "the model"
        return f"{self.kind.upper()} {self.size_wh[0]}x{self.size_wh[1]}, {outputs}, {speed}, {self.hand_off}, {draft}"


@dataclass(frozen=True)
class Config:
    images: int
    cases: tuple[Case, ...]
    batch_size: int
    chunk_size: int
    io_workers: int
    instances: int
    queries: int
    work_dir: Path
    model: str = "stand-in"  # stand-in | full (SAM 3's architecture, random weights) | smoke (its CPU-sized config)
    device: str = "cpu"
    dtype: str = "float32"
    services: str = "s3"  # s3: SeaweedFS + Redis; local: files on disk, no Redis (a GPU machine has neither)
    threshold: float | None = 0.5  # None: chosen so the real model keeps ~``instances`` per prompt
    large_images: int = 16  # images per case above LARGE_PIXELS (their masks take long to RLE on the host)

    def images_for(self, case: Case) -> int:
        return min(self.images, self.large_images) if case.size_wh[0] * case.size_wh[1] > LARGE_PIXELS else self.images

    @property
    def stand_in(self) -> bool:
        return self.model == "stand-in"


def _arguments(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1500x1000 JPEGs only, few images (for the test)")
    parser.add_argument("--images", type=int, default=None, help="images per case (default 256, quick 12)")
    parser.add_argument("--large-images", type=int, default=16, help="images per case of the large size")
    parser.add_argument("--size", default="1500x1000", help="the main photo size WxH")
    parser.add_argument("--large-size", default="4000x3000", help="the large photo size WxH")
    parser.add_argument("--instances", type=int, default=5, help="kept instances per prompt (4 prompts)")
    parser.add_argument("--queries", type=int, default=10, help="the stand-in's queries per prompt row")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=32, help="the worker's default")
    parser.add_argument("--io-workers", type=int, default=0,
                        help="loader processes, and as many writers (0: the worker's default for this machine)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help=f"default: a new folder under {DEFAULT_WORK_DIR}, removed at the end")
    parser.add_argument("--model", default="stand-in", choices=("stand-in", "full", "smoke"),
                        help="full: SAM 3's architecture with random weights (bench.gpu), on --device")
    parser.add_argument("--device", default=None, help="default: cpu for the stand-in, cuda for the full model")
    parser.add_argument("--dtype", default=None, help="the real model's dtype (default bfloat16 on cuda)")
    parser.add_argument("--services", default="s3", choices=("s3", "local"),
                        help="local: inputs and outputs on local disk and no Redis (for a GPU machine)")
    args = parser.parse_args(argv)
    size, large = parse_size(args.size), parse_size(args.large_size)
    device = args.device or ("cpu" if args.model != "full" else "cuda")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if args.model != "stand-in":
        # The real model sets its own pace: each case once, at the worker's defaults and the old path.
        cases: tuple[Case, ...] = (
            Case("jpeg", size, 0.0), Case("jpeg", size, 0.0, hand_off="normalized", draft=False),
            Case("jpeg", size, 0.0, png_masks=True),
        ) + (() if args.quick else (Case("jpeg", large, 0.0), Case("png", size, 0.0)))
    elif args.quick:
        cases = (Case("jpeg", size, 30.0), Case("jpeg", size, 30.0, hand_off="normalized"))
    else:
        cases = (
            Case("jpeg", size, 30.0), Case("jpeg", size, 10.0), Case("jpeg", large, 30.0), Case("png", size, 30.0),
            Case("jpeg", size, 30.0, png_masks=True), Case("jpeg", size, 30.0, layout="chunk"),
            # The variants the defaults were chosen against (bench/RESULTS.md, "Host budget").
            Case("jpeg", size, 30.0, hand_off="normalized", draft=False),
            Case("jpeg", large, 30.0, hand_off="normalized", draft=False),
            Case("jpeg", large, 30.0, draft=False),
        )
    images = args.images or (12 if args.quick else 256)
    io_workers = Settings(io_workers=args.io_workers).io_worker_count()
    return Config(images, cases, args.batch_size, args.chunk_size, io_workers, args.instances, args.queries,
                  args.work_dir or _new_work_dir(), args.model, device, dtype, args.services,
                  threshold=0.5 if args.model == "stand-in" else None, large_images=args.large_images)


def _new_work_dir() -> Path:
    DEFAULT_WORK_DIR.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="host-budget-", dir=DEFAULT_WORK_DIR))


# ------------------------------------------------------------------------------------------------- inputs


def photo_like(size_wh: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like image: smooth colour fields, soft-edged shapes, fine texture and mild sensor noise
    (compresses like a photo: ~0.32 bytes per pixel as a quality-90 JPEG, 3.9 MB at 4000x3000; neither
    the ~0.14 of smooth content nor the megabytes of pure noise)."""
    width, height = size_wh
    rng = np.random.default_rng(seed)
    colours = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8))
    image = colours.resize(size_wh, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 30, width // 4)), int(rng.integers(height // 30, height // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=max(1.0, width / 1500)))
    pixels = np.asarray(image, dtype=np.int16)
    texture = rng.normal(0.0, 10.0, size=(height // 2 + 1, width // 2 + 1)).repeat(2, 0).repeat(2, 1)
    noisy = pixels + texture[:height, :width, None] + rng.normal(0.0, 3.0, size=pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


def encoded(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90) if kind == "jpeg" else image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload_inputs(settings: Settings, config: Config) -> dict[str, list[str]]:
    """Each case's input set (a few distinct photos, cycled) in the bucket or a local folder; their URIs."""
    local = config.services == "local"
    if local:
        root = f"file://{config.work_dir / 'inputs'}"
    else:
        import boto3  # here: a GPU machine (--services local) may not have it

        boto3.session.Session().client("s3", endpoint_url=settings.s3_endpoint_url).create_bucket(Bucket=BUCKET)
        root = f"s3://{BUCKET}"
    storage = Storage(settings)
    uris: dict[str, list[str]] = {}
    for case in config.cases:
        if case.inputs in uris:
            continue
        files = [encoded(photo_like(case.size_wh, seed), case.kind) for seed in range(min(config.images, 4))]
        extension = "jpg" if case.kind == "jpeg" else "png"
        count = config.images_for(case)
        uris[case.inputs] = [f"{root}/{case.inputs}/{index:04d}.{extension}" for index in range(count)]
        for index, uri in enumerate(uris[case.inputs]):
            storage.write_bytes(uri, files[index % len(files)], "image/jpeg" if case.kind == "jpeg" else "image/png")
        print(f"inputs: {case.inputs}, {sum(map(len, files)) / len(files) / 1024:.0f} KiB on average", flush=True)
    return uris


# ------------------------------------------------------------------------------------------- the runs


@dataclass
class CaseFigures:
    case: Case
    images: int
    wall_s: float
    cpu_ms: dict[str, float]  # per image, by process group
    step_ms: dict[str, float]  # per image, by step (thread CPU inside the steps)
    device_ms: float  # per image: device work emulated on this CPU
    model: ModelCounters
    held_ms: float  # per image: the stand-in's fixed time
    peak_rss_mib: dict[str, float]
    peak_shm_mib: float
    model_window_s: float  # from the model's first batch to the end of its last: the job less its ramp and tail

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def host_ms(self) -> float:
        return sum(self.cpu_ms[name] for name in ("loaders", "writers", "worker (host)", "forkserver"))


@dataclass
class Worker:
    """What one worker variant (hand-off, draft) holds: the runtime, its stage pools, the chunk context."""

    runtime: Sam3Runtime
    accounted: AccountedRuntime
    ctx: ChunkContext
    loaders: CountingPool[Any]
    writers: CountingPool[Any]

    def close(self) -> None:
        self.ctx.close()


def build_runtime(config: Config) -> Sam3Runtime:
    """The stand-in, or the real architecture (random weights) as ``bench.gpu`` builds it."""
    if config.stand_in:
        return stand_in_runtime(30.0, config.instances, config.queries, config.device)
    from bench.gpu import Models  # torch on the device only from here

    models = Models(config.device, smoke=config.model == "smoke", compile=False, work_dir=config.work_dir)
    return models.runtime(config.dtype)


def start_worker(config: Config, settings: Settings, runtime: Sam3Runtime, hand_off: PixelHandOff,
                 draft: bool, work: DeviceWork) -> Worker:
    runtime.preparer = replace(runtime.preparer, hand_off=hand_off)
    accounted = AccountedRuntime(runtime, work)
    preload = ["sam3_batch.worker.io_stages", "sam3_batch.worker.runtime"]
    slots = pixel_slots_for(settings, runtime.preparer, "processes")
    loaders: CountingPool[Any] = CountingPool("loader", LoaderSetup(settings, runtime.preparer, draft=draft,
                                                                    slots=slots),
                                              mode="processes", workers=config.io_workers, preload=preload)
    writers: CountingPool[Any] = CountingPool("writer", WriterSetup(settings), mode="processes",
                                              workers=config.io_workers, preload=preload)
    ctx = ChunkContext(runtime=accounted, storage=Storage(settings), settings=settings, loaders=loaders,
                       writers=writers, write_slots=threading.Semaphore(pending_writes_limit(settings)))
    return Worker(runtime, accounted, ctx, loaders, writers)


def calibrated_threshold(runtime: Sam3Runtime, uris: list[str], settings: Settings, config: Config) -> float:
    """A score threshold at which the real model keeps about ``instances`` of its queries per prompt
    (random weights score every query alike, ~0.2-0.3: a fixed threshold keeps none or all of them)."""
    storage = Storage(settings)
    images = [runtime.prepare(decode_image(storage.read_bytes(uri), max_pixels=settings.max_image_pixels))
              for uri in uris[:2]]
    found = runtime.segment(images, [PROMPTS] * len(images), Thresholds(score=0.0, mask=0.5))
    scores = np.concatenate([d.scores for per_image in found for d in per_image])
    per_prompt = len(scores) / (len(images) * len(PROMPTS))
    return float(np.quantile(scores, max(0.0, 1.0 - config.instances / per_prompt)))


def run_job(worker: Worker, store: RedisJobStore | None, uris: list[str], case: Case, job_id: str,
            config: Config, threshold: float) -> None:
    """The job's chunks through ``process_chunk`` two at a time, each recorded in Redis as the task does."""
    root = f"file://{config.work_dir / 'out'}" if store is None else f"s3://{BUCKET}/out"
    spec = JobSpec(job_id=job_id, prompts=PROMPTS, thresholds=Thresholds(score=threshold, mask=0.5),
                   outputs=OutputOptions(png_masks=case.png_masks, layout=case.layout), output_root=f"{root}/{job_id}/",
                   model_id=worker.runtime.model_id)
    if store is not None:
        store.create(spec)
    chunk_size = config.chunk_size
    items = [WorkItem(uri=uri, out_key=uri.rsplit("/", 1)[-1]) for uri in uris]
    chunks = [ChunkMessage(job_id=job_id, chunk_id=f"c{start:05d}", items=items[start:start + chunk_size])
              for start in range(0, len(items), chunk_size)]

    def one(chunk: ChunkMessage) -> int:
        result = process_chunk(chunk, spec, worker.ctx)
        if store is not None:
            # Here: the Parquet part needs pyarrow, which a GPU machine (--services local) may not have.
            from sam3_batch.worker.chunk_record import record_chunk

            record_chunk(store, worker.ctx.storage, spec, chunk, result, generation=chunk.generation)
        return sum(1 for outcome in result.outcomes if outcome.status == "done")

    with ThreadPoolExecutor(2, thread_name_prefix="hb-chunk") as chunks_in_flight:
        done = sum(chunks_in_flight.map(one, chunks))
    if done != len(uris):
        raise RuntimeError(f"job {job_id}: {done} of {len(uris)} images done (see the job's failures in Redis)")


def measure_case(worker: Worker, store: RedisJobStore | None, uris: list[str], case: Case, config: Config,
                 service_pids: dict[str, int], work: DeviceWork, index: int, threshold: float) -> CaseFigures:
    model = worker.runtime.model
    if isinstance(model, StandInSam3):
        model.ms_per_image = case.ms_per_image
        model.device_clock = lambda: work.cpu_s
        work.constant = model.owns
    # Warm: the pools, the memo, and the pixel slots a job's two chunks in flight use (their shared pages are
    # made resident on first use, once per worker: ~1.5 ms per image over a first 256-image job).
    run_job(worker, store, uris[: 2 * config.chunk_size], case, f"warm{index}", config, threshold)
    held_before = model.counters.held_s if isinstance(model, StandInSam3) else 0.0
    own = os.getpid()
    loader_pids, writer_pids = worker.loaders.worker_pids(), worker.writers.worker_pids()
    services = set(service_pids.values())
    services |= {child for pid in service_pids.values() for child in descendants(pid)}
    # Our other children: the forkserver (and the resource tracker); the services are counted apart.
    forkservers = [pid for pid in descendants(own) if pid not in {*loader_pids, *writer_pids, *services}]
    groups = {"loaders": loader_pids, "writers": writer_pids, "worker": [own], "forkserver": forkservers,
              "S3 server": [service_pids["s3"]] if "s3" in service_pids else [],
              "Redis": [service_pids["redis"]] if "redis" in service_pids else []}
    reset_peak_rss([own, *loader_pids, *writer_pids])
    before = {name: _cpu_s(pids) for name, pids in groups.items()}
    steps_before = {**worker.loaders.step_cpu_ms, **worker.writers.step_cpu_ms}
    model_before, device_before = replace(worker.accounted.counters), work.cpu_s
    start, spans_before = time.perf_counter(), len(worker.accounted.spans)
    with MemorySampler(lambda: [own, *loader_pids, *writer_pids]) as memory:
        run_job(worker, store, uris, case, f"job{index}", config, threshold)
    wall = time.perf_counter() - start
    spans = worker.accounted.spans[spans_before:]
    model_window = max(end for _, end in spans) - min(begin for begin, _ in spans)
    n = len(uris)
    cpu_ms = {name: 1000.0 * (_cpu_s(pids) - before[name]) / n for name, pids in groups.items()}
    device_ms = 1000.0 * (work.cpu_s - device_before) / n
    cpu_ms["worker (host)"] = cpu_ms["worker"] - device_ms
    steps_after = {**worker.loaders.step_cpu_ms, **worker.writers.step_cpu_ms}
    step_ms = {step: (ms - steps_before.get(step, 0.0)) / n for step, ms in steps_after.items()}
    now = worker.accounted.counters
    delta = ModelCounters(*(getattr(now, f) - getattr(model_before, f) for f in ModelCounters.__dataclass_fields__))
    rss = {"worker": vm_kib(own, "VmHWM") / 1024,
           "stage processes (sum)": sum(vm_kib(pid, "VmHWM") for pid in [*loader_pids, *writer_pids]) / 1024}
    held_ms = 1000.0 * (model.counters.held_s - held_before) / n if isinstance(model, StandInSam3) else 0.0
    return CaseFigures(case, n, wall, cpu_ms, step_ms, device_ms, delta, held_ms, rss, memory.peak_kib / 1024,
                       model_window)


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += process_cpu_seconds(pid)
        except OSError:
            continue
    return total


@contextmanager
def services(config: Config) -> Iterator[tuple[Settings, RedisJobStore | None, dict[str, int]]]:
    """Settings for the worker, the job store (None without Redis) and the service pids whose CPU is apart."""
    base: dict[str, Any] = {"model": "unset", "device": config.device, "dtype": config.dtype,
                            "batch_size": config.batch_size, "io_workers": config.io_workers}
    if config.services == "local":
        yield Settings(**base), None, {}
        return
    with redis_server(config.work_dir) as redis_url, s3_server(config.work_dir) as s3:
        store = RedisJobStore(redis_url)
        redis_pid = int(store.client.info("server")["process_id"])
        yield Settings(broker_url=redis_url, s3_endpoint_url=s3.url, **base), store, {"s3": s3.pid, "redis": redis_pid}


def measure(config: Config) -> tuple[list[CaseFigures], float]:
    """Every case; and the score threshold used."""
    use_fake_aws_credentials()
    shutil.rmtree(config.work_dir, ignore_errors=True)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    if config.device == "cpu":
        torch.set_num_threads(1)  # the "device" work in this process on one core; its CPU is counted apart
    results: list[CaseFigures] = []
    work = DeviceWork()
    with services(config) as (settings, store, service_pids):
        uris = upload_inputs(settings, config)
        runtime = build_runtime(config)
        threshold = config.threshold
        if threshold is None:
            threshold = calibrated_threshold(runtime, uris[config.cases[0].inputs], settings, config)
        variants = list(dict.fromkeys((case.hand_off, case.draft) for case in config.cases))
        # Only the stand-in's "device" is this CPU: a real device's work is its own, never counted here.
        with device_side_accounted(work) if config.stand_in else nullcontext():
            for hand_off, draft in variants:
                worker = start_worker(config, settings, runtime, hand_off, draft, work)
                try:
                    for case in config.cases:
                        if (case.hand_off, case.draft) != (hand_off, draft):
                            continue
                        figures = measure_case(worker, store, uris[case.inputs], case, config, service_pids, work,
                                               len(results), threshold)
                        results.append(figures)
                        print(f"  {case.label}: host {figures.host_ms:.1f} ms/image, "
                              f"{figures.images_per_s:.1f} images/s", flush=True)
                finally:
                    worker.close()
    return results, threshold


# --------------------------------------------------------------------------------------------- report


def report(results: list[CaseFigures], config: Config, threshold: float) -> str:
    header = ["case"] + [r.case.label for r in results]
    rows: list[list[str]] = []

    def row(name: str, values: Callable[[CaseFigures], str]) -> None:
        rows.append([name] + [values(r) for r in results])

    row("**host CPU ms/image** (loaders + writers + worker host part + forkserver)", lambda r: f"**{r.host_ms:.1f}**")
    row("loader processes", lambda r: f"{r.cpu_ms['loaders']:.1f}")
    for step in ("download", "decode", "preprocess", "hand-off"):
        row(f"- {step} (step's own CPU)", lambda r, s=step: f"{r.step_ms.get(s, 0.0):.1f}")  # type: ignore[misc]
    row("writer processes", lambda r: f"{r.cpu_ms['writers']:.1f}")
    row("- encode + upload (step's own CPU)", lambda r: f"{r.step_ms.get('encode + upload', 0.0):.1f}")
    row("worker process, host part", lambda r: f"{r.cpu_ms['worker (host)']:.1f}")
    row("- of it in the model call (stacking, copies, post-processing's host side)",
        lambda r: f"{1000.0 * r.model.thread_cpu_s / r.images - r.device_ms:.1f}")
    row("forkserver", lambda r: f"{r.cpu_ms['forkserver']:.1f}")
    row("device work emulated on this CPU (not host)", lambda r: f"{r.device_ms:.1f}")
    row("S3 server (apart)", lambda r: f"{r.cpu_ms['S3 server']:.1f}")
    row("Redis (apart)", lambda r: f"{r.cpu_ms['Redis']:.2f}")
    row("stand-in held, ms/image (its rate's time less the device work done on this CPU)",
        lambda r: f"{r.held_ms:.1f}")
    row("model stage wall, ms/image", lambda r: f"{1000.0 * r.model.wall_s / r.images:.1f}")
    row("end to end, images/s", lambda r: f"{r.images_per_s:.1f}")
    row("**÷ the stand-in's rate**",
        lambda r: f"**{r.images_per_s * r.case.ms_per_image / 1000.0:.2f}**" if r.case.ms_per_image else "n/a")
    row("÷ the model stage's own rate", lambda r: f"{r.images_per_s * r.model.wall_s / r.images:.2f}")
    row("from the model's first batch to its last (no first loads, no last writes) ÷ the stand-in's rate",
        lambda r: f"{r.images / r.model_window_s * r.case.ms_per_image / 1000.0:.2f}" if r.case.ms_per_image
        else "n/a")
    row("instances per image", lambda r: f"{r.model.instances / r.images:.1f}")
    row("host->device bytes/image", lambda r: f"{r.model.host_to_device_bytes / r.images / 1e6:.2f} MB")
    row("device->host bytes/image", lambda r: f"{r.model.device_to_host_bytes / r.images / 1e6:.2f} MB")
    row("peak RSS worker / stage processes (sum), MiB",
        lambda r: f"{r.peak_rss_mib['worker']:.0f} / {r.peak_rss_mib['stage processes (sum)']:.0f}")
    row("peak shared memory mapped (worker + stages), MiB", lambda r: f"{r.peak_shm_mib:.0f}")
    transposed = table(header, rows)
    model = (f"stand-in accelerator ({config.queries} queries per prompt)" if config.stand_in
             else f"{config.model} SAM 3 (random weights) on {config.device} in {config.dtype}")
    where = "SeaweedFS S3 + Redis" if config.services == "s3" else "local disk, no Redis"
    return (f"# Host budget\n{machine_line()}\n\n{model}; {where}; {config.images} images per case "
            f"({config.large_images} above {LARGE_PIXELS / 1e6:g} MP), "
            f"{len(PROMPTS)} prompts, score threshold {threshold:.4g} (target {config.instances} kept instances per "
            f"prompt), batch {config.batch_size}, chunks of {config.chunk_size}, two in flight, {config.io_workers} "
            f"loader + {config.io_workers} writer processes\n\n" + transposed)


def main(argv: list[str] | None = None) -> None:
    config = _arguments(argv)
    try:
        results, threshold = measure(config)
    finally:
        shutil.rmtree(config.work_dir, ignore_errors=True)
    print(report(results, config, threshold))


if __name__ == "__main__":
    main()
