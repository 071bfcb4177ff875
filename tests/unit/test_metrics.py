"""Metrics summed over processes (ingest.metrics.summed): every receiver process writes its
values to one directory, and the first one serves their sum, as a scrape reads it."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest import metrics
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]

# The first process: serves the sum while a second one, started with its environment, has
# written its share and exited; says where the files are, and ends on a line from the test.
FIRST = """
import subprocess, sys
from ingest.metrics import summed
with summed(int(sys.argv[1]), "127.0.0.1") as directory:
    from receiver.metrics import ReceiverMetrics
    m = ReceiverMetrics()
    m.cstores.labels("0x0000", "CT1").inc(3)
    m.bytes.inc(3000)
    m.ack_seconds.observe(0.001)
    m.ack_seconds.observe(0.004)
    m.spool_counted(7, 1.5)
    second = subprocess.run([sys.executable, "-c", sys.argv[2]], check=True,
                            capture_output=True, text=True).stdout
    print(directory, second, flush=True)
    sys.stdin.readline()
"""
SECOND = """
import os
from receiver.metrics import ReceiverMetrics
m = ReceiverMetrics()
m.cstores.labels("0x0000", "CT1").inc(2)
m.cstores.labels("0x0000", "MR1").inc(5)
m.bytes.inc(7000)
for seconds in (0.004, 0.2, 3.0):
    m.ack_seconds.observe(seconds)
m.spool_counted(9, 0.5)
print(os.getpid())
"""


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


def test_the_port_sums_every_process() -> None:
    port = free_port()
    first = subprocess.Popen([sys.executable, "-c", FIRST, str(port), SECOND], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert first.stdin is not None and first.stdout is not None
    try:
        directory, second_pid = first.stdout.readline().split()
        summed = _scrape(port)
        ok = {"status": "0x0000"}
        assert _value(summed, "dicom_ingest_cstore_total", calling_aet="CT1", **ok) == 5
        # a label set only the other process has seen
        assert _value(summed, "dicom_ingest_cstore_total", calling_aet="MR1", **ok) == 5
        assert _value(summed, "dicom_ingest_received_bytes_total") == 10_000
        assert _value(summed, "dicom_ingest_ack_seconds_count") == 5
        assert _value(summed, "dicom_ingest_ack_seconds_bucket", le="0.005") == 3
        assert _value(summed, "dicom_ingest_ack_seconds_bucket", le="+Inf") == 5
        assert abs(_value(summed, "dicom_ingest_ack_seconds_sum") - 3.209) < 1e-9
        # the spool they share: one depth, not two added up
        assert _value(summed, "dicom_ingest_spool_depth") == 9
        assert _value(summed, "dicom_ingest_receiver_processes") == 2

        # the other process is gone: its gauges no longer count, its counts still do
        metrics.process_gone(Path(directory), int(second_pid))
        after = _scrape(port)
        assert _value(after, "dicom_ingest_receiver_processes") == 1
        assert _value(after, "dicom_ingest_spool_depth") == 7
        assert _value(after, "dicom_ingest_cstore_total", calling_aet="MR1", **ok) == 5
    finally:
        first.communicate("\n", timeout=30)
    assert first.returncode == 0
    assert not Path(directory).exists()  # removed when the first process stops


def test_too_late_once_prometheus_client_is_imported() -> None:
    """In a process that imported prometheus_client, metrics stay in its memory: refused."""
    assert "prometheus_client" in sys.modules  # by this module
    with pytest.raises(RuntimeError, match="imported before"), metrics.summed(free_port()):
        pass
    with metrics.summed(0) as directory:  # no metrics port: nothing to do
        assert directory is None


def test_up_refuses_worker_metrics_on_the_receiver_port() -> None:
    from dicom_ingest.up import metrics_port_clash
    from ingest.settings import Settings

    same = Settings(metrics_port=9110, worker_metrics_port=9110, receiver_processes=2)
    clash = metrics_port_clash(same)
    assert clash is not None and "9110" in clash
    assert metrics_port_clash(same.replace(worker_metrics_port=9111)) is None
    assert metrics_port_clash(same.replace(metrics_port=0, worker_metrics_port=0)) is None
