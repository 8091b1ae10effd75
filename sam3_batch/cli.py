"""``sam3-batch``: one entry point, thin over the packages."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from sam3_batch import jobs, progress
from sam3_batch.contracts.errors import Sam3BatchError
from sam3_batch.contracts.jobstate import RedisJobStore, UnknownJobError
from sam3_batch.contracts.redact import register_secret
from sam3_batch.contracts.schemas import OutputOptions, Thresholds
from sam3_batch.contracts.settings import Settings
from sam3_batch.logs import setup_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(stderr=True)
out = Console()

Prompts = Annotated[list[str], typer.Option("--prompt", "-p", help="Text prompt; repeat for several.")]
Inputs = Annotated[list[str] | None, typer.Argument(help="S3 prefix, folder, or http(s) image URLs.")]
Out = Annotated[str, typer.Option("--out", "-o", help="Output root: s3://bucket/prefix/ or a folder.")]
Manifest = Annotated[str | None, typer.Option(help="JSONL/CSV manifest with 'uri' and optional 'prompts'.")]
Model = Annotated[str | None, typer.Option(help="Hub id, local dir, or 'tiny-random' (meaningless masks).")]
Revision = Annotated[str | None, typer.Option(help="Pin the model revision (commit/tag).")]
Threshold = Annotated[float, typer.Option(min=0.0, max=1.0, help="Minimum instance score.")]
MaskThreshold = Annotated[float, typer.Option(min=0.0, max=1.0, help="Mask logit threshold.")]
PngMasks = Annotated[bool, typer.Option(help="Also write one PNG per instance.")]
Masked = Annotated[bool, typer.Option(help="Also write the masked image (as apply_mask).")]
OutputFormat = Annotated[str, typer.Option(help="Masked image format: jpg or png.")]
BatchSize = Annotated[int | None, typer.Option(min=0, help="Images per model batch (0: from free GPU memory).")]
ChunkSize = Annotated[int | None, typer.Option(min=1, help="Images per queue message.")]
SkipExisting = Annotated[bool, typer.Option(help="Skip images whose metadata already exists.")]
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
# run and submit take the job options with the defaults the job spec has: written once, in the schemas.
SPEC_THRESHOLDS, SPEC_OUTPUTS = Thresholds(), OutputOptions()


def _settings(**overrides: Any) -> Settings:
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    for secret in settings.secrets():
        register_secret(secret)
    setup_logging(settings.log_json)
    return settings


def _request(inputs: list[str] | None, prompts: list[str], out_root: str, manifest: str | None,
             threshold: float, mask_threshold: float, png_masks: bool, masked: bool, output_format: str,
             skip_existing: bool) -> jobs.JobRequest:
    if output_format not in ("jpg", "png"):
        raise typer.BadParameter("--output-format must be jpg or png")
    fmt: Literal["jpg", "png"] = "jpg" if output_format == "jpg" else "png"
    return jobs.JobRequest(
        inputs=list(inputs or []), prompts=prompts, output_root=out_root, manifest=manifest,
        thresholds=Thresholds(score=threshold, mask=mask_threshold),
        outputs=OutputOptions(png_masks=png_masks, masked_image=masked, output_format=fmt),
        skip_existing=skip_existing,
    )


@app.command()
def run(inputs: Inputs = None, prompt: Prompts = [], out_root: Out = "./masks",  # noqa: B006
        manifest: Manifest = None, model: Model = None, revision: Revision = None,
        threshold: Threshold = SPEC_THRESHOLDS.score, mask_threshold: MaskThreshold = SPEC_THRESHOLDS.mask,
        png_masks: PngMasks = SPEC_OUTPUTS.png_masks, masked: Masked = SPEC_OUTPUTS.masked_image,
        output_format: OutputFormat = SPEC_OUTPUTS.output_format, batch_size: BatchSize = None,
        chunk_size: ChunkSize = None, skip_existing: SkipExisting = False, device: Device = None,
        dtype: Dtype = None) -> None:
    """Segment a folder (or any source) in this process: no Redis, no S3 needed."""
    settings = _settings(model=model, model_revision=revision, batch_size=batch_size, chunk_size=chunk_size,
                         device=device, dtype=dtype)
    if settings.model == "tiny-random":
        console.print("[yellow]model tiny-random: random weights, masks are meaningless (smoke test only)")
    request = _request(inputs, prompt, out_root, manifest, threshold, mask_threshold, png_masks, masked,
                       output_format, skip_existing)
    report = jobs.run_embedded(request, settings)
    c = report.counters
    console.print(f"job {report.job_id}: done {c.done}, failed {c.failed}, skipped {c.skipped} of {c.total} "
                  f"in {report.wall_seconds:.1f}s -> {out_root}")
    for failure in report.failures[:20]:
        console.print(f"  [red]failed[/red] {failure.uri}: {failure.reason}", soft_wrap=True, highlight=False)
    if c.failed:
        raise typer.Exit(code=2)


@app.command()
def submit(inputs: Inputs = None, prompt: Prompts = [], out_root: Out = "",  # noqa: B006
           manifest: Manifest = None, threshold: Threshold = SPEC_THRESHOLDS.score,
           mask_threshold: MaskThreshold = SPEC_THRESHOLDS.mask, png_masks: PngMasks = SPEC_OUTPUTS.png_masks,
           masked: Masked = SPEC_OUTPUTS.masked_image, output_format: OutputFormat = SPEC_OUTPUTS.output_format,
           chunk_size: ChunkSize = None, skip_existing: SkipExisting = False, model: Model = None,
           revision: Revision = None,
           resume: Annotated[str | None, typer.Option(help="Resume this job id.")] = None,
           wait: Annotated[bool, typer.Option(help="Show progress until the job ends.")] = False,
           as_json: JsonOut = False) -> None:
    """Enqueue a job for GPU workers and print its id."""
    settings = _settings(chunk_size=chunk_size, model=model, model_revision=revision)
    if not resume and (not out_root or not prompt):
        raise typer.BadParameter("--out and at least one --prompt are required (or --resume JOB_ID)")
    request = _request(inputs, prompt, out_root, manifest, threshold, mask_threshold, png_masks, masked,
                       output_format, skip_existing)
    summary = jobs.submit(request, settings, resume_job=resume)
    if as_json:
        out.print_json(json.dumps(summary.__dict__))
    else:
        out.print(summary.job_id)
        console.print(f"enqueued {summary.images_enqueued} images in {summary.chunks_sent} chunks, "
                      f"skipped {summary.skipped}, bad entries {summary.problems}")
    if wait:
        store = RedisJobStore(settings.state_redis_url())
        final = progress.watch(store, summary.job_id, console)
        if final.failed:
            raise typer.Exit(code=2)


@app.command()
def worker(pool: Annotated[str, typer.Option(help="threads (default), solo or prefork.")] = "threads",
           concurrency: Annotated[int, typer.Option(min=1, help="Chunks in flight at once.")] = 2,
           loglevel: Annotated[str, typer.Option()] = "INFO",
           hostname: Annotated[str | None, typer.Option()] = None) -> None:
    """Start a Celery worker holding one resident SAM 3 model (one per GPU)."""
    from sam3_batch.worker_cmd import start_worker

    start_worker(_settings(), pool=pool, concurrency=concurrency, loglevel=loglevel, hostname=hostname)


def _store() -> RedisJobStore:
    return RedisJobStore(_settings().state_redis_url())


@app.command()
def status(job_id: str, as_json: JsonOut = False,
           follow: Annotated[bool, typer.Option("--watch", help="Live progress bar.")] = False) -> None:
    """Show a job's total/done/failed/skipped, images/s and ETA."""
    store = _store()
    snapshot = progress.watch(store, job_id, console) if follow else progress.job_status(store, job_id)
    if as_json:
        out.print_json(json.dumps(snapshot.as_dict()))
    elif not follow:
        progress.print_status(snapshot, out)


