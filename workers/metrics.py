"""The workers' Prometheus metrics, correct under Celery's prefork pool.

prometheus_client's multiprocess mode keeps each pool process's values in files under
``PROMETHEUS_MULTIPROC_DIR``; the worker's main process serves their sum. The directory must
be set before prometheus_client is imported, so :func:`prepare` runs first in ``worker``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
_metrics: dict[str, Any] = {}


def prepare() -> Path:
    """A fresh directory for this worker's per-process metric files (before any import)."""
    path = Path(tempfile.mkdtemp(prefix="dicom-ingest-metrics-"))
    os.environ[ENV] = str(path)  # read by prometheus_client, in this process and the pool
    return path


def serve(port: int, directory: Path, host: str = "0.0.0.0") -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


def cleanup(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


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
        _metrics["latency"] = Histogram(
            "dicom_ingest_receive_to_archive_seconds",
            "From the receiver's receipt to the verified archive write",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
    return _metrics
