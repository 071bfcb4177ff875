"""The receiver's two ways in: the fast path (every C-STORE by default) and pynetdicom's
handler (INGEST_RECEIVER_FAST_PATH=0, and whatever the fast path leaves to it). Checked at
the spool, the receiver's side of the contract: what the sender saw, the entry's bytes,
its receipt."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom.dimse_messages
import pytest

from ingest.scu import associate
from ingest.settings import Settings
from ingest.spool import Spool
from receiver import statuses
from receiver.fastpath import encode_command_set
from receiver.streams import Streams
from tests.support import (
    crc32,
    dataset_bytes,
    encode_dataset,
    make_instance,
    pynetdicom_send,
    raw_part10,
    split_part10,
    wait_for,
)

pytestmark = pytest.mark.integration
CT_UID = b"1.2.840.10008.5.1.4.1.1.2"


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
    and a receipt whose size and CRC-32 are the file's (the workers take the sha256)."""
    receiver = start_receiver(settings.replace(receiver_fast_path=fast_path, max_pdu=max_pdu))
    # both ways in make their spool files with the streams the receiver installed
    assert isinstance(pynetdicom.dimse_messages.NamedTemporaryFile, Streams)
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
        assert receipt.crc32 == crc32(data) and receipt.sha256 == ""
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
    assoc = associate(ae, "127.0.0.1", receiver.port, ae_title="DICOM-INGEST")
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


def _p_data(context_id: int, control: int, data: bytes) -> bytes:
    item = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def _store_command(sop_instance: bytes) -> bytes:
    return encode_command_set([
        (0x0002, CT_UID + b"\0"), (0x0100, b"\x01\x00"), (0x0110, b"\x07\x00"),
        (0x0700, b"\x00\x00"), (0x0800, b"\x00\x00"), (0x1000, sop_instance),
    ])


HOSTILE = {  # what is sent -> what the receiver logs
    "a PDV longer than its PDU": (struct.pack(">BBI", 0x04, 0, 8)
                                  + struct.pack(">IBB", 100, 1, 0x03) + b"ab",
                                  "a PDV longer than its P-DATA-TF PDU"),
    "an unknown PDU type": (struct.pack(">BBI", 0x09, 0, 4) + b"abcd",
                            "protocol abort reason=unknown-pdu-type"),
    "a 70 KB command set": (_p_data(1, 0x01, b"\0" * 70_000), "a command set of more than"),
    "a dataset PDV of another context mid-dataset": (
        _p_data(1, 0x03, _store_command(b"1.2.3.4"))
        + _p_data(1, 0x00, b"\x08\x00\x16\x00" + b"\0" * 4000) + _p_data(3, 0x02, b"\0" * 10),
        "a PDV of another message or context arrived mid-dataset"),
}


