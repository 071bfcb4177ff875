"""The C-STORE and C-ECHO handlers: durable spool write first, ``0x0000`` second, enqueue last.

:func:`store` is the one place an instance becomes durable; both ways a C-STORE arrives use
it: the fast path (:mod:`receiver.fastpath`, nearly every C-STORE) and pynetdicom's
EVT_C_STORE handler below (what the fast path leaves to pynetdicom).

Handlers are plain functions; what they need arrives as the extra argument of the
``evt_handlers`` 3-tuple (a :class:`StoreContext`), never as a global.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from ingest.spool import Receipt, Spool, file_digests, new_receipt_id
from receiver import statuses
from receiver.metrics import ReceiverMetrics
from receiver.streams import SpoolTempFile

log = logging.getLogger("dicom_ingest.receiver")

_CHUNK = 1 << 20
_PREAMBLE_AND_MAGIC = 132


class Enqueuer(Protocol):
    def submit(self, receipt_id: str) -> None: ...


class Gate(Protocol):
    def refusal(self) -> str | None: ...

    def stored(self) -> None: ...


@dataclass
class StoreContext:
    """The C-STORE handler's dependencies."""

    spool: Spool
    enqueuer: Enqueuer
    gate: Gate
    metrics: ReceiverMetrics
    #: makes the spool file a dataset streams into (the same for pynetdicom's path)
    new_stream: Callable[[], SpoolTempFile]


class Received(NamedTuple):
    """A received file, written out but not yet fsynced."""

    path: Path | str
    size: int
    crc32: str  # of the whole file, as :func:`ingest.spool.crc32_hex` spells it
    dataset_offset: int
    fd: int = -1  # the file still open, for the commit's fsync; -1: the commit opens it


class SpoolFull(Exception):
    """Back-pressure: the spool is below its free-space floor or past a depth or age limit."""


def handle_echo(event: Any) -> int:
    return statuses.SUCCESS


@dataclass(frozen=True)
class Arrival:
    """One C-STORE request as the receiver saw it, whichever path received it."""

    calling: str
    called: str
    peer: str
    sop_class_uid: str  # as in the request
    sop_instance_uid: str  # as in the request
    transfer_syntax: str  # the negotiated one


def handle_store(event: Any, ctx: StoreContext) -> int:
    """pynetdicom's EVT_C_STORE handler (for the C-STOREs the fast path leaves to pynetdicom).
    No exception leaves this function."""
    started = time.monotonic()
    try:
        assoc, request = event.assoc, event.request
        arrival = Arrival(
            calling=str(assoc.requestor.ae_title).strip(),
            called=str(assoc.acceptor.ae_title).strip(),
            peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
            sop_class_uid=str(getattr(request, "AffectedSOPClassUID", "")),
            sop_instance_uid=str(getattr(request, "AffectedSOPInstanceUID", "")),
            transfer_syntax=str(event.context.transfer_syntax),
        )
    except Exception:
        log.exception("C-STORE status=0xA7FF: unexpected error")
        return statuses.OUT_OF_RESOURCES_UNEXPECTED
    stream = getattr(event.request, "_dataset_file", None)
    status, receipt = store(ctx, arrival, lambda: _received(event, stream))
    if receipt is not None:
        if isinstance(stream, SpoolTempFile):
            # the entry is this file now: let go of the lock its temp name took before a
            # worker tries to claim it (pynetdicom closes it again after we return)
            stream.close()
        hand_off(ctx, receipt)
    account(ctx, arrival, status, started)
    return status


