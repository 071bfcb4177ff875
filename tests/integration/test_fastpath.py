"""The receiver's two ways in: the fast path (every C-STORE by default) and pynetdicom's
handler (INGEST_RECEIVER_FAST_PATH=0, and whatever the fast path leaves to it). Checked at
the spool, the receiver's side of the contract: what the sender saw, the entry's bytes,
its receipt."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pydicom
import pytest

from ingest.settings import Settings
from ingest.spool import Spool
from receiver import statuses
from tests.support import dataset_bytes, make_instance, pynetdicom_send, split_part10

pytestmark = pytest.mark.integration


def entries(settings: Settings) -> dict[str, tuple[Any, bytes]]:
    """SOP Instance UID -> (receipt, entry file bytes) of every spool entry."""
    spool = Spool(settings.spool_dir)
    out = {}
    for rid in spool.receipt_ids():
        receipt = spool.read_receipt(rid)
        assert receipt is not None
        out[receipt.sop_instance_uid] = (receipt, spool.dcm_path(rid).read_bytes())
    return out


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "pynetdicom"])
@pytest.mark.parametrize("max_pdu", [0, 4096], ids=["large-pdus", "4k-pdus"])
def test_stored_bytes_and_receipt(tmp_path: Path, settings: Settings, start_receiver: Any,
                                  fast_path: bool, max_pdu: int) -> None:
    """Instances large and small, over PDUs the sender cuts to our maximum: every one acked
    and spooled with the sender's dataset bytes, a File Meta that says what was received,
    and a receipt whose size and sha256 are the file's."""
    receiver = start_receiver(settings.replace(receiver_fast_path=fast_path, max_pdu=max_pdu))
    files = {}
    for n, size in enumerate((0, 1000, 70_000, 600_000, 3_000_000)):
        files[make_instance(tmp_path / f"{n}.dcm", pixel_bytes=size)] = tmp_path / f"{n}.dcm"
    sent = pynetdicom_send(receiver.port, files.values(), calling="MODALITY1")
    assert sent == [statuses.SUCCESS] * len(files)
    spooled = entries(settings)
    assert set(spooled) == set(files)
    for uid, (receipt, data) in spooled.items():
        meta, body = split_part10(data)
        assert body == dataset_bytes(files[uid])
        assert receipt.size == len(data) and receipt.dataset_offset == len(meta)
        assert receipt.sha256 == hashlib.sha256(data).hexdigest()
        assert receipt.calling_aet == "MODALITY1" and receipt.called_aet == "DICOM-INGEST"
        read = pydicom.filereader.read_file_meta_info(settings.spool_dir / "entries"
                                                     / f"{receipt.receipt_id}.dcm")
        assert read.MediaStorageSOPInstanceUID == uid
        assert read.TransferSyntaxUID == receipt.transfer_syntax == "1.2.840.10008.1.2.1"
        if fast_path:  # our File Meta names both AE titles (a receipt can be rebuilt)
            assert read.SourceApplicationEntityTitle.strip() == "MODALITY1"
            assert read.ReceivingApplicationEntityTitle.strip() == "DICOM-INGEST"


def test_echo_between_stores_on_one_association(tmp_path: Path, settings: Settings,
                                                start_receiver: Any) -> None:
    """C-ECHO goes through pynetdicom, C-STORE through the fast path, on one association."""
    from pynetdicom import AE, _config

    receiver = start_receiver(settings)
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="MIXED")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="DICOM-INGEST")
    assert assoc.is_established
    seen = []
    try:
        for n in range(3):
            make_instance(tmp_path / f"{n}.dcm", pixel_bytes=5000)
            seen.append(int(assoc.send_c_echo().Status))
            seen.append(int(assoc.send_c_store(tmp_path / f"{n}.dcm").Status))
        seen.append(int(assoc.send_c_echo().Status))
    finally:
        assoc.release()
    assert seen == [statuses.SUCCESS] * 7
    assert len(entries(settings)) == 3
