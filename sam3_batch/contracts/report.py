"""The job report: built from job state and written to the output root once, when the job ends."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata

from sam3_batch.contracts.accounting import account_job
from sam3_batch.contracts.jobstate import JobStore
from sam3_batch.contracts.layout import report_uri as report_uri
from sam3_batch.contracts.schemas import IndexInfo, JobReport, ModelInfo, PromptCounts
from sam3_batch.contracts.storage import Storage

REPORT_FAILURE_LIMIT = 100_000
_SOFTWARE = ("sam3-batch", "torch", "transformers")
log = logging.getLogger(__name__)


def software_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the outputs (read from metadata: nothing is imported)."""
    found: dict[str, str] = {}
    for name in _SOFTWARE:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def build_report(store: JobStore, job_id: str, index: IndexInfo | None = None,
                 model_commit: str | None = None, prompt_counts: PromptCounts | None = None) -> JobReport:
    """A snapshot of the job: counts, failures with reasons, throughput, model, GPU-seconds, options."""
    spec = store.spec(job_id)
    account = account_job(store, job_id)
    commit = account.stats.model_commit or model_commit  # as the workers loaded it, else as the index says
    return JobReport(
        job_id=job_id, state=account.state, counters=account.counters,
        model=ModelInfo(id=spec.model_id, revision=spec.model_revision, commit=commit),
        prompts=list(spec.prompts), output_root=spec.output_root, source=spec.source,
        started_at=account.started_at, finished_at=account.finished_at, wall_seconds=account.wall_seconds,
        images_per_second=account.images_per_second, model_seconds=account.stats.model_seconds,
        gpu_seconds=account.stats.model_seconds,
        failures=store.failures(job_id, limit=REPORT_FAILURE_LIMIT), error=account.stats.error,
        instances=index.instances if index else None, thresholds=spec.thresholds, outputs=spec.outputs,
        model_commit=commit, software=software_versions(), index=index, prompt_counts=prompt_counts,
    )


def write_report(store: JobStore, storage: Storage, job_id: str, index: IndexInfo | None = None,
                 model_commit: str | None = None, prompt_counts: PromptCounts | None = None) -> JobReport:
    """Build the report and write it under the job's folder in the output root."""
    report = build_report(store, job_id, index, model_commit, prompt_counts)
    data = report.model_dump_json(indent=2).encode()
    storage.write_bytes(report_uri(report.output_root, job_id), data, "application/json")
    return report


@dataclass(frozen=True)
class _Compacted:
    index: IndexInfo | None = None
    commit: str | None = None
    prompt_counts: PromptCounts | None = None


def _compact(storage: Storage, output_root: str, job_id: str) -> _Compacted:
    """The job's index, compacted now; nothing known if that fails (the report is written regardless)."""
    from sam3_batch.contracts.lake_index import compact_index  # pyarrow: only when a job ends

    try:
        summary = compact_index(storage, output_root, job_id)
    except Exception as exc:  # the report matters more than the index, which `sam3-batch index` can redo
        log.warning("job %s: the Parquet index could not be compacted: %s", job_id, exc)
        return _Compacted()
    commit = summary.model_commits[0] if len(summary.model_commits) == 1 else None
    info = IndexInfo(dir=summary.index_dir, files=summary.uris, images=summary.images, instances=summary.instances)
    return _Compacted(info, commit, summary.prompts.counts())


def finalize_if_complete(store: JobStore, storage: Storage, job_id: str) -> JobReport | None:
    """Compact the index and write the report once, by whichever caller first sees the job ended
    (complete, cancelled or failed); the job's state in Redis then expires after the spec's ``state_ttl_s``.

    The claim holds only while the report is written: a write that fails releases it (and raises), so
    the next caller that sees the job ended (a redelivered chunk, the producer) writes it.
    """
    account = account_job(store, job_id)
    if not account.ended or not store.claim_report(job_id):
        return None
    spec = store.spec(job_id)
    written = False
    try:
        processed = account.counters.done + account.counters.failed  # none: cancelled or failed early, no index
        found = _compact(storage, spec.output_root, job_id) if processed else _Compacted()
        report = write_report(store, storage, job_id, found.index, found.commit, found.prompt_counts)
        written = True
    finally:
        store.settle_report(job_id, written)
    store.expire(job_id, spec.state_ttl_s)
    return report
