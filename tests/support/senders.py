"""Senders: a pynetdicom SCU that sends Part 10 files with their dataset bytes untouched."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pydicom

from ingest.scu import associate


def pynetdicom_send(port: int, files: Iterable[Path], calling: str = "PYNETDICOM",
                    called: str = "DICOM-INGEST") -> list[int | None]:
    """Send Part 10 files over one association, their dataset bytes untouched; the statuses
    the sender saw (None where no response came)."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes after the File Meta as they are
    files = list(files)
    ae = AE(ae_title=calling)
    contexts = set()
    for path in files:
        meta = pydicom.filereader.read_file_meta_info(path)
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, ts)
    assoc = associate(ae, "127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association was not established"
    statuses: list[int | None] = []
    try:
        for path in files:
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if "Status" in status else None)
    finally:
        assoc.release()
    return statuses


def commitment_request(transaction_uid: str,
                       references: Iterable[tuple[str, str]]) -> pydicom.Dataset:
    """A Storage Commitment N-ACTION's information: the transaction and each referenced
    (SOP Class UID, SOP Instance UID)."""
    info = pydicom.Dataset()
    info.TransactionUID = transaction_uid
    items = []
    for sop_class, instance in references:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = instance
        items.append(item)
    info.ReferencedSOPSequence = items
    return info
