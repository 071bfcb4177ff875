"""Prometheus metrics summed over several processes: prometheus_client's multiprocess mode.

Each process writes its values to files in one directory, named by ``PROMETHEUS_MULTIPROC_DIR``
in its environment; one process serves their sum. prometheus_client reads that variable when
it is imported, so :func:`summed` must run before anything imports it: the receiver's and the
workers' metric modules import it only when they make their metrics.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def summed(port: int, host: str = "0.0.0.0") -> Iterator[Path | None]:
    """While the block runs, serve on ``port`` the sum of the metrics of this process and of
    the processes it starts (they inherit :data:`ENV`); yields their directory, removed after.
    ``port`` 0: no metrics served, no directory (None)."""
    if not port:
        yield None
        return
    if "prometheus_client" in sys.modules:  # its values would stay in this process's memory
        raise RuntimeError(f"prometheus_client was imported before {ENV} was set")
    directory = Path(tempfile.mkdtemp(prefix="dicom-ingest-metrics-"))
    os.environ[ENV] = str(directory)  # read by prometheus_client, here and in the children
    try:
        _serve(port, directory, host)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _serve(port: int, directory: Path, host: str) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


def process_gone(directory: Path, pid: int) -> None:
    """A process that wrote to ``directory`` has exited: its 'live' gauges no longer count
    (its counters and histograms still do)."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
