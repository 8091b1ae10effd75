"""The job report: built from job state and written to the output root once, when the job ends."""

from __future__ import annotations

import time

from sam3_batch.contracts.jobstate import JobStore
from sam3_batch.contracts.keys import job_dir_uri, join_uri
from sam3_batch.contracts.schemas import JobReport, ModelInfo
from sam3_batch.contracts.storage import Storage

REPORT_FAILURE_LIMIT = 100_000


def report_uri(output_root: str, job_id: str) -> str:
    """Where a job's report lives."""
    return join_uri(job_dir_uri(output_root, job_id), "report.json")


def build_report(store: JobStore, job_id: str) -> JobReport:
    """A snapshot of the job: counts, failures with reasons, throughput, model, model-seconds."""
    spec = store.spec(job_id)
    counters = store.counters(job_id)
    stats = store.stats(job_id)
    started = stats.get("started_at", spec.created_at or time.time())
    finished = stats.get("last_update", time.time()) if counters.complete else time.time()
    wall = max(finished - started, 1e-9)
    state = "cancelled" if store.is_cancelled(job_id) else ("complete" if counters.complete else "running")
    return JobReport(
        job_id=job_id, state=state, counters=counters,
        model=ModelInfo(id=spec.model_id, revision=spec.model_revision),
        prompts=list(spec.prompts), output_root=spec.output_root, source=spec.source,
        started_at=started, finished_at=finished, wall_seconds=wall,
        images_per_second=(counters.done + counters.failed) / wall,
        model_seconds=stats.get("model_seconds", 0.0), gpu_seconds=stats.get("model_seconds", 0.0),
        failures=store.failures(job_id, limit=REPORT_FAILURE_LIMIT),
    )


def write_report(store: JobStore, storage: Storage, job_id: str) -> JobReport:
    """Build the report and write it under the job's folder in the output root."""
    report = build_report(store, job_id)
    data = report.model_dump_json(indent=2).encode()
    storage.write_bytes(report_uri(report.output_root, job_id), data, "application/json")
    return report


def finalize_if_complete(store: JobStore, storage: Storage, job_id: str) -> JobReport | None:
    """Write the report exactly once, by whichever caller first sees the job complete."""
    if not store.counters(job_id).complete or not store.claim_report(job_id):
        return None
    return write_report(store, storage, job_id)
