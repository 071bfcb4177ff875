"""A backlog for the receive runs: entries already waiting in the receiver's spool when it
starts, as after the workers stopped for a while (the outage the spool exists for)."""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import pydicom

from bench.corpus import make_corpus
from ingest.spool import Receipt, Spool, crc32_hex, new_receipt_id

#: bytes of pixel data in each backlog entry: small, so that 20,000 take little disk and time
ENTRY_PIXEL_BYTES = 1024
#: the disk one entry takes, about (a block for its file, one for its receipt attribute)
ENTRY_BYTES = 8192
#: settings of ours for a backlog run: the sweeper must not re-enqueue the backlog (its
#: entries grow older than the default sweep age during the bench), and no depth limit
BACKLOG_ENV = {"INGEST_SWEEP_AGE": str(10 * 365 * 86400), "INGEST_SPOOL_MAX_DEPTH": "0"}


def make_backlog(root: Path, count: int) -> Spool:
    """A spool under ``root`` holding ``count`` entries, each a small instance of its own
    (its own SOP Instance UID) committed with :meth:`Spool.commit` as the receiver commits
    one (made once per bench run; each run links them into a spool of its own)."""
    source = make_corpus(root / "source", 1, ENTRY_PIXEL_BYTES)[0]
    part10 = source.read_bytes()
    meta = pydicom.filereader.read_file_meta_info(source)
    uid = str(meta.MediaStorageSOPInstanceUID)
    offset = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    spool = Spool(root / "spool")
    spool.ensure()
    for n in range(count):
        # the same length as the source's UID (its last component is long: the digits
        # replaced never start it), so only the two UID values change
        entry_uid = f"{uid[:-7]}{1_000_000 + n:07d}"
        data = part10.replace(uid.encode(), entry_uid.encode())
        tmp = spool.tmp / f"backlog-{n}.dcm"
        tmp.write_bytes(data)
        spool.commit(tmp, Receipt(
            receipt_id=new_receipt_id(), calling_aet="BENCH", called_aet="DICOM-INGEST",
            peer="127.0.0.1:1", received_at=time.time(),
            sop_class_uid=str(meta.MediaStorageSOPClassUID), sop_instance_uid=entry_uid,
            transfer_syntax=str(meta.TransferSyntaxUID), size=len(data),
            dataset_offset=offset, sha256="", crc32=crc32_hex(zlib.crc32(data))))
    return spool


def link_backlog(backlog: Spool, root: Path) -> None:
    """Make ``root`` a spool holding the entries of ``backlog``, as hard links: a second or
    so for 20,000, no data copied. The receiver only lists and counts them (no workers run),
    so the two spools can share their files."""
    spool = Spool(root)
    spool.ensure()
    for name in os.listdir(backlog.entries):
        os.link(backlog.entries / name, spool.entries / name)
