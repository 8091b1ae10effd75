"""Prompts bench: what 1, 4 and 16 prompts per image cost, relative to 1, with the product's runtime.

    python -m bench.prompts                                   # the CPU bench model, ~1.5 minutes on 2 cores
    python -m bench.prompts --device cuda --full-size         # SAM 3's real architecture on a GPU (bf16)

Per prompt count P, on the same pre-decoded images, all through ``Sam3Runtime.segment`` (one vision pass
per image, one detector row per image-prompt pair, text embeddings cached for the life of the runtime):
  - model: score threshold 1.0, so no instance is kept: the forward passes and scoring alone;
  - + masks + RLE: score threshold 0, so every query is kept (full-size bool masks on the host), plus the
    COCO RLE of each: the heaviest output load;
  - separate calls: the same P prompts as P one-prompt calls (the vision encoder runs P times), which is
    what a per-image, per-prompt API costs;
  - text: what the text-embedding cache saves a call with P prompts (tokenising + the text encoder).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    DEFAULT_WORK_DIR,
    batches,
    bench_checkpoint,
    load_runtime,
    machine_line,
    parse_size,
    photo,
    prepare_all,
    table,
)
from sam3_batch.contracts.schemas import Thresholds
from sam3_batch.worker.encode import encode_rle_batch
from sam3_batch.worker.model_input import PreparedImage
from sam3_batch.worker.runtime import Sam3Runtime

WORDS = ("person", "car", "dog", "tree", "building", "sky", "road", "bicycle", "cat", "bird", "chair",
         "table", "bottle", "window", "door", "plant", "boat", "sign", "book", "phone")
NOTHING_KEPT = Thresholds(score=1.0)  # scores are products of sigmoids: never above 1
EVERYTHING_KEPT = Thresholds(score=0.0)
REPEATS = 2


@dataclass(frozen=True)
class Config:
    images: int
    size_wh: tuple[int, int]
    batch_size: int
    prompt_counts: tuple[int, ...]
    model_threads: int
    device: str
    full_size: bool
    dtype: str
    work_dir: Path


@dataclass(frozen=True)
class Row:
    prompts: int
    model_ms: float  # per image
    with_masks_ms: float  # per image, every query kept, RLE included
    masks_per_image: float
    separate_ms: float  # per image
    text_ms: float  # per call with P new prompts


def _arguments(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", default="640x480", help="photo size WxH")
    parser.add_argument("--batch-size", type=int, default=4, help="images per model call")
    parser.add_argument("--prompts", default="1,4,16", help="prompt counts per image, comma-separated")
    parser.add_argument("--model-threads", type=int, default=1, help="CPU threads (CPU only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="Sam3Config() defaults, random weights (GPU)")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    args = parser.parse_args(argv)
    counts = tuple(int(c) for c in args.prompts.split(","))
    if max(counts) > len(WORDS):
        parser.error(f"at most {len(WORDS)} prompts per image")
    if args.device != "cpu" and not args.full_size:
        parser.error("the bench model runs on the CPU; use --full-size with --device cuda")
    return Config(args.images, parse_size(args.size), args.batch_size, counts, args.model_threads, args.device,
                  args.full_size, args.dtype, args.work_dir)


def _seconds(runtime: Sam3Runtime, prepared: list[PreparedImage], prompts: list[str], batch_size: int,
             thresholds: Thresholds, kept: list[int] | None = None) -> float:
    """Seconds to segment every image with these prompts; with ``kept``, every mask is RLE-encoded and counted."""
    start = time.perf_counter()
    for batch in batches(prepared, batch_size):
        for per_image in runtime.segment(batch, [prompts] * len(batch), thresholds):
            for found in per_image:
                if kept is not None:
                    encode_rle_batch(found.masks)
                    kept.append(len(found))
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    return time.perf_counter() - start


def measure(runtime: Sam3Runtime, prepared: list[PreparedImage], count: int, config: Config) -> Row:
    """Each figure is the best of ``REPEATS`` runs: the least disturbed by whatever else the machine does."""
    prompts, size = list(WORDS[:count]), config.batch_size
    runtime.segment(prepared[:1], [prompts], NOTHING_KEPT)  # caches the text embeddings, warms the shapes
    model_s = min(_seconds(runtime, prepared, prompts, size, NOTHING_KEPT) for _ in range(REPEATS))
    kept: list[int] = []
    with_masks_s = min(_seconds(runtime, prepared, prompts, size, EVERYTHING_KEPT, kept) for _ in range(REPEATS))
    separate_s = min(sum(_seconds(runtime, prepared, [p], size, NOTHING_KEPT) for p in prompts)
                     for _ in range(REPEATS))
    text_s = min(_text_seconds(runtime, prepared[:size], count, round_) for round_ in range(REPEATS))
    per_image = 1000.0 / len(prepared)
    return Row(count, model_s * per_image, with_masks_s * per_image, sum(kept) / len(kept) * count,
               separate_s * per_image, 1000.0 * text_s)


def _text_seconds(runtime: Sam3Runtime, batch: list[PreparedImage], count: int, round_: int) -> float:
    """What the cache saves a call with ``count`` prompts: tokenising them and running the text encoder."""
    del batch  # the text encoder does not see the images
    fresh = [f"{word} number {count} round {round_}" for word in WORDS[:count]]
    start = time.perf_counter()
    with torch.inference_mode():
        tokens = runtime.processor.tokenizer(fresh, padding="max_length", max_length=32, truncation=True,
                                             return_tensors="pt").to(runtime.device)
        runtime.model.get_text_features(**tokens)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    return time.perf_counter() - start


def report(rows: list[Row], config: Config, header_lines: str) -> str:
    base = rows[0]
    lines = [(
        str(row.prompts), f"{row.model_ms:.1f}", f"**{row.model_ms / base.model_ms:.2f}**",
        f"{row.separate_ms:.1f}", f"{row.separate_ms / row.model_ms:.2f}x",
        f"{row.with_masks_ms:.1f} ({row.masks_per_image:.0f} masks)", f"{row.with_masks_ms / base.with_masks_ms:.2f}",
        f"{row.text_ms:.1f}",
    ) for row in rows]
    header = ("prompts per image", "model ms/image", "÷ 1 prompt", "as separate one-prompt calls ms/image",
              "one vision pass saves", "+ every mask to host + RLE ms/image", "÷ 1 prompt",
              "new prompts' text encoding, ms per call")
    return f"# Prompts bench\n{header_lines}\n\n" + table(header, lines)


def _runtime(config: Config, work_dir: Path) -> tuple[Sam3Runtime, str]:
    if not config.full_size:
        runtime = load_runtime(bench_checkpoint(config.work_dir), config.model_threads)
        return runtime, f"model: the CPU bench model on {config.model_threads} core(s)"
    from bench.gpu import Models

    models = Models(config.device, smoke=False, compile=False, work_dir=work_dir)
    runtime = models.runtime(config.dtype)
    return runtime, f"model: Sam3Config() defaults, random weights, {runtime.dtype} on {runtime.device}"


def main(argv: list[str] | None = None) -> None:
    config = _arguments(argv)
    machine = machine_line()
    work_dir = Path(tempfile.mkdtemp(prefix="sam3-prompts-bench-"))
    try:
        runtime, model_line = _runtime(config, work_dir)
        prepared = prepare_all(runtime, [photo(config.size_wh, seed) for seed in range(config.images)])
        rows = []
        for count in config.prompt_counts:
            rows.append(measure(runtime, prepared, count, config))
            print(f"  {count} prompts: {rows[-1].model_ms:.1f} ms per image", flush=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    header = (f"{machine}\n{model_line}\n{config.images} images of {config.size_wh[0]}x{config.size_wh[1]}, "
              f"batch {config.batch_size} images")
    print(report(rows, config, header))


if __name__ == "__main__":
    main()
