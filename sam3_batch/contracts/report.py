"""The job report: built from job state and written to the output root once, when the job ends."""

from __future__ import annotations

from sam3_batch.contracts.accounting import account_job
from sam3_batch.contracts.jobstate import JobStore
from sam3_batch.contracts.keys import job_dir_uri, join_uri
from sam3_batch.contracts.schemas import JobReport, ModelInfo
from sam3_batch.contracts.storage import Storage

REPORT_FAILURE_LIMIT = 100_000


def report_uri(output_root: str, job_id: str) -> str:
    """Where a job's report lives."""
    return join_uri(job_dir_uri(output_root, job_id), "report.json")


def build_report(store: JobStore, job_id: str) -> JobReport:
    """A snapshot of the job: counts, failures with reasons, throughput, model, GPU-seconds."""
    spec = store.spec(job_id)
    account = account_job(store, job_id)
    return JobReport(
        job_id=job_id, state=account.state, counters=account.counters,
        model=ModelInfo(id=spec.model_id, revision=spec.model_revision, commit=account.stats.model_commit),
        prompts=list(spec.prompts), output_root=spec.output_root, source=spec.source,
        started_at=account.started_at, finished_at=account.finished_at, wall_seconds=account.wall_seconds,
        images_per_second=account.images_per_second, gpu_seconds=account.stats.gpu_seconds,
        failures=store.failures(job_id, limit=REPORT_FAILURE_LIMIT), error=account.stats.error,
    )


def write_report(store: JobStore, storage: Storage, job_id: str) -> JobReport:
    """Build the report and write it under the job's folder in the output root."""
    report = build_report(store, job_id)
    data = report.model_dump_json(indent=2).encode()
    storage.write_bytes(report_uri(report.output_root, job_id), data, "application/json")
    return report


def finalize_if_complete(store: JobStore, storage: Storage, job_id: str) -> JobReport | None:
    """Write the report exactly once, by whichever caller first sees the job ended (complete, cancelled
    or failed); the job's state in Redis then expires after the spec's ``state_ttl_s``."""
    if not account_job(store, job_id).ended or not store.claim_report(job_id):
        return None
    report = write_report(store, storage, job_id)
    store.expire(job_id, store.spec(job_id).state_ttl_s)
    return report
