"""The first receiver process's /metrics sums every process's (receiver.metrics.Combined),
read over loopback from their own ports, as a scrape would."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from receiver.metrics import ReceiverMetrics
from tests.support import free_port


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


def _process(cstores: dict[str, int], acks: list[float], depth: int) -> ReceiverMetrics:
    metrics = ReceiverMetrics()
    for calling, count in cstores.items():
        metrics.cstores.labels("0x0000", calling).inc(count)
        metrics.bytes.inc(1000 * count)
    for seconds in acks:
        metrics.ack_seconds.observe(seconds)
    metrics.spool_depth.set(depth)
    return metrics


def test_the_first_port_sums_every_process() -> None:
    first = _process({"CT1": 3}, [0.001, 0.004], depth=7)
    second = _process({"CT1": 2, "MR1": 5}, [0.004, 0.2, 3.0], depth=9)
    second_port, first_port, gone_port = free_port(), free_port(), free_port()
    second.serve(second_port, host="127.0.0.1")
    first.serve(first_port, host="127.0.0.1", peers=[second_port])

    combined = _scrape(first_port)
    assert _value(combined, "dicom_ingest_cstore_total", status="0x0000",
                  calling_aet="CT1") == 5
    # a label set only the other process has seen
    assert _value(combined, "dicom_ingest_cstore_total", status="0x0000",
                  calling_aet="MR1") == 5
    assert _value(combined, "dicom_ingest_received_bytes_total") == 10_000
    assert _value(combined, "dicom_ingest_ack_seconds_count") == 5
    assert _value(combined, "dicom_ingest_ack_seconds_bucket", le="0.005") == 3
    assert _value(combined, "dicom_ingest_ack_seconds_bucket", le="+Inf") == 5
    assert abs(_value(combined, "dicom_ingest_ack_seconds_sum") - 3.209) < 1e-9
    # the spool they share: one depth, not two added up
    assert _value(combined, "dicom_ingest_spool_depth") == 9
    assert _value(combined, "dicom_ingest_receiver_processes") == 2

    # each other port still serves its own process alone
    alone = _scrape(second_port)
    assert _value(alone, "dicom_ingest_cstore_total", status="0x0000", calling_aet="CT1") == 2
    assert ("dicom_ingest_receiver_processes", ()) not in alone

    # a process that does not answer is left out, and the count says so
    lonely = _process({"CT1": 1}, [], depth=0)
    lonely_port = free_port()
    lonely.serve(lonely_port, host="127.0.0.1", peers=[gone_port])
    left = _scrape(lonely_port)
    assert _value(left, "dicom_ingest_cstore_total", status="0x0000", calling_aet="CT1") == 1
    assert _value(left, "dicom_ingest_receiver_processes") == 1


def test_a_port_serving_something_else_is_left_out() -> None:
    """Another program on a receiver process's metrics port (the workers' metrics, say, on
    one machine) is not summed in, and the count of processes says one is missing."""
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    other = CollectorRegistry()
    Counter("dicom_ingest_archived", "not a receiver's", registry=other).inc(7)
    other_port, first_port = free_port(), free_port()
    start_http_server(other_port, addr="127.0.0.1", registry=other)
    first = _process({"CT1": 2}, [0.01], depth=1)
    first.serve(first_port, host="127.0.0.1", peers=[other_port])
    combined = _scrape(first_port)
    assert _value(combined, "dicom_ingest_receiver_processes") == 1
    assert _value(combined, "dicom_ingest_cstore_total", status="0x0000", calling_aet="CT1") == 2
    assert ("dicom_ingest_archived_total", ()) not in combined


def test_up_refuses_worker_metrics_on_a_receiver_process_port() -> None:
    from dicom_ingest.up import metrics_port_clash
    from ingest.settings import Settings

    two = Settings(metrics_port=9110, worker_metrics_port=9111, receiver_processes=2)
    clash = metrics_port_clash(two)
    assert clash is not None and "9110 to 9111" in clash
    assert metrics_port_clash(two.replace(receiver_processes=1)) is None
    assert metrics_port_clash(two.replace(worker_metrics_port=9120)) is None
    assert metrics_port_clash(two.replace(metrics_port=0)) is None
