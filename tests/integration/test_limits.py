"""What a peer may make the receiver read (receiver.limits), from raw sockets: a PDU past its
bound is aborted unread, counted and logged, and the next sender is served."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from ingest.scu import associate
from ingest.settings import Settings
from receiver import statuses
from tests.support import make_instance, pynetdicom_send, wait_for

pytestmark = pytest.mark.integration
CT_UID = "1.2.840.10008.5.1.4.1.1.2"
_HUGE = 0x7FFF_0000  # about 2 GB


def _aborts(receiver: Any, reason: str) -> float:
    value = receiver.metrics.registry.get_sample_value(
        "dicom_ingest_receiver_protocol_aborts_total", {"reason": reason})
    return value or 0.0


def _send_until_closed(sock: socket.socket, data: bytes, most: int) -> int:
    """Send ``data`` again and again, ``most`` bytes at most; how many went before the
    receiver closed the connection."""
    sent = 0
    with contextlib.suppress(OSError):
        while sent < most:
            sock.sendall(data)
            sent += len(data)
    return sent


def _closed_by_peer(sock: socket.socket) -> bool:
    """Read what the receiver still sends (an A-ABORT) until it closes the connection;
    False if it is still open when the socket's timeout runs out."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _served(receiver: Any, tmp_path: Path) -> bool:
    make_instance(tmp_path / "next.dcm")
    return pynetdicom_send(receiver.port, [tmp_path / "next.dcm"]) == [statuses.SUCCESS]


@pytest.mark.parametrize(("pdu_type", "reason"), [(0x01, "pdu-too-large"),
                                                  (0x04, "unexpected-pdu")],
                         ids=["A-ASSOCIATE-RQ of 2 GB", "P-DATA-TF before association"])
def test_junk_before_association_is_refused_unread(
        tmp_path: Path, settings: Settings, start_receiver: Any, pdu_type: int, reason: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The connection is closed after the PDU header, and its association thread ends then,
    not when the ACSE timeout (here 10 minutes) would have ended it."""
    receiver = start_receiver(settings)
    receiver.server.ae.acse_timeout = 600  # for the associations accepted from now on
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as sock:
        sock.sendall(struct.pack(">BBI", pdu_type, 0, _HUGE))
        sent = _send_until_closed(sock, bytes(2**20), 64 * 2**20)
        assert _closed_by_peer(sock)
    assert sent < 64 * 2**20
    wait_for(lambda: not receiver.server.active_associations, 60,
             what="the refused association's thread to end")
    assert _aborts(receiver, reason) == 1
    assert f"protocol abort reason={reason} peer=127.0.0.1:" in caplog.text
    assert _served(receiver, tmp_path)


def test_an_association_request_that_trickles_in_is_cut_at_the_acse_timeout(
        tmp_path: Path, settings: Settings, start_receiver: Any) -> None:
    """A peer that keeps sending its A-ASSOCIATE-RQ a byte at a time, each within the
    network timeout, is closed when the ACSE timeout (the ARTIM timer) runs out."""
    receiver = start_receiver(settings)
    receiver.server.ae.acse_timeout = 1.0
    declared = 400
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as sock:
        sock.sendall(struct.pack(">BBI", 0x01, 0, declared))
        sent = 0
        # a byte every 50 ms (20 s in all) until the receiver answers or closes
        while sent < declared and not select.select([sock], [], [], 0.05)[0]:
            sock.sendall(b"\0")
            sent += 1
        assert _closed_by_peer(sock)
    assert sent < declared
    assert _aborts(receiver, "timeout") == 1
    assert _served(receiver, tmp_path)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast path", "pynetdicom"])
@pytest.mark.parametrize(("header", "reason"), [
    (struct.pack(">BBI", 0x04, 0, 100_000), "pdu-too-large"),  # we announced 16 KB
    (struct.pack(">BBI", 0x05, 0, _HUGE), "pdu-too-large"),  # an A-RELEASE-RQ is 10 bytes
], ids=["P-DATA-TF past our maximum", "A-RELEASE-RQ of 2 GB"])
def test_a_pdu_past_its_bound_aborts_an_association(
        tmp_path: Path, settings: Settings, start_receiver: Any, fast_path: bool,
        header: bytes, reason: str) -> None:
    from pynetdicom import AE

    receiver = start_receiver(settings.replace(max_pdu=16384, receiver_fast_path=fast_path))
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CT_UID, "1.2.840.10008.1.2.1")
    assoc = associate(ae, "127.0.0.1", receiver.port, ae_title="DICOM-INGEST")
    assert assoc.is_established
    with contextlib.suppress(OSError):  # closed already
        assoc.dul.socket.send(header + bytes(2**20))
    wait_for(lambda: assoc.is_aborted, 30, what="the receiver's A-ABORT")
    assert _aborts(receiver, reason) == 1
    assert _served(receiver, tmp_path)
