"""``sam3-batch``: one entry point, thin over the packages."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import ValidationError
from rich.console import Console

from sam3_batch import jobs, progress
from sam3_batch.contracts.display import printable
from sam3_batch.contracts.errors import RequestError
from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.redact import register_secret
from sam3_batch.contracts.schemas import ConceptPrompt, JobSpec, OutputOptions, Thresholds
from sam3_batch.contracts.settings import Settings
from sam3_batch.error_boundary import debug_requested, report_and_exit
from sam3_batch.extras import require_worker_extra
from sam3_batch.logs import setup_logging
from sam3_batch.producer import metrics as producer_metrics

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(stderr=True)
out = Console()

Prompts = Annotated[list[str], typer.Option("--prompt", "-p", help="Text prompt; repeat for several.")]
Inputs = Annotated[list[str] | None, typer.Argument(help="S3 prefix, folder, or http(s) image URLs.")]
Out = Annotated[str, typer.Option("--out", "-o", help="Output root: s3://bucket/prefix/ or a folder.")]
Manifest = Annotated[str | None, typer.Option(help="JSONL/CSV manifest: 'uri', optional 'prompts' and 'objects'.")]
Model = Annotated[str | None, typer.Option(help="Hub id, local dir, or 'tiny-random' (meaningless masks).")]
Revision = Annotated[str | None, typer.Option(help="Pin the model revision (commit/tag).")]
Threshold = Annotated[float, typer.Option(min=0.0, max=1.0, help="Minimum instance score.")]
MaskThreshold = Annotated[float, typer.Option(min=0.0, max=1.0, help="Mask logit threshold.")]
PngMasks = Annotated[bool, typer.Option(help="Also write one PNG per instance.")]
Masked = Annotated[bool, typer.Option(help="Also write the masked image (see --masked-style).")]
MaskedStyle = Annotated[str, typer.Option(
    help="overlay: masks blended on the image, a colour per prompt (as the hosted API's apply_mask); "
         "cutout: only the masked pixels.")]
OutputFormat = Annotated[str, typer.Option(help="Masked image format: jpg or png.")]
Layout = Annotated[str, typer.Option(
    help="image: a K.json per image (small jobs); chunk: one Parquet shard per chunk holds every image's "
         "results (lakes, millions of images). README: Choosing an output layout.")]
PerImageJson = Annotated[bool | None, typer.Option(
    help="With --layout chunk: also write each image's K.json (off by default there).")]
BatchSize = Annotated[int | None, typer.Option(min=0, help="Images per model batch (0: from free GPU memory).")]
ChunkSize = Annotated[int | None, typer.Option(min=1, help="Images per queue message.")]
SkipExisting = Annotated[bool, typer.Option(help="Skip images whose metadata already exists.")]
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str | None, typer.Option(help="auto, float32, bfloat16, float16 or autocast-bf16.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
Queue = Annotated[str | None, typer.Option(help="Celery queue (default SAM3_BATCH_QUEUE): one per model.")]
MaxFailedFraction = Annotated[float, typer.Option(
    min=0.0, max=1.0, help="With --wait/--watch: exit 0 while at most this fraction of images failed.")]
ProgressEvery = Annotated[float | None, typer.Option(
    min=0.1, help="Off a terminal: seconds between progress lines (default SAM3_BATCH_PROGRESS_INTERVAL_S).")]

log = logging.getLogger("sam3_batch.cli")


@app.callback()
def _global_options(debug: Annotated[bool, typer.Option(
        "--debug", help="Show tracebacks (also SAM3_BATCH_DEBUG=1).")] = False) -> None:
    """Distributed batch segmentation with SAM 3 (run, submit, worker, status ...)."""


def _out(text: str) -> None:
    """A result line on stdout (ids, failures, URIs): whole, unwrapped, flushed, user data as plain text."""
    progress.write_line(sys.stdout, printable(text))
# run and submit take the job options with the defaults the job spec has: written once, in the schemas.
SPEC_THRESHOLDS, SPEC_OUTPUTS = Thresholds(), OutputOptions()


def _settings(**overrides: Any) -> Settings:
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    for secret in settings.secrets():
        register_secret(secret)
    setup_logging(settings.log_json)
    return settings


def _say(settings: Settings, text: str) -> None:
    """A status line on stderr: plain, or a JSON record under SAM3_BATCH_LOG_JSON (stderr stays JSON).

    Names, URIs and reasons in it are user data: printed as text, never as markup or terminal codes."""
    if settings.log_json:
        log.info("%s", printable(text))
    else:
        console.print(printable(text), markup=False, highlight=False, soft_wrap=True)


def _request(inputs: list[str] | None, prompts: list[str], out_root: str, manifest: str | None,
             threshold: float, mask_threshold: float, png_masks: bool, masked: bool, output_format: str,
             skip_existing: bool, masked_style: str = "cutout", layout: str = "image",
             per_image_json: bool | None = None) -> jobs.JobRequest:
    if output_format not in ("jpg", "png"):
        raise typer.BadParameter("--output-format must be jpg or png")
    if layout not in ("image", "chunk"):
        raise typer.BadParameter("--layout must be image or chunk")
    if layout == "image" and per_image_json is False:
        raise typer.BadParameter("--no-per-image-json needs --layout chunk (K.json is the image layout's marker)")
    shape: Literal["image", "chunk"] = "chunk" if layout == "chunk" else "image"
    if masked_style not in ("overlay", "cutout"):
        raise typer.BadParameter("--masked-style must be overlay or cutout")
    fmt: Literal["jpg", "png"] = "jpg" if output_format == "jpg" else "png"
    style: Literal["overlay", "cutout"] = "overlay" if masked_style == "overlay" else "cutout"
    return jobs.JobRequest(
        inputs=list(inputs or []), prompts=prompts, output_root=out_root, manifest=manifest,
        thresholds=Thresholds(score=threshold, mask=mask_threshold),
        outputs=OutputOptions(png_masks=png_masks, masked_image=masked, masked_style=style, output_format=fmt,
                              layout=shape, per_image_json=per_image_json),
        skip_existing=skip_existing,
    )


@app.command()
def run(inputs: Inputs = None, prompt: Prompts = [], out_root: Out = "./masks",  # noqa: B006
        manifest: Manifest = None, model: Model = None, revision: Revision = None,
        threshold: Threshold = SPEC_THRESHOLDS.score, mask_threshold: MaskThreshold = SPEC_THRESHOLDS.mask,
        png_masks: PngMasks = SPEC_OUTPUTS.png_masks, masked: Masked = SPEC_OUTPUTS.masked_image,
        output_format: OutputFormat = SPEC_OUTPUTS.output_format, batch_size: BatchSize = None,
        chunk_size: ChunkSize = None, skip_existing: SkipExisting = False, device: Device = None,
        dtype: Dtype = None, masked_style: MaskedStyle = SPEC_OUTPUTS.masked_style,
        box: Annotated[list[str], typer.Option(
            "--box", help="x0,y0,x1,y1 in pixels (repeatable): one exemplar prompt applied to each image; with "
                          "one --prompt, that prompt's text goes with the boxes.")] = [],  # noqa: B006
        box_label: Annotated[list[int], typer.Option(
            "--box-label", help="1 (positive) or 0 (negative) per --box, in order (default: all 1).")
        ] = [],  # noqa: B006
        layout: Layout = SPEC_OUTPUTS.layout, per_image_json: PerImageJson = None) -> None:
    """Segment a folder (or any source) in this process: no Redis, no S3 needed."""
    if not (prompt or manifest or box):
        raise RequestError("give at least one --prompt (or a --manifest whose lines carry prompts or objects)")
    settings = _settings(model=model, model_revision=revision, batch_size=batch_size, chunk_size=chunk_size,
                         device=device, dtype=dtype)
    if settings.model == "tiny-random":
        _say(settings, "model tiny-random: random weights, masks are meaningless (smoke test only)")
    exemplar = _exemplar(box, box_label, prompt)
    request = _request(inputs, [] if exemplar else prompt, out_root, manifest, threshold, mask_threshold,
                       png_masks, masked, output_format, skip_existing, masked_style, layout, per_image_json)
    report = jobs.run_embedded(dataclasses.replace(request, exemplar=exemplar), settings)
    c = report.counters
    _say(settings, f"job {report.job_id}: done {c.done}, failed {c.failed}, skipped {c.skipped} of {c.total} "
                   f"in {report.wall_seconds:.1f}s -> {out_root}")
    for failure in report.failures[:20]:
        _say(settings, f"  failed {failure.uri}: {failure.reason}")
    if c.total == 0:
        _say(settings, f"no images found in {report.source} (extensions: jpg, jpeg, png, gif, webp, bmp, tif)")
        raise typer.Exit(code=1)
    if c.failed:
        raise typer.Exit(code=2)


def _exemplar(boxes: list[str], labels: list[int], prompts: list[str]) -> ConceptPrompt | None:
    """``--box`` values (and ``--box-label``s, and the one ``--prompt`` as text) as one concept prompt."""
    if not boxes:
        if labels:
            raise RequestError("--box-label needs --box")
        return None
    if len(prompts) > 1:
        raise RequestError("--box goes with at most one --prompt (the exemplar's text)")
    parsed: list[tuple[float, float, float, float]] = []
    for value in boxes:
        parts = value.split(",")
        try:
            x0, y0, x1, y1 = (float(part) for part in parts)
        except ValueError:
            raise RequestError(f"--box {value!r}: expected four numbers x0,y0,x1,y1 (pixels)") from None
        parsed.append((x0, y0, x1, y1))
    try:
        return ConceptPrompt(text=prompts[0] if prompts else None, boxes=parsed, box_labels=labels or None)
    except ValidationError as exc:
        reasons = "; ".join(str(error["msg"]).removeprefix("Value error, ") for error in exc.errors())
        raise RequestError(f"--box: {reasons}") from None


@app.command()
def submit(inputs: Inputs = None, prompt: Prompts = [], out_root: Out = "",  # noqa: B006
           manifest: Manifest = None, threshold: Threshold = SPEC_THRESHOLDS.score,
           mask_threshold: MaskThreshold = SPEC_THRESHOLDS.mask, png_masks: PngMasks = SPEC_OUTPUTS.png_masks,
           masked: Masked = SPEC_OUTPUTS.masked_image, output_format: OutputFormat = SPEC_OUTPUTS.output_format,
           chunk_size: ChunkSize = None, skip_existing: SkipExisting = False, model: Model = None,
           revision: Revision = None, masked_style: MaskedStyle = SPEC_OUTPUTS.masked_style,
           layout: Layout = SPEC_OUTPUTS.layout, per_image_json: PerImageJson = None,
           resume: Annotated[str | None, typer.Option(help="Resume this job id.")] = None,
           wait: Annotated[bool, typer.Option(help="Show progress until the job ends.")] = False,
           dry_run: Annotated[bool, typer.Option(help="List and plan only: counts, bytes, chunks, GPU-hours.")
                              ] = False,
           rate: Annotated[float | None, typer.Option(
               min=0.001, help="With --dry-run: images/s per GPU (default: the newest complete job's).")] = None,
           max_failed_fraction: MaxFailedFraction = 0.0, progress_every: ProgressEvery = None,
           expected_images: Annotated[int | None, typer.Option(
               min=0, help="Images the job will hold (the --dry-run count): ETA from the start, no counting "
                           "pass (default: a pass that only counts the source, beside the producer).")] = None,
           metrics_port: Annotated[int | None, typer.Option(
               min=1, max=65535, help="Serve the producer's Prometheus metrics on this port while it runs.")] = None,
           queue: Queue = None, as_json: JsonOut = False) -> None:
    """Enqueue a job for GPU workers; its id is the first line printed, then progress while feeding."""
    settings = _settings(chunk_size=chunk_size, model=model, model_revision=revision,
                         progress_interval_s=progress_every, queue=queue)
    if not resume and (not out_root.strip() or not (prompt or manifest)):
        raise RequestError("--out and at least one --prompt (or a --manifest) are required (or --resume JOB_ID)")
    request = _request(inputs, prompt, out_root, manifest, threshold, mask_threshold, png_masks, masked,
                       output_format, skip_existing, masked_style, layout, per_image_json)
    request = dataclasses.replace(request, expected_images=expected_images)
    if dry_run:
        _print_plan(jobs.dry_run(request, settings, rate), as_json)
        return
    if metrics_port:
        producer_metrics.serve(metrics_port)
    store = RedisJobStore(settings.state_redis_url())  # jobs.submit checks Redis first, in seconds
    ticker = progress.FeedProgress(store, sys.stderr, settings.progress_interval_s, settings.log_json)
    summary = jobs.submit(request, settings, resume_job=resume, on_started=lambda spec: _announce(spec, as_json),
                          on_progress=ticker)
    if as_json:
        out.print_json(json.dumps(summary.__dict__))
    else:
        _say(settings, f"enqueued {summary.images_enqueued} images in {summary.chunks_sent} chunks, "
                       f"skipped {summary.skipped}, bad entries {summary.problems}")
    if summary.listing_complete and not (summary.images_enqueued or summary.skipped or summary.problems) \
            and not resume:
        _say(settings, f"no images found in {' '.join(request.inputs) or request.manifest}")
        raise typer.Exit(code=1)
    if wait:
        final = progress.watch(store, summary.job_id, console, stream=sys.stderr,
                               line_every_s=settings.progress_interval_s, as_json=settings.log_json)
        raise typer.Exit(code=progress.exit_code(final, max_failed_fraction))


def _announce(spec: JobSpec, as_json: bool) -> None:
    """The job id first, before anything is listed: a producer that dies later still leaves it in its log."""
    if not as_json:
        _out(spec.job_id)
    log.info("job %s submitted: resume with `sam3-batch submit --resume %s`", spec.job_id, spec.job_id,
             extra={"job_id": spec.job_id})


def _print_plan(plan: jobs.PlanEstimate, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(plan.as_dict()))
        return
    size = "unknown size" if plan.bytes is None else f"{plan.bytes / 1e9:.3f} GB"
    gpu = ("GPU-hours unknown (pass --rate IMAGES_PER_S)" if plan.gpu_hours is None
           else f"~{plan.gpu_hours:.2f} GPU-hours at {plan.seconds_per_image:.4f} s/image ({plan.estimate_from})")
    _out(f"dry run: {plan.images} images ({size}) in {plan.chunks} chunks, skipped "
         f"{plan.skipped}, bad entries {plan.problems}; {gpu}; nothing was enqueued")


@app.command()
def worker(pool: Annotated[str, typer.Option(help="threads (default), solo or prefork.")] = "threads",
           concurrency: Annotated[int, typer.Option(min=1, help="Chunks in flight at once.")] = 2,
           loglevel: Annotated[str, typer.Option()] = "INFO",
           hostname: Annotated[str | None, typer.Option()] = None, queue: Queue = None) -> None:
    """Start a Celery worker holding one resident SAM 3 model (one per GPU)."""
    require_worker_extra()  # the GPU stack is an install extra: say so in one line, not an ImportError
    from sam3_batch.worker_cmd import start_worker

    start_worker(_settings(queue=queue), pool=pool, concurrency=concurrency, loglevel=loglevel, hostname=hostname)


def _store() -> RedisJobStore:
    """Job state for an interactive command: a dead Redis fails within seconds, not after minutes of retries."""
    return RedisJobStore.interactive(_settings().state_redis_url())


@app.command()
def status(job_id: str, as_json: JsonOut = False,
           follow: Annotated[bool, typer.Option("--watch", help="Follow until the job ends (exit code as "
                                                "submit --wait).")] = False,
           max_failed_fraction: MaxFailedFraction = 0.0, progress_every: ProgressEvery = None) -> None:
    """Show a job's total/done/failed/skipped, images/s and ETA."""
    settings = _settings(progress_interval_s=progress_every)
    store = RedisJobStore.interactive(settings.state_redis_url())  # a dead Redis or a bad URL: one line, seconds
    if follow:
        store = RedisJobStore(settings.state_redis_url())  # a long watch rides out a Redis restart
        final = progress.watch(store, job_id, Console(), stream=sys.stdout,
                               line_every_s=settings.progress_interval_s, as_json=as_json)
        raise typer.Exit(code=progress.exit_code(final, max_failed_fraction))
    snapshot = progress.job_status(store, job_id)
    if as_json:
        out.print_json(json.dumps(snapshot.as_dict()))
    else:
        _out(progress.status_line(snapshot))


