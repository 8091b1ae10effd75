"""GPU bench: the full-size SAM 3 architecture (``Sam3Config()`` defaults, random weights) at 1008x1008.

    python -m bench.gpu                                   # any CUDA machine: every dtype x batch 1..32
    python -m bench.gpu --dtypes bfloat16 --batch-sizes 8,16 --compile
    python -m bench.gpu --device cpu --smoke              # a small config on the CPU: proves the script runs
    bench/gpu_session.sh                                  # the whole first GPU session, in one command
    python -m bench.host_budget --model full --services local   # host CPU per image by stage around the model

Random weights cost the same compute as the real ones (same shapes, same kernels), so images/s and memory
are what ``facebook/sam3`` gives; only the masks are meaningless. Their scores all fall near 0.2-0.3, so
end to end runs at score threshold 0 by default: every query is kept, upsampled and encoded, which is
the mask work of a crowded real image; instances per image are printed to show it. Prints, in one run:
  - the bare forward on pre-decoded, pre-resized tensors (``bench.common.bare_forward``, host-to-device
    copy included): images/s, ms/image and peak GPU memory (``torch.cuda.max_memory_allocated``) by
    dtype and batch size, and the batch size ``Sam3Runtime.suggest_batch_size`` picks from free memory;
  - each dtype's detections against float32's (scores, presence, boxes, mask pixels) on the same photos;
  - end-to-end efficiency: the product's ``process_chunk`` on JPEG photos in a local folder (read, decode,
    resize in threads; batched model; RLE + metadata JSON written in threads), one chunk at a time and two
    chunks at once (as ``--pool threads --concurrency 2``), divided by the bare forward at the same dtype
    and batch size; plus the model with post-processing alone (``Sam3Runtime.segment``).
Nothing touches CUDA before ``main`` runs.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, Sam3Config, Sam3Processor
from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

from bench.common import bare_forward, batches, machine_line, parse_size, photo, table
from sam3_batch.contracts.schemas import ChunkMessage, JobSpec, Thresholds, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.compile_toolchain import require_compile_toolchain
from sam3_batch.worker.model_input import PreparedImage
from sam3_batch.worker.pipeline import ChunkContext, process_chunk
from sam3_batch.worker.precision import keep_heads_in_float32, resolve_precision
from sam3_batch.worker.runtime import Sam3Runtime
from sam3_batch.worker.tiny_model import build_checkpoint, build_tokenizer

PROMPT = "object"
MIN_TIMED_S = 3.0  # each (dtype, batch) point runs at least this long, and at least MIN_ITERATIONS batches
MIN_ITERATIONS = 3


@dataclass(frozen=True)
class Config:
    device: str
    smoke: bool
    dtypes: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    compile: bool
    e2e_images: int
    e2e_dtype: str
    e2e_batch: int  # 0: the automatic batch size
    chunk_size: int
    photo_wh: tuple[int, int]
    io_workers: int
    io_mode: str
    threshold: float
    min_seconds: float


@dataclass(frozen=True)
class Point:
    dtype: str
    batch: int
    images_per_s: float | None  # None: out of memory
    peak_mib: float | None


def _arguments(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--smoke", action="store_true", help="a small config (hidden 32, 224 px): runs anywhere")
    parser.add_argument("--dtypes", default=None,
                        help="default: bfloat16,autocast-bf16,float16,float32 (float32 with --smoke)")
    parser.add_argument("--batch-sizes", default=None, help="default: 1,2,4,8,16,32 (1,2,4 with --smoke)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision encoder")
    parser.add_argument("--e2e-images", type=int, default=None, help="default 128 (8 with --smoke)")
    parser.add_argument("--e2e-dtype", default=None, help="default: the first of --dtypes")
    parser.add_argument("--e2e-batch", type=int, default=0, help="0: what suggest_batch_size picks")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--photo-size", default="1500x1000", help="end-to-end photo size WxH")
    parser.add_argument("--io-workers", type=int, default=6, help="loaders, and as many writers")
    parser.add_argument("--io-mode", default="processes", choices=("processes", "threads"),
                        help="where loaders and writers run")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="score threshold for end to end (0: every query kept, as in a crowded image)")
    parser.add_argument("--min-seconds", type=float, default=MIN_TIMED_S, help="least time per measured point")
    args = parser.parse_args(argv)
    default_dtypes = "float32" if args.smoke else "bfloat16,autocast-bf16,float16,float32"
    dtypes = tuple((args.dtypes or default_dtypes).split(","))
    sizes = args.batch_sizes or ("1,2,4" if args.smoke else "1,2,4,8,16,32")
    return Config(
        device=args.device, smoke=args.smoke, dtypes=dtypes, batch_sizes=tuple(int(b) for b in sizes.split(",")),
        compile=args.compile, e2e_images=args.e2e_images or (8 if args.smoke else 128),
        e2e_dtype=args.e2e_dtype or dtypes[0], e2e_batch=args.e2e_batch, chunk_size=args.chunk_size,
        photo_wh=parse_size(args.photo_size), io_workers=args.io_workers, io_mode=args.io_mode,
        threshold=args.threshold, min_seconds=args.min_seconds,
    )


# ---------------------------------------------------------------------------------------------- model


class Models:
    """One random-weight network, converted to each dtype in turn, wrapped as the product's runtime."""

    def __init__(self, device: str, *, smoke: bool, compile: bool, work_dir: Path) -> None:
        self.device = torch.device(device)
        self.compile = compile
        if smoke:
            checkpoint = build_checkpoint(work_dir / "smoke-checkpoint", hidden=32, layers=1, image_size=224,
                                          num_queries=20, scale_factors=(4.0, 2.0, 1.0, 0.5))
            sam3_config = Sam3Config.from_pretrained(checkpoint)
            self.processor = Sam3Processor.from_pretrained(checkpoint)
        else:
            sam3_config = Sam3Config()  # facebook/sam3's architecture: 840M parameters, 1008 px, 200 queries
            tokenizer = build_tokenizer()  # token ids only matter for their count (32 per prompt)
            self.processor = Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=tokenizer)
        with self.device:  # initialise on the device: 840M parameters initialise in seconds there
            self.network: Any = AutoModel.from_config(  # type: ignore[no-untyped-call]
                sam3_config, attn_implementation="sdpa", dtype=torch.float32
            )
        self.network.eval()
        # Float32 master weights on the host: each dtype starts from them, never from another dtype's roundings.
        self.master = {name: value.detach().cpu().clone() for name, value in self.network.state_dict().items()}
        keep_heads_in_float32(self.network)  # as Sam3Runtime.load does: inert outside autocast
        if compile:
            require_compile_toolchain(self.device.type)
            self.network.vision_encoder.compile()
        self.parameters = sum(p.numel() for p in self.network.parameters())

    def runtime(self, dtype_name: str) -> Sam3Runtime:
        precision = resolve_precision(dtype_name, self.device)
        self.network.to(torch.float32)
        self.network.load_state_dict(self.master)
        self.network.to(precision.weights)
        return Sam3Runtime(self.network, self.processor, model_id="random-sam3", revision=None,
                           device=self.device, dtype=precision.weights, precision=precision)


