"""Spool entries made as the receiver makes them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pydicom

from tests.support.dicom import crc32, make_instance, sha256, split_part10


def spool_entry(spool: Any, part10: bytes, calling: str = "TEST", legacy: bool = False) -> Any:
    """Commit a Part 10 file to ``spool`` as the receiver would (a receipt with the file's
    CRC-32; ``legacy``: with its sha256 instead, as receivers before receipt version 2
    wrote them); returns its Receipt."""
    import time as _time

    from ingest.spool import Receipt, new_receipt_id

    meta_bytes, _ = split_part10(part10)
    tmp = spool.tmp / f"received-{random.randrange(1 << 30)}.dcm"
    tmp.write_bytes(part10)
    meta = pydicom.filereader.read_file_meta_info(tmp)
    receipt = Receipt(
        receipt_id=new_receipt_id(), calling_aet=calling, called_aet="DICOM-INGEST",
        peer="127.0.0.1:1", received_at=_time.time(),
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax=str(meta.TransferSyntaxUID), size=len(part10),
        dataset_offset=len(meta_bytes), sha256=sha256(part10) if legacy else "",
        crc32="" if legacy else crc32(part10), version=1 if legacy else 2)
    spool.commit(tmp, receipt)
    return receipt

def spool_entries(spool: Any, folder: Path, count: int) -> list[Any]:
    """``count`` new instances (``folder/0.dcm`` ...) committed to ``spool``; their Receipts."""
    receipts = []
    for n in range(count):
        make_instance(folder / f"{n}.dcm")
        receipts.append(spool_entry(spool, (folder / f"{n}.dcm").read_bytes()))
    return receipts
