"""Quarantine tools: list what failed validation, and replay it through the pipeline."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ingest.keys import normalize_prefix, quarantine_keys
from ingest.messages import MessageError, check_receipt_id
from ingest.spool import Receipt, Spool, SpoolError, file_digests
from workers.archive import Archive

log = logging.getLogger("dicom_ingest.quarantine")


@dataclass(frozen=True)
class Record:
    receipt_id: str
    reason: str
    message: str
    sop_instance_uid: str
    calling_aet: str
    received_at: float
    quarantined_at: float


def records(archive: Archive, prefix: str) -> list[Record]:
    """Every quarantine record, oldest first."""
    base = f"{normalize_prefix(prefix)}quarantine/"
    out = []
    for key in archive.list_keys(base):
        if not key.endswith(".json"):
            continue
        try:
            body: dict[str, Any] = json.loads(archive.read_bytes(key))
            receipt = body["receipt"]
            out.append(Record(receipt["receipt_id"], body["reason"], body["message"],
                              receipt["sop_instance_uid"], receipt["calling_aet"],
                              float(receipt["received_at"]), float(body["quarantined_at"])))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
            log.warning("unreadable quarantine record %s: %s", key, exc)
    return sorted(out, key=lambda r: r.receipt_id)


def replay(archive: Archive, prefix: str, spool: Spool, receipt_id: str,
           enqueue: Callable[[str], None]) -> None:
    """Put a quarantined object back into the spool under its receipt and enqueue it: it goes
    through validation again (after a fix, a changed setting). The spool entry is durable
    before the quarantine copy is removed."""
    check_receipt_id(receipt_id)
    data_key, reason_key = quarantine_keys(prefix, receipt_id)
    try:
        body = json.loads(archive.read_bytes(reason_key))
        receipt = Receipt.decode(json.dumps(body["receipt"]).encode())
    except (ValueError, KeyError, SpoolError) as exc:
        raise MessageError(f"quarantine record {reason_key} is unreadable: {exc}") from exc
    if spool.read_receipt(receipt_id) is not None:
        raise MessageError(f"{receipt_id} is already in the spool")
    tmp = spool.tmp / f"replay-{receipt_id}.dcm"
    archive.download(data_key, tmp)
    size, sha256, crc32 = file_digests(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    spool.commit(tmp, replace(receipt, size=size, sha256=sha256, crc32=crc32))
    archive.delete(data_key)
    archive.delete(reason_key)
    enqueue(receipt_id)
    log.info("replayed receipt=%s sop=%s", receipt_id, receipt.sop_instance_uid)