@app.command()
def cancel(job_id: str) -> None:
    """Stop a job: queued chunks are dropped, nothing new is written, its report says cancelled."""
    settings = _settings()
    store = RedisJobStore.interactive(settings.state_redis_url())
    snapshot = progress.job_status(store, job_id)
    if snapshot.ended:
        _out(f"job {job_id} already ended ({snapshot.state}): nothing to cancel")
        return
    store.cancel(job_id)
    jobs.finalize_ended(store, settings, job_id)
    _out(f"cancelled {job_id}")


@app.command()
def delete(job_id: str,
           force: Annotated[bool, typer.Option(help="Also delete a job that is still running.")] = False) -> None:
    """Remove a job's state from Redis (its outputs and report in storage stay)."""
    store = _store()
    snapshot = progress.job_status(store, job_id)
    if not snapshot.ended and not force:
        raise RequestError(f"job {job_id} is {snapshot.state}: cancel it first (or pass --force)")
    store.delete(job_id)
    _out(f"deleted {job_id}")


@app.command("jobs")
def list_jobs(as_json: JsonOut = False) -> None:
    """List jobs, newest first."""
    store = _store()
    statuses = [progress.job_status(store, job_id) for job_id in store.job_ids()]
    if as_json:
        out.print_json(json.dumps([s.as_dict() for s in statuses]))
        return
    for snapshot in statuses:
        _out(progress.status_line(snapshot))