# ------------------------------------------------------------------------------------------ measuring


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _reset_peak(device: torch.device) -> None:
    if _cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if _cuda(device) else None


def bare_point(runtime: Sam3Runtime, images: list[PreparedImage], batch: int, min_seconds: float) -> Point:
    """Images/s of the bare forward at this batch size (2 warm-up batches), and its peak memory."""
    dtype_name = runtime.precision.name
    rows = [images[i % len(images)] for i in range(batch)]
    _reset_peak(runtime.device)
    try:
        for _ in range(2):
            bare_forward(runtime, rows, PROMPT)
        iterations, start = 0, time.perf_counter()
        while iterations < MIN_ITERATIONS or time.perf_counter() - start < min_seconds:
            bare_forward(runtime, rows, PROMPT)
            iterations += 1
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Point(dtype_name, batch, None, None)
    return Point(dtype_name, batch, batch * iterations / elapsed, _peak_mib(runtime.device))


def segment_images_per_s(runtime: Sam3Runtime, images: list[PreparedImage], batch: int, config: Config) -> float:
    """The model plus post-processing as an RLE-only job runs it (RLE, area and box from the device; no
    full-size mask crosses to the host), at this batch size."""
    rows = [images[i % len(images)] for i in range(batch)]
    thresholds = Thresholds(score=config.threshold)
    runtime.segment(rows, [[PROMPT]] * batch, thresholds, masks="none")
    iterations, start = 0, time.perf_counter()
    while iterations < MIN_ITERATIONS or time.perf_counter() - start < config.min_seconds:
        runtime.segment(rows, [[PROMPT]] * batch, thresholds, masks="none")
        iterations += 1
    return batch * iterations / (time.perf_counter() - start)