@app.command()
def cancel(job_id: str) -> None:
    """Stop a job: queued chunks are dropped, nothing new is written."""
    store = _store()
    store.spec(job_id)
    store.cancel(job_id)
    out.print(f"cancelled {job_id}")


@app.command("jobs")
def list_jobs(as_json: JsonOut = False) -> None:
    """List jobs, newest first."""
    store = _store()
    statuses = [progress.job_status(store, job_id) for job_id in store.job_ids()]
    if as_json:
        out.print_json(json.dumps([s.as_dict() for s in statuses]))
        return
    for snapshot in statuses:
        progress.print_status(snapshot, out)


@app.command()
def failures(job_id: str, as_json: JsonOut = False) -> None:
    """Print a job's failed images with their reasons."""
    found = _store().failures(job_id)
    if as_json:
        out.print_json(json.dumps([f.model_dump() for f in found]))
        return
    for failure in found:
        out.print(f"{failure.uri}\t{failure.reason}", markup=False, highlight=False)


@app.command("retry-failed")
def retry_failed_cmd(job_id: str) -> None:
    """Resubmit a job's failed images."""
    count = jobs.retry_failed(_settings(), job_id)
    out.print(f"resubmitted {count} failed images of {job_id}")


@app.command("index")
def index_cmd(job_id: str,
              out_root: Annotated[str | None, typer.Option(
                  "--out", "-o", help="Output root, for a job not in Redis (an embedded `run`).")] = None,
              target_rows: Annotated[int, typer.Option(min=1, help="Rows per compacted file.")] = 1_000_000,
              as_json: JsonOut = False) -> None:
    """Compact a job's per-chunk Parquet parts into <output root>/_jobs/<job>/index/ for data lakes."""
    from sam3_batch.contracts.storage import Storage
    from sam3_batch.index import compact_index

    settings = _settings()
    root = out_root or RedisJobStore(settings.state_redis_url()).spec(job_id).output_root
    summary = compact_index(Storage(settings), root, job_id, target_rows=target_rows)
    if as_json:
        out.print_json(json.dumps(summary.as_dict()))
        return
    out.print(f"{job_id}: {summary.rows} rows ({summary.images} images, {summary.instances} instances) "
              f"from {summary.parts_read} parts -> {summary.files_written} files", markup=False, highlight=False)
    for uri in summary.uris:
        out.print(f"  {uri}", markup=False, highlight=False)


def main() -> None:
    """Console entry point: readable errors instead of tracebacks for expected failures."""
    try:
        app()
    except UnknownJobError as exc:
        console.print(f"[red]unknown job {exc.args[0]}")
        raise SystemExit(1) from None
    except Sam3BatchError as exc:
        console.print(f"[red]{exc}")
        raise SystemExit(1) from None
