"""Peers that never say who they are: what they can make a receiver process hold."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import pytest

from receiver import statuses
from tests.e2e.test_operations import scrape, value
from tests.faults.harness import instances
from tests.processes import start_pipeline
from tests.support import free_port, need, pynetdicom_send

pytestmark = pytest.mark.e2e

JUNK = 50 * 2**20  # bytes each hostile connection tries to send after its PDU header
_HUGE = 0x7FFF_0000  # the PDU length they declare: about 2 GB
FLOODS = {  # PDU header sent first -> the reason the receiver counts
    "A-ASSOCIATE-RQ of 2 GB": (struct.pack(">BBI", 0x01, 0, _HUGE), "pdu-too-large"),
    "P-DATA-TF before any association": (struct.pack(">BBI", 0x04, 0, _HUGE),
                                         "unexpected-pdu"),
}


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _flood(port: int, header: bytes, sent: list[int]) -> None:
    """Send ``header`` and then up to :data:`JUNK` zeros; stop when the receiver closes."""
    zeros = bytes(2**20)
    total = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(header)
            while total < JUNK:
                sock.sendall(zeros)
                total += len(zeros)
        except OSError:  # reset or broken pipe: the receiver let go
            pass
    sent.append(total)


def test_junk_before_association_is_not_buffered(tmp_path: Path, redis_url: str) -> None:
    """Four connections declare 2 GB PDUs before associating and send 200 MB of zeros
    between them while a legitimate sender stores instances: each is aborted after its
    PDU header, counted and logged, the receiver's peak RSS stays where it was, and every
    instance is stored."""
    need(Path("/proc/self/status").exists(), "/proc (to read the receiver's RSS)")
    rport = free_port()
    with start_pipeline(tmp_path, redis_url, metrics_port=rport) as pipeline:
        pid = pipeline.processes["receiver"].pid
        files = instances(tmp_path / "in", 10)
        assert pynetdicom_send(pipeline.port, files[:2]) == [statuses.SUCCESS] * 2  # warm
        peak_before = _status_kb(pid, "VmHWM")

        sent: list[int] = []
        floods = [threading.Thread(target=_flood, args=(pipeline.port, header, sent))
                  for header, _ in FLOODS.values() for _ in range(2)]
        for flood in floods:
            flood.start()
        during = pynetdicom_send(pipeline.port, files[2:6])
        for flood in floods:
            flood.join(120)
        after = pynetdicom_send(pipeline.port, files[6:])
        peak_after = _status_kb(pid, "VmHWM")
        grown_mb = (peak_after - peak_before) / 1024
        print(f"receiver peak RSS {peak_before / 1024:.0f} MB -> {peak_after / 1024:.0f} MB "
              f"(RSS now {_status_kb(pid, 'VmRSS') / 1024:.0f} MB); junk sent per "
              f"connection: {[n // 2**20 for n in sent]} MB")

        assert during == after == [statuses.SUCCESS] * 4
        assert not any(flood.is_alive() for flood in floods)
        assert grown_mb < 40, f"the receiver's peak RSS grew {grown_mb:.0f} MB"
        assert len(sent) == len(floods) and max(sent) < JUNK, "a flood was read in full"
        metrics = scrape(rport)
        for _, reason in FLOODS.values():
            assert value(metrics, "dicom_ingest_receiver_protocol_aborts_total",
                         reason=reason) == 2
        assert pipeline.log("receiver").count("protocol abort") >= 4
        assert "peer=127.0.0.1:" in pipeline.log("receiver")