@app.command()
def failures(job_id: str, as_json: JsonOut = False) -> None:
    """Print a job's failed images with their reasons (one line each: URI, a tab, the reason)."""
    store = _store()
    store.spec(job_id)  # an unknown job is an error, not an empty list
    found = store.failures(job_id)
    if as_json:
        out.print_json(json.dumps([f.model_dump() for f in found]))
        return
    for failure in found:
        _out(f"{failure.uri}\t{failure.reason}")


@app.command("retry-failed")
def retry_failed_cmd(job_id: str) -> None:
    """Resubmit a job's failed images."""
    count = jobs.retry_failed(_settings(), job_id)
    if count == 0:
        _out(f"job {job_id} has no failed images to retry")
        return
    _out(f"resubmitted {count} failed images of {job_id}")


def _job_root(settings: Settings, job_id: str, out_root: str | None) -> str:
    """The output root given, or the one the job in Redis names."""
    return out_root or RedisJobStore.interactive(settings.state_redis_url()).spec(job_id).output_root


@app.command("index")
def index_cmd(job_id: str,
              out_root: Annotated[str | None, typer.Option(
                  "--out", "-o", help="Output root, for a job not in Redis (an embedded `run`).")] = None,
              target_rows: Annotated[int, typer.Option(min=1, help="Rows (images) per compacted file.")] = 1_000_000,
              partition_by: Annotated[list[str] | None, typer.Option(
                  help="Hive partition column: job_id, status, processed_date or model_id; repeatable.")] = None,
              dest: Annotated[str | None, typer.Option(
                  help="Write into this shared lake folder (files named JOB-part-N) instead of the job's.")] = None,
              as_json: JsonOut = False) -> None:
    """Compact a job's per-chunk Parquet parts into <output root>/_jobs/<job>/index/ (done automatically at the end)."""
    from sam3_batch.contracts.lake_index import compact_index
    from sam3_batch.contracts.storage import Storage

    settings = _settings()
    root = _job_root(settings, job_id, out_root)
    summary = compact_index(Storage(settings), root, job_id, max_rows_per_file=target_rows,
                            partition_by=partition_by or (), dest=dest)
    if as_json:
        out.print_json(json.dumps(summary.as_dict()))
        return
    _out(f"{job_id}: {summary.images} images ({summary.done} done, {summary.failed} failed, "
         f"{summary.instances} instances) from {summary.parts_read} parts -> {summary.files_written} files")
    for uri in summary.uris:
        _out(f"  {uri}")


