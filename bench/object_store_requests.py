"""Object-store requests per 1,000 images by kind (PUT, GET, HEAD, LIST), for each output layout.

A real job in embedded mode (the worker's code, the tiny random-weight model on CPU) reads N images from a
SeaweedFS bucket and writes its outputs there, through a counting HTTP proxy (``tests.fixtures.faulty_proxy``
with no faults: it logs every request). Per layout: a first run, a rerun with ``--skip-existing`` (everything
is done) and a rerun without it. Request counts do not depend on the machine's speed.

    python -m bench.object_store_requests --quick          # 64 images, chunks of 32
    python -m bench.object_store_requests --images 1024    # the RESULTS.md figures
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import boto3
from PIL import Image

from bench.common import AWS_ENV, machine_line, s3_server, table, use_fake_aws_credentials
from sam3_batch import jobs
from sam3_batch.contracts.schemas import OutputOptions
from sam3_batch.contracts.settings import Settings
from tests.fixtures.faulty_proxy import FaultyProxy, SeenRequest

BUCKET = "bench"
KINDS = ("PUT", "GET", "HEAD", "LIST")
PHASES = ("first run", "rerun --skip-existing", "rerun, no skip")


@dataclass(frozen=True)
class PhaseCounts:
    """Requests one phase made, by kind; inputs (``in/``) apart from outputs."""

    layout: str
    phase: str
    images: int
    outputs: Counter[str]
    inputs: Counter[str]
    seconds: float

    def per_thousand(self, counts: Counter[str]) -> list[str]:
        return [f"{1000 * counts[kind] / self.images:,.1f}" for kind in KINDS]


def _kind(request: SeenRequest) -> str:
    key = request.path.removeprefix(f"/{BUCKET}").lstrip("/")
    if request.method == "GET" and (not key or "list-type" in request.query):
        return "LIST"
    return request.method


def _split(requests: list[SeenRequest]) -> tuple[Counter[str], Counter[str]]:
    outputs: Counter[str] = Counter()
    inputs: Counter[str] = Counter()
    for request in requests:
        kind = _kind(request)
        reads_inputs = request.path.startswith(f"/{BUCKET}/in/") or "prefix=in" in request.query
        (inputs if reads_inputs else outputs)[kind] += 1
    return outputs, inputs


def _upload_images(endpoint: str, count: int) -> None:
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"])
    client.create_bucket(Bucket=BUCKET)
    for index in range(count):
        image = Image.new("RGB", (96, 64), ((index * 37) % 256, (index * 91) % 256, 128))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        client.put_object(Bucket=BUCKET, Key=f"in/{index // 100:03d}/{index:06d}.png", Body=buffer.getvalue())


def _run_phase(proxy: FaultyProxy, settings: Settings, layout: str, phase: str, images: int) -> PhaseCounts:
    outputs = OutputOptions(layout="chunk" if layout == "chunk" else "image")
    request = jobs.JobRequest(inputs=[f"s3://{BUCKET}/in/"], prompts=["thing"], output_root=f"s3://{BUCKET}/{layout}",
                              outputs=outputs, skip_existing=phase == "rerun --skip-existing")
    seen_before = len(proxy.requests)
    start = time.perf_counter()
    report = jobs.run_embedded(request, settings)
    seconds = time.perf_counter() - start
    counters = report.counters
    if counters.total != images or counters.failed:
        raise SystemExit(f"{layout} {phase}: expected {images} images without failures, got {counters}")
    out, inp = _split(proxy.requests[seen_before:])
    return PhaseCounts(layout, phase, images, out, inp, seconds)


def run(images: int, chunk_size: int, work_dir: Path) -> list[PhaseCounts]:
    use_fake_aws_credentials()
    results: list[PhaseCounts] = []
    with s3_server(work_dir) as server:
        _upload_images(server.url, images)
        proxy = FaultyProxy(server.url)
        proxy.start()
        try:
            settings = Settings(model="tiny-random", device="cpu", chunk_size=chunk_size, batch_size=8,
                                s3_endpoint_url=proxy.endpoint_url, s3_region=AWS_ENV["AWS_DEFAULT_REGION"])
            for layout in ("image", "chunk"):
                for phase in PHASES:
                    results.append(_run_phase(proxy, settings, layout, phase, images))
                    print(f"  {layout:5s} {phase:22s} {results[-1].seconds:6.1f} s", flush=True)
        finally:
            proxy.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="64 images")
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args()
    images = 64 if args.quick else args.images
    logging.basicConfig(level=logging.WARNING)
    print(machine_line())
    print(f"{images} images, chunks of {args.chunk_size}, one prompt, RLE only (no PNG masks)")
    with tempfile.TemporaryDirectory(prefix="sam3-bench-requests-") as work:
        results = run(images, args.chunk_size, Path(work))
    print("\nOutput side (results, markers, parts/shards, index, report, skip-existing listing), per 1,000 images:")
    print(table(["layout", "phase", *KINDS], [[r.layout, r.phase, *r.per_thousand(r.outputs)] for r in results]))
    print("\nInput side (listing and reading the images), per 1,000 images:")
    print(table(["layout", "phase", *KINDS], [[r.layout, r.phase, *r.per_thousand(r.inputs)] for r in results]))
    if args.json:
        args.json.write_text(json.dumps([
            {"layout": r.layout, "phase": r.phase, "images": r.images, "outputs": dict(r.outputs),
             "inputs": dict(r.inputs), "seconds": r.seconds} for r in results
        ], indent=1))


if __name__ == "__main__":
    main()
