"""The C-STORE and C-ECHO handlers: durable spool write first, ``0x0000`` second, enqueue last.

Handlers are plain functions; what they need arrives as the extra argument of the
``evt_handlers`` 3-tuple (a :class:`StoreContext`), never as a global.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ingest.spool import Receipt, Spool, new_receipt_id
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


class SpoolFull(Exception):
    """Back-pressure: the spool is below its free-space floor or past a depth or age limit."""


def handle_echo(event: Any) -> int:
    return statuses.SUCCESS


def handle_store(event: Any, ctx: StoreContext) -> int:
    """Make the instance durable, then answer. No exception leaves this function."""
    started = time.monotonic()
    try:
        calling = str(event.assoc.requestor.ae_title).strip()
        status = _store(event, ctx, calling)
        ctx.metrics.cstores.labels(f"0x{status:04X}", calling).inc()
        ctx.metrics.ack_seconds.observe(time.monotonic() - started)
    except Exception:  # _store catches its own; this is for the bookkeeping around it
        log.exception("C-STORE status=0xA7FF: unexpected error")
        return statuses.OUT_OF_RESOURCES_UNEXPECTED
    return status


def _store(event: Any, ctx: StoreContext, calling: str) -> int:
    try:
        receipt = _spool_instance(event, ctx, calling)
    except SpoolFull as exc:
        log.warning("C-STORE status=0xA700 calling=%s sop=%s: %s", calling, _sop(event), exc)
        return statuses.OUT_OF_RESOURCES
    except OSError as exc:
        log.error("C-STORE status=0xA700 calling=%s sop=%s: spool write failed: %s",
                  calling, _sop(event), exc)
        return statuses.OUT_OF_RESOURCES
    except Exception:
        log.exception("C-STORE status=0xA7FF calling=%s sop=%s: unexpected error",
                      calling, _sop(event))
        return statuses.OUT_OF_RESOURCES_UNEXPECTED
    try:
        ctx.enqueuer.submit(receipt.receipt_id)
    except Exception:  # the entry is durable; the sweeper will enqueue it
        log.exception("enqueue hand-off failed for receipt %s", receipt.receipt_id)
    ctx.metrics.bytes.inc(receipt.size)
    log.info("C-STORE status=0x0000 receipt=%s sop=%s calling=%s bytes=%d ts=%s",
             receipt.receipt_id, receipt.sop_instance_uid, calling, receipt.size,
             receipt.transfer_syntax)
    return statuses.SUCCESS


def _sop(event: Any) -> str:
    return str(getattr(event.request, "AffectedSOPInstanceUID", ""))


def _spool_instance(event: Any, ctx: StoreContext, calling: str) -> Receipt:
    refusal = ctx.gate.refusal()
    if refusal is not None:
        raise SpoolFull(refusal)
    request = event.request
    # pynetdicom streamed preamble, File Meta and the sender's dataset bytes to this file
    # (STORE_RECV_CHUNKED_DATASET, temp dir on the spool filesystem).
    path: Path = event.dataset_path
    stream = getattr(request, "_dataset_file", None)
    if isinstance(stream, SpoolTempFile):
        stream.sync()  # raises if the spool's disk failed while the dataset arrived
        size, sha256, offset = stream.size, stream.digest.hexdigest(), _dataset_offset(stream.head)
    else:  # not streamed through our file (pynetdicom changed): read it back
        if stream is not None:
            stream.flush()
        size, sha256, offset = _hash_and_sync(path)
    requestor = event.assoc.requestor
    receipt = Receipt(
        receipt_id=new_receipt_id(),
        calling_aet=calling,
        called_aet=str(event.assoc.acceptor.ae_title).strip(),
        peer=f"{requestor.address}:{requestor.port}",
        received_at=time.time(),
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        transfer_syntax=str(event.context.transfer_syntax),
        size=size,
        dataset_offset=offset,
        sha256=sha256,
    )
    ctx.spool.commit(path, receipt)
    ctx.gate.stored()
    return receipt


def _hash_and_sync(path: Path) -> tuple[int, str, int]:
    """Size, sha256 and dataset offset of the received file, after fsyncing it."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        head = fh.read(_CHUNK)
        offset = _dataset_offset(head)
        while head:
            digest.update(head)
            size += len(head)
            head = fh.read(_CHUNK)
        os.fsync(fh.fileno())
    return size, digest.hexdigest(), offset


def _dataset_offset(head: bytes) -> int:
    """End of the File Meta that pynetdicom wrote: (0002,0000) UL group length comes first."""
    start = _PREAMBLE_AND_MAGIC
    if head[128:start] != b"DICM" or head[start : start + 6] != b"\x02\x00\x00\x00UL":
        raise ValueError("the received file does not start with a File Meta group length")
    (group_length,) = struct.unpack_from("<I", head, start + 8)
    return start + 12 + int(group_length)