@app.command("export")
def export_cmd(job_or_root: Annotated[str, typer.Argument(help="A job id (in Redis) or an output root.")],
               fmt: Annotated[str, typer.Option("--format", help="Export format: coco.")] = "coco",
               images_per_file: Annotated[int, typer.Option(min=1, help="Images per COCO file.")] = 10_000,
               dest: Annotated[str | None, typer.Option(help="Folder for the files (default: the job's).")] = None,
               as_json: JsonOut = False) -> None:
    """Export results as COCO instances JSON (sharded), loadable by pycocotools and supervision."""
    from sam3_batch.coco_export import export_coco
    from sam3_batch.contracts.storage import Storage

    if fmt != "coco":
        raise RequestError(f"--format must be coco, not {fmt!r}")
    settings = _settings()
    is_root = "://" in job_or_root or "/" in job_or_root or Path(job_or_root).is_dir()
    root, job_id = (job_or_root, None) if is_root else (_job_root(settings, job_or_root, None), job_or_root)
    summary = export_coco(Storage(settings), root, job_id, images_per_file=images_per_file, dest=dest)
    if as_json:
        out.print_json(json.dumps(summary.as_dict()))
        return
    _out(f"{summary.images} images, {summary.annotations} annotations, {len(summary.categories)} categories "
         f"-> {len(summary.files)} files")
    for uri in summary.files:
        _out(f"  {uri}")


