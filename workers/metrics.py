"""The workers' Prometheus metrics, correct under Celery's prefork pool: each pool process
writes its values to the directory of :func:`ingest.metrics.summed`, which the worker's main
process serves summed. Created on first use, after that directory is set.
"""

from __future__ import annotations

from typing import Any

_metrics: dict[str, Any] = {}


def get() -> dict[str, Any]:
    """The metric objects, created on first use in each process."""
    if not _metrics:
        from prometheus_client import Counter, Histogram

        _metrics["archived"] = Counter("dicom_ingest_archived", "Instances archived")
        _metrics["duplicates"] = Counter(
            "dicom_ingest_already_archived",
            "Deliveries of datasets already archived (resent, or by another sender), by the "
            "sending AE title", ["calling_aet"])
        _metrics["errors"] = Counter(
            "dicom_ingest_task_errors",
            "Tasks that failed, by kind: configuration (the archive refuses us), unexpected "
            "(a bug: the poison rule ends a loop)", ["kind"])
        _metrics["quarantined"] = Counter(
            "dicom_ingest_quarantined", "Objects quarantined, by reason", ["reason"])
        _metrics["retries"] = Counter(
            "dicom_ingest_task_retries", "Tasks retried after a transient failure")
        _metrics["events_delivered"] = Counter(
            "dicom_ingest_study_events_delivered",
            "Study event steps done, by target: manifest (written), webhook (answered 2xx), "
            "task (queued)", ["target"])
        _metrics["event_failures"] = Counter(
            "dicom_ingest_study_event_failures",
            "Study event steps that failed and wait in the outbox, by target", ["target"])
        _metrics["latency"] = Histogram(
            "dicom_ingest_receive_to_archive_seconds",
            "From the receiver's receipt to the verified archive write",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
    return _metrics