def precision_table(models: Models, dtypes: tuple[str, ...], photo_wh: tuple[int, int]) -> str:
    """Each dtype's detections against float32's on the same photos (every query kept): the worst gaps."""
    photos = [photo(photo_wh, seed) for seed in range(4)]
    thresholds = Thresholds(score=0.0)
    reference_runtime = models.runtime("float32")
    reference = reference_runtime.segment([reference_runtime.prepare(p) for p in photos], [[PROMPT]] * 4, thresholds)
    rows = []
    for dtype_name in (d for d in dtypes if d != "float32"):
        runtime = models.runtime(dtype_name)
        try:
            found = runtime.segment([runtime.prepare(p) for p in photos], [[PROMPT]] * 4, thresholds)
        except Exception as exc:  # NaN/inf in float16, say: that is the finding
            rows.append((dtype_name, f"failed: {type(exc).__name__}", "", "", ""))
            continue
        pairs = [(one, other) for [one], [other] in zip(found, reference, strict=True)]
        score = max(float(abs(one.scores - other.scores).max()) for one, other in pairs)
        presence = max(abs((one.presence_score or 0.0) - (other.presence_score or 0.0)) for one, other in pairs)
        box = max(float(abs(one.boxes_xyxy - other.boxes_xyxy).max()) for one, other in pairs)
        masks = max(float((one.masks != other.masks).mean()) for one, other in pairs)
        rows.append((dtype_name, f"{score:.2e}", f"{presence:.2e}", f"{box:.2f}", f"{100 * masks:.3f}"))
    return (f"precision against float32: {len(photos)} photos of {photo_wh[0]}x{photo_wh[1]}, every query kept, "
            "random weights (trained weights round differently)\n\n"
            + table(("dtype", "max Δ score", "max Δ presence", "max Δ box px", "mask pixels differing %"),
                    rows))


@dataclass(frozen=True)
class EndToEnd:
    batch: int
    bare: float
    segment: float
    one_chunk_at_a_time: float
    two_chunks_at_once: float
    instances_per_image: float


def _photo_folder(folder: Path, config: Config) -> list[WorkItem]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(config.e2e_images):
        path = folder / f"{index:05d}.jpg"
        photo(config.photo_wh, index).save(path, format="JPEG", quality=90)
        items.append(WorkItem(uri=f"file://{path}", out_key=path.name))
    return items


def _run_chunks(
    context: ChunkContext, spec: JobSpec, chunks: list[ChunkMessage], parallel: int
) -> tuple[float, float]:
    """Images/s of process_chunk over the chunks, ``parallel`` chunks at a time, and instances per image."""
    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda chunk: process_chunk(chunk, spec, context), chunks))
    elapsed = time.perf_counter() - start
    outcomes = [outcome for result in results for outcome in result.outcomes]
    done = [outcome for outcome in outcomes if outcome.status == "done"]
    if len(done) != sum(len(chunk.items) for chunk in chunks):
        raise RuntimeError(f"only {len(done)} images ended done: {outcomes[:3]}")
    return len(done) / elapsed, sum(outcome.instances or 0 for outcome in done) / len(done)


def end_to_end(runtime: Sam3Runtime, prepared: list[PreparedImage], config: Config, work_dir: Path) -> EndToEnd:
    """process_chunk on local JPEGs against the bare forward, at the same dtype and batch size."""
    # A chunk never makes a batch bigger than itself: compare at the batch size process_chunk really runs.
    batch = min(config.e2e_batch or runtime.suggest_batch_size(prompts_per_image=1), config.chunk_size)
    settings = Settings(device=config.device, batch_size=batch, io_workers=config.io_workers,
                        io_mode=config.io_mode)
    items = _photo_folder(work_dir / "photos", config)
    spec = JobSpec(job_id="gpu-bench", prompts=[PROMPT], thresholds=Thresholds(score=config.threshold),
                   output_root=f"file://{work_dir / 'out'}")
    chunks = [ChunkMessage(job_id=spec.job_id, chunk_id=f"c{index}", items=part)
              for index, part in enumerate(batches(items, config.chunk_size))]
    context = ChunkContext.create(runtime, Storage(settings), settings)
    try:
        _run_chunks(context, spec, chunks[:1], 1)  # warm-up: thread pools, allocator, any compilation
        sequential, instances = _run_chunks(context, spec, chunks, 1)
        parallel, _ = _run_chunks(context, spec, chunks, 2)
    finally:
        context.close()
    bare = bare_point(runtime, prepared, batch, config.min_seconds).images_per_s or 0.0
    segment = segment_images_per_s(runtime, prepared, batch, config)
    return EndToEnd(batch, bare, segment, sequential, parallel, instances)


