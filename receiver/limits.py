"""What a peer may make the receiver read: PDUs bounded by size, by state and, before an
association exists, by time.

pynetdicom reads every PDU whole, whatever length its header declares: a stranger could make
the receiver buffer gigabytes before the AE allow-list or the TLS client check ever saw it.
Here each PDU's header is checked before its body is read:

- before the association is established (and after an abort), a PDU is at most
  :data:`PRE_ASSOCIATION_LIMIT` bytes (an A-ASSOCIATE-RQ is a few KB), and while we await the
  A-ASSOCIATE-RQ, any other PDU but an A-ABORT is a protocol error;
- before the association, a PDU must arrive whole while the ARTIM timer (the ACSE timeout)
  runs: one that trickles in does not hold the connection past it;
- once established, a P-DATA-TF PDU is at most the maximum length we announced (none by
  default: the fast path streams datasets to disk), any other PDU is at most
  :data:`PRE_ASSOCIATION_LIMIT` bytes.

A PDU refused is never read: the association is aborted (A-ABORT), the connection closed,
the abort counted by reason and logged with the peer's address.

:class:`PduLimits` replaces ``DULServiceProvider._read_pdu_data`` on each association, and
the fast path asks it about the PDUs it reads itself; both reach pynetdicom's reader through
:mod:`receiver.internals`.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Any

from receiver import internals
from receiver.metrics import ReceiverMetrics
from receiver.reactors import wait_readable

log = logging.getLogger("dicom_ingest.receiver")

PRE_ASSOCIATION_LIMIT = 64 * 1024  # bytes: an A-ASSOCIATE-RQ is a few KB
_READ = 64 * 1024  # most bytes read from the socket at once
_HEADER = struct.Struct(">BBI")  # type, reserved, length
_A_ASSOCIATE_RQ, _P_DATA_TF, _A_ABORT = 0x01, 0x04, 0x07
_PDU_TYPES = range(0x01, 0x08)
# Sta2: the transport is open, no A-ASSOCIATE-RQ yet. Sta1 too: pynetdicom's reactor reads
# the socket before it takes the "connection open" event (Evt5) off its queue.
_AWAITING_REQUEST = frozenset({"Sta1", "Sta2"})
_ASSOCIATED = frozenset({"Sta6", "Sta7", "Sta8", "Sta9", "Sta10", "Sta11", "Sta12"})


def refusal(state: str, pdu_type: int, length: int, max_length: int) -> str | None:
    """Why a PDU of this type and length must not be read in this state of the DUL's state
    machine (a metric label); None: read it. ``max_length``: the maximum PDU length we
    announced (0: none)."""
    if pdu_type not in _PDU_TYPES:
        return "unknown-pdu-type"
    if state in _AWAITING_REQUEST and pdu_type not in (_A_ASSOCIATE_RQ, _A_ABORT):
        return "unexpected-pdu"
    if state in _ASSOCIATED and pdu_type == _P_DATA_TF:
        return "pdu-too-large" if 0 < max_length < length else None
    return "pdu-too-large" if length > PRE_ASSOCIATION_LIMIT else None


class PduLimits:
    """Installed on one association's DUL when its connection opens."""

    def __init__(self, dul: internals.Dul, metrics: ReceiverMetrics) -> None:
        self.dul = dul
        self.metrics = metrics
        self.refused = False  # once refused, nothing more is read: the connection closes
        # our maximum PDU length (0: none): pynetdicom sets it before the connection opens
        self._announced = int(dul.assoc.acceptor.maximum_length or 0)

    def install(self) -> None:
        self.dul.replace_reader(self.read_pdu)

    def admit(self, pdu_type: int, length: int) -> bool:
        """May a PDU with this header be read now? If not, the association is aborted."""
        state = self.dul.state
        reason = refusal(state, pdu_type, length, self._announced)
        if reason is None:
            return True
        self.refuse(reason, f"PDU type 0x{pdu_type:02X} of {length} bytes in {state}")
        return False

    def refuse(self, reason: str, what: str) -> None:
        """Count and log a protocol abort; pynetdicom sends the A-ABORT (invalid PDU) and
        the next read closes the connection."""
        dul = self.dul
        self.refused = True
        self.metrics.protocol_aborts.labels(reason).inc()
        log.warning("protocol abort reason=%s peer=%s: %s", reason, _peer(dul), what)
        if dul.state in _AWAITING_REQUEST:
            # the association thread waits for an A-ASSOCIATE-RQ that will never come: end
            # that wait now instead of holding a slot until it times out
            dul.end_request_wait()
        dul.event("Evt19")  # invalid PDU: A-ABORT

    # -- reading -------------------------------------------------------------------------

    def read_pdu(self) -> None:
        """Replaces ``DULServiceProvider._read_pdu_data``: one PDU, if its header allows."""
        dul = self.dul
        if self.refused:
            if dul.transport is not None:
                dul.transport.close()  # Evt17, transport closed
            return
        deadline = None
        if dul.state not in _ASSOCIATED:
            timer = dul.artim_timer
            if timer.timeout is not None:
                deadline = time.monotonic() + max(0.0, timer.remaining)
        header = self._recv(_HEADER.size, deadline)
        if header is None:
            return
        pdu_type, _, length = _HEADER.unpack(header)
        if not self.admit(pdu_type, length):
            return
        body = self._recv(length, deadline)
        if body is None:
            return
        if not dul.deliver(header + body):  # pynetdicom aborts the association
            log.error("unable to decode a PDU from %s: aborting the association", _peer(dul))

    def _recv(self, count: int, deadline: float | None) -> bytearray | None:
        """Exactly ``count`` bytes, read as they arrive (what is held is what was sent);
        None when the peer went away (Evt17) or ``deadline`` passed (refused) first."""
        sock: Any = self.dul.sock
        data = bytearray()
        try:
            while len(data) < count:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0 or not wait_readable(sock, left):
                        self.refuse("timeout", f"{len(data)} of {count} bytes of a PDU "
                                    "arrived within the ACSE timeout")
                        return None
                got = sock.recv(min(count - len(data), _READ))
                if not got:
                    break
                data += got
        except (OSError, ValueError, AttributeError):
            pass
        if len(data) < count:
            self.dul.event("Evt17")
            return None
        return data


def _peer(dul: internals.Dul) -> str:
    requestor = dul.assoc.requestor
    return f"{requestor.address}:{requestor.port}"


def installed(assoc: Any, metrics: ReceiverMetrics) -> PduLimits:
    """The limits on this association's DUL, installed now if they are not yet."""
    limits = getattr(assoc, "_dicom_ingest_limits", None)
    if not isinstance(limits, PduLimits):
        limits = PduLimits(internals.Dul(assoc.dul), metrics)
        limits.install()
        assoc._dicom_ingest_limits = limits
    return limits


def on_connection(event: Any, metrics: ReceiverMetrics) -> None:
    """EVT_CONN_OPEN handler: bound what this association's DUL reads."""
    if getattr(event.assoc, "is_acceptor", True):
        installed(event.assoc, metrics)