def store(ctx: StoreContext, arrival: Arrival,
          received: Callable[[], Received]) -> tuple[int, Receipt | None]:
    """Make one arrived instance durable in the spool: the status to answer and the receipt.

    ``received`` finishes writing the received file and says what it is; the spool's commit
    fsyncs it with its receipt.
    No exception leaves this function.
    """
    try:
        refusal = ctx.gate.refusal()
        if refusal is not None:
            raise SpoolFull(refusal)
        path, size, crc32, offset, fd = received()
        receipt = Receipt(
            receipt_id=new_receipt_id(),
            calling_aet=arrival.calling,
            called_aet=arrival.called,
            peer=arrival.peer,
            received_at=time.time(),
            sop_class_uid=arrival.sop_class_uid,
            sop_instance_uid=arrival.sop_instance_uid,
            transfer_syntax=arrival.transfer_syntax,
            size=size,
            dataset_offset=offset,
            sha256="",  # the worker takes it as it checks the file against the CRC
            crc32=crc32,
        )
        ctx.spool.commit(path, receipt, fd)
        ctx.gate.stored()
    except SpoolFull as exc:
        log.warning("C-STORE status=0xA700 calling=%s sop=%.80s: %s", arrival.calling,
                    arrival.sop_instance_uid, exc)
        return statuses.OUT_OF_RESOURCES, None
    except OSError as exc:
        log.error("C-STORE status=0xA700 calling=%s sop=%.80s: spool write failed: %s",
                  arrival.calling, arrival.sop_instance_uid, exc)
        return statuses.OUT_OF_RESOURCES, None
    except Exception:
        log.exception("C-STORE status=0xA7FF calling=%s sop=%.80s: unexpected error",
                      arrival.calling, arrival.sop_instance_uid)
        return statuses.OUT_OF_RESOURCES_UNEXPECTED, None
    ctx.metrics.bytes.inc(receipt.size)
    log.info("C-STORE status=0x0000 receipt=%s sop=%s calling=%s bytes=%d ts=%s",
             receipt.receipt_id, receipt.sop_instance_uid, arrival.calling, receipt.size,
             receipt.transfer_syntax)
    return statuses.SUCCESS, receipt


def hand_off(ctx: StoreContext, receipt: Receipt) -> None:
    """Enqueue an entry that is durable already; no exception leaves this function."""
    try:
        ctx.enqueuer.submit(receipt.receipt_id)
    except Exception:  # the entry is durable; the sweeper will enqueue it
        log.exception("enqueue hand-off failed for receipt %s", receipt.receipt_id)


def account(ctx: StoreContext, arrival: Arrival, status: int, started: float) -> None:
    """Count one answered C-STORE; no exception leaves this function."""
    try:
        ctx.metrics.cstores.labels(f"0x{status:04X}", arrival.calling).inc()
        ctx.metrics.ack_seconds.observe(time.monotonic() - started)
    except Exception:
        log.exception("C-STORE metrics failed")


def _received(event: Any, stream: Any) -> Received:
    # pynetdicom streamed preamble, File Meta and the sender's dataset bytes to this file
    # (STORE_RECV_CHUNKED_DATASET, temp dir on the spool filesystem).
    path: Path = event.dataset_path
    if isinstance(stream, SpoolTempFile):
        stream.finish()  # raises if the spool's disk failed while the dataset arrived
        return Received(path, stream.size, stream.crc.hexdigest(),
                        _dataset_offset(stream.head), stream.fd)
    if stream is not None:  # not streamed through our file (pynetdicom changed): read it back
        stream.flush()
    return Received(path, *_checksum(path))


def _checksum(path: Path) -> tuple[int, str, int]:
    """Size, CRC-32 and dataset offset of the received file."""
    with open(path, "rb") as fh:  # the group length is all it needs of the File Meta
        offset = _dataset_offset(fh.read(_PREAMBLE_AND_MAGIC + 12))
    size, _, crc32 = file_digests(path, _CHUNK, sha=False)
    return size, crc32, offset


def _dataset_offset(head: bytes) -> int:
    """End of the File Meta that pynetdicom wrote: (0002,0000) UL group length comes first."""
    start = _PREAMBLE_AND_MAGIC
    if head[128:start] != b"DICM" or head[start : start + 6] != b"\x02\x00\x00\x00UL":
        raise ValueError("the received file does not start with a File Meta group length")
    (group_length,) = struct.unpack_from("<I", head, start + 8)
    return start + 12 + int(group_length)