# --------------------------------------------------------------------------------------------- report


def _device_line(device: torch.device) -> str:
    if not _cuda(device):
        return f"device: CPU ({torch.get_num_threads()} threads)"
    props = torch.cuda.get_device_properties(device)
    return f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"


def points_table(points: list[Point]) -> str:
    rows = []
    for p in points:
        if p.images_per_s is None:
            rows.append((p.dtype, str(p.batch), "OOM", "", ""))
            continue
        peak = f"{p.peak_mib:,.0f}" if p.peak_mib is not None else "n/a"
        rows.append((p.dtype, str(p.batch), f"{p.images_per_s:.2f}", f"{1000.0 / p.images_per_s:.1f}", peak))
    return table(("dtype", "batch", "images/s", "ms/image", "peak MiB"), rows)


def e2e_table(e2e: EndToEnd, config: Config) -> str:
    rows = [
        ("bare forward, pre-decoded tensors", f"{e2e.bare:.2f}", "1.00"),
        ("model + post-processing (RLE on the device)", f"{e2e.segment:.2f}", f"{e2e.segment / e2e.bare:.2f}"),
        ("process_chunk, one chunk at a time", f"{e2e.one_chunk_at_a_time:.2f}",
         f"**{e2e.one_chunk_at_a_time / e2e.bare:.2f}**"),
        ("process_chunk, two chunks at once", f"{e2e.two_chunks_at_once:.2f}",
         f"**{e2e.two_chunks_at_once / e2e.bare:.2f}**"),
    ]
    return (f"end to end: {config.e2e_images} JPEGs of {config.photo_wh[0]}x{config.photo_wh[1]} on local disk, "
            f"{config.e2e_dtype}, batch {e2e.batch}, chunks of {config.chunk_size}, {config.io_workers} loaders + "
            f"{config.io_workers} writers as {config.io_mode}, score threshold {config.threshold}: "
            f"{e2e.instances_per_image:.1f} instances per image\n\n"
            + table(("path", "images/s", "÷ bare"), rows))


def main(argv: list[str] | None = None) -> None:
    config = _arguments(argv)
    machine = machine_line()
    work_dir = Path(tempfile.mkdtemp(prefix="sam3-gpu-bench-"))
    try:
        models = Models(config.device, smoke=config.smoke, compile=config.compile, work_dir=work_dir)
        print(f"# GPU bench\n{machine}\n{_device_line(models.device)}\ncommand: python -m bench.gpu "
              f"{shlex.join(sys.argv[1:] if argv is None else argv)}\n"
              f"model: {'smoke config' if config.smoke else 'Sam3Config() defaults'}, "
              f"{models.parameters / 1e6:.1f}M parameters, random weights, compile={config.compile}", flush=True)
        points, e2e = [], None
        for dtype_name in config.dtypes:
            runtime = models.runtime(dtype_name)
            prepared = [runtime.prepare(photo(config.photo_wh, seed)) for seed in range(4)]
            for batch in config.batch_sizes:
                points.append(bare_point(runtime, prepared, batch, config.min_seconds))
                print(f"  {points[-1]}", flush=True)
                if points[-1].images_per_s is None:
                    break
            if _cuda(models.device):
                print(f"  suggest_batch_size ({dtype_name}, 1 prompt): {runtime.suggest_batch_size(1)}", flush=True)
            if dtype_name == config.e2e_dtype:
                e2e = end_to_end(runtime, prepared, config, work_dir)
        print("\n" + points_table(points))
        if e2e is not None:
            print("\n" + e2e_table(e2e, config))
        if len(config.dtypes) > 1:
            print("\n" + precision_table(models, config.dtypes, config.photo_wh), flush=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