@app.command("dev-stack")
def dev_stack(action: Annotated[str, typer.Argument(help="start, stop (a detached stack) or env.")] = "start",
              state_dir: Annotated[Path | None, typer.Option("--dir", help="Data, logs and state "
                                                              "[default: ~/.sam3-batch/dev-stack].")] = None,
              detach: Annotated[bool, typer.Option(help="Run in the background; stop with `dev-stack stop`.")] = False,
              redis_port: Annotated[int, typer.Option(help="Redis port (for a new --dir).")] = 6380,
              s3_port: Annotated[int, typer.Option(help="S3 port (for a new --dir).")] = 8333,
              bucket: Annotated[str, typer.Option(help="Bucket to create.")] = "sam3") -> None:
    """Run Redis + SeaweedFS (S3) on this machine, no Docker, and print the env vars for distributed mode."""
    from sam3_batch import devstack

    folder = state_dir or devstack.DEFAULT_DIR
    if action == "start":
        code = devstack.run(devstack.Options(folder, redis_port, s3_port, bucket), detach=detach)
    elif action == "stop":
        code = devstack.stop(folder)
    elif action == "env":
        code = devstack.show_exports(folder)
    else:
        raise typer.BadParameter(f"unknown action {action!r}: start, stop or env")
    raise typer.Exit(code)


def main() -> None:
    """Console entry point: the one error boundary (readable lines instead of tracebacks)."""
    try:
        app()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    except Exception as exc:
        if debug_requested(sys.argv):
            raise
        report_and_exit(exc)