@pytest.mark.parametrize(("raw", "logged"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_malformed_data_aborts_the_association_and_nothing_is_kept(
        tmp_path: Path, settings: Settings, start_receiver: Any, raw: bytes, logged: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Bytes that break the protocol after a proper association: the receiver aborts it,
    says why, acks nothing, keeps no bytes, and serves the next sender."""
    from pynetdicom import AE

    receiver = start_receiver(settings)
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CT_UID.decode(), "1.2.840.10008.1.2.1")
    assoc = associate(ae, "127.0.0.1", receiver.port, ae_title="DICOM-INGEST")
    assert assoc.is_established
    assoc.dul.socket.send(raw)
    wait_for(lambda: assoc.is_aborted, 10, what="the receiver's A-ABORT")
    assert logged in caplog.text
    assert entries(settings) == {}
    tmp = settings.spool_dir / "tmp"
    wait_for(lambda: not [p for p in tmp.iterdir() if p.stat().st_size], 10,
             what="no received bytes kept")
    make_instance(tmp_path / "next.dcm")
    assert pynetdicom_send(receiver.port, [tmp_path / "next.dcm"]) == [statuses.SUCCESS]


def test_a_dataset_that_streams_longer_than_the_network_timeout_is_received(
        tmp_path: Path, settings: Settings, start_receiver: Any) -> None:
    """A slow sender whose dataset keeps arriving for longer than the network (idle) timeout:
    the association is not idle, so it is not aborted, and the instance is spooled."""
    import time

    from pynetdicom import AE

    receiver = start_receiver(settings)
    receiver.server.ae.network_timeout = 1.0  # for the associations accepted from now on
    ae = AE(ae_title="SLOW")
    ae.add_requested_context(CT_UID.decode(), "1.2.840.10008.1.2.1")
    assoc = associate(ae, "127.0.0.1", receiver.port, ae_title="DICOM-INGEST")
    assert assoc.is_established
    try:
        assoc.dul.socket.send(_p_data(1, 0x03, _store_command(b"1.2.826.0.1.3680043.8.498.1\0")))
        fragment = b"\x10\x00\x10\x00PN\x04\x00ABCD" * 100
        started = time.monotonic()
        while time.monotonic() - started < 2.5:  # a fragment every 20 ms, for 2.5 s
            assoc.dul.socket.send(_p_data(1, 0x00, fragment))
            time.sleep(0.02)
        assoc.dul.socket.send(_p_data(1, 0x02, fragment))
        wait_for(lambda: len(entries(settings)) == 1, 10, what="the instance spooled")
        assert not assoc.is_aborted
    finally:
        assoc.release()


def test_an_instance_refused_for_back_pressure_never_reaches_the_disk(
        tmp_path: Path, settings: Settings, start_receiver: Any) -> None:
    """Past a spool limit (here INGEST_SPOOL_MAX_DEPTH) the sender gets 0xA700, and the
    refused dataset is not written on the way: a spool short of room is not filled further."""
    import threading

    receiver = start_receiver(settings.replace(spool_max_depth=1))
    make_instance(tmp_path / "first.dcm")
    assert pynetdicom_send(receiver.port, [tmp_path / "first.dcm"]) == [statuses.SUCCESS]
    make_instance(tmp_path / "big.dcm", pixel_bytes=40_000_000)
    tmp = settings.spool_dir / "tmp"
    largest = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal largest
        while not done.is_set():
            for path in tmp.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    largest = max(largest, path.stat().st_size)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        sent = pynetdicom_send(receiver.port, [tmp_path / "big.dcm"])
    finally:
        done.set()
        watcher.join()
    assert sent == [statuses.OUT_OF_RESOURCES]
    assert largest == 0  # not a byte of it in the spool's temp files
    assert len(entries(settings)) == 1


#: vendor-private storage SOP classes and a standard-looking one pynetdicom does not list
UNLISTED_SOP_CLASSES = {
    "siemens-csa-non-image": "1.3.12.2.1107.5.9.1",
    "philips-private-mr": "1.3.46.670589.11.0.0.12.2",
    "ge-private-3d-model": "1.2.840.113619.4.26",
    "unlisted-standard": "1.2.840.10008.5.1.4.1.1.999.1",
}


def _unlisted_instances(folder: Path) -> dict[str, Path]:
    """SOP Instance UID -> a Part 10 file of each unlisted SOP class (and one CT)."""
    folder.mkdir()
    files = {}
    for name, sop_class in UNLISTED_SOP_CLASSES.items():
        ds = pydicom.Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID = ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.add_new(0x00291010, "OB", bytes(range(256)) * 40)  # a vendor's private payload
        path = folder / f"{name}.dcm"
        path.write_bytes(raw_part10(sop_class, ds.SOPInstanceUID, encode_dataset(ds)))
        files[str(ds.SOPInstanceUID)] = path
    uid = make_instance(folder / "ct.dcm", pixel_bytes=2000)
    files[uid] = folder / "ct.dcm"
    return files


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "pynetdicom"])
def test_private_and_unlisted_sop_classes_are_accepted_and_archived_bit_for_bit(
        tmp_path: Path, settings: Settings, start_receiver: Any, fast_path: bool) -> None:
    """By default (INGEST_UNKNOWN_SOP_CLASSES=accept) a sender's private storage SOP classes
    are accepted, spooled and archived with the dataset bytes it sent."""
    from workers.pipeline import Outcome, Pipeline

    receiver = start_receiver(settings.replace(receiver_fast_path=fast_path))
    files = _unlisted_instances(tmp_path / "sent")
    sent = pynetdicom_send(receiver.port, files.values(), calling="MODALITY1")
    assert sent == [statuses.SUCCESS] * len(files)
    spooled = entries(settings)
    assert set(spooled) == set(files)
    pipeline = Pipeline.from_settings(settings)
    for receipt, _ in spooled.values():
        assert pipeline.process(receipt.receipt_id) is Outcome.ARCHIVED
    archived = {p.stem: p for p in (tmp_path / "archive").rglob("*.dcm")}
    assert set(archived) == set(files)
    for uid, path in files.items():
        assert split_part10(archived[uid].read_bytes())[1] == dataset_bytes(path)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "pynetdicom"])
def test_unlisted_sop_classes_are_refused_when_so_configured(
        tmp_path: Path, settings: Settings, start_receiver: Any, fast_path: bool) -> None:
    """INGEST_UNKNOWN_SOP_CLASSES=reject: only the standard storage SOP classes pynetdicom
    lists are accepted; a private one's presentation context is rejected at association."""
    from pynetdicom import AE

    receiver = start_receiver(settings.replace(receiver_fast_path=fast_path,
                                               unknown_sop_classes="reject"))
    files = _unlisted_instances(tmp_path / "sent")
    ae = AE(ae_title="MODALITY1")
    for sop_class in [*UNLISTED_SOP_CLASSES.values(), "1.2.840.10008.5.1.4.1.1.2"]:
        ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
    assoc = associate(ae, "127.0.0.1", receiver.port, ae_title="DICOM-INGEST")
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        assert accepted == {"1.2.840.10008.5.1.4.1.1.2"}
        assert rejected == set(UNLISTED_SOP_CLASSES.values())
        ct = next(p for p in files.values() if p.name == "ct.dcm")
        assert int(assoc.send_c_store(ct).Status) == statuses.SUCCESS
    finally:
        assoc.release()
    assert len(entries(settings)) == 1


def test_a_pynetdicom_without_the_internals_we_use_gets_plain_pynetdicom(
        tmp_path: Path, settings: Settings, start_receiver: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Where a pynetdicom release lacks a private name the receiver relies on, it says so
    once and runs on plain pynetdicom: no fast path, and C-STOREs still answered and spooled
    byte for byte."""
    import logging

    from receiver import internals

    monkeypatch.setattr(internals, "missing", lambda: ("pynetdicom.dul.gone (a test)",))
    with caplog.at_level(logging.WARNING, logger="dicom_ingest"):
        receiver = start_receiver(settings)
    assert "running on plain pynetdicom" in caplog.text
    assert "pynetdicom.dul.gone" in caplog.text
    files = {make_instance(tmp_path / f"{n}.dcm", pixel_bytes=70_000): tmp_path / f"{n}.dcm"
             for n in range(3)}
    assert pynetdicom_send(receiver.port, files.values()) == [statuses.SUCCESS] * 3
    spooled = entries(settings)
    assert set(spooled) == set(files)
    for uid, (receipt, data) in spooled.items():
        assert split_part10(data)[1] == dataset_bytes(files[uid])
        # pynetdicom's handler wrote this File Meta; the fast path names both AE titles
        meta = pydicom.filereader.read_file_meta_info(
            settings.spool_dir / "entries" / f"{receipt.receipt_id}.dcm")
        assert "ReceivingApplicationEntityTitle" not in meta


def test_every_private_name_the_receiver_uses_is_there() -> None:
    """The pynetdicom that is installed (a tested release) has every name on the list."""
    from receiver import internals

    assert internals.tested_release()
    assert internals.missing() == ()
    assert internals._has("pynetdicom.dul", "DULServiceProvider", "_recv_pdu")
    assert not internals._has("pynetdicom.dul", "DULServiceProvider", "_no_such_name")
