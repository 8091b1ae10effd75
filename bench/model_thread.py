"""CPU time of the model's thread per image on a CPU "device": the model alone, ``segment`` with the mask
post-processing in process, and ``segment`` deferred to a writer (what the worker's model thread does).

    python -m bench.model_thread --queries 50      # 8 photos of 640x480 per call, every query kept

One torch thread (the pipeline bench's "accelerator"), best of ``--repeats`` calls, thread CPU time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bench.common import BENCH_SHAPE, DEFAULT_WORK_DIR, bare_forward, bench_checkpoint, load_runtime, photo
from sam3_batch.contracts.schemas import Thresholds
from sam3_batch.worker.device_post import defer_to_writer

PROMPT = "a thing"


def _cpu_ms_per_image(run: Callable[[], object], images: int, repeats: int) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        run()
        best = min(best, time.thread_time() - start)
    return best * 1000.0 / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    args = parser.parse_args()
    runtime = load_runtime(bench_checkpoint(args.work_dir, replace(BENCH_SHAPE, num_queries=args.queries)), 1)
    images = [runtime.prepare(photo((640, 480), seed)) for seed in range(args.images)]
    prompts = [[PROMPT]] * len(images)
    every_query = Thresholds(score=0.0, mask=0.5)

    def deferred() -> None:
        with defer_to_writer():
            runtime.segment(images, prompts, every_query, "none")

    runs: dict[str, Callable[[], object]] = {
        "model alone (bare_forward)": lambda: bare_forward(runtime, images, PROMPT),
        "segment, masks post-processed in process": lambda: runtime.segment(images, prompts, every_query, "none"),
        "segment, masks deferred to the writer": deferred,
    }
    print(f"{args.queries} queries kept per image, {len(images)} images of 640x480 per call, 1 torch thread")
    for name, run in runs.items():
        print(f"  {name}: {_cpu_ms_per_image(run, len(images), args.repeats):.1f} CPU ms per image")


if __name__ == "__main__":
    main()
