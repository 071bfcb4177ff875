import dataclasses
import hashlib
import os
import platform
from pathlib import Path

import pytest

from ingest.spool import RECEIPT_XATTR, Receipt, Spool, SpoolError
from tests.support import make_instance, need, spool_entry


def test_commit_makes_file_and_receipt(spool: Spool, tmp_path: Path) -> None:
    make_instance(tmp_path / "a.dcm")
    data = (tmp_path / "a.dcm").read_bytes()
    receipt = spool_entry(spool, data)
    assert spool.dcm_path(receipt.receipt_id).read_bytes() == data
    assert spool.read_receipt(receipt.receipt_id) == receipt
    assert spool.receipt_ids() == [receipt.receipt_id]
    assert os.listdir(spool.tmp) == []  # the temp files were renamed, nothing left over
    # one file per entry, its receipt an attribute of it
    assert os.listdir(spool.entries) == [f"{receipt.receipt_id}.dcm"]
    dcm = spool.dcm_path(receipt.receipt_id)
    assert Receipt.decode(os.getxattr(dcm, RECEIPT_XATTR)) == receipt


def _too_big_for_an_attribute(receipt: Receipt) -> Receipt:
    """A receipt longer than any filesystem takes as one extended attribute (64 KiB)."""
    return dataclasses.replace(receipt, peer="x" * 70_000)


def test_a_receipt_that_is_no_attribute_is_a_file(spool: Spool, tmp_path: Path) -> None:
    make_instance(tmp_path / "a.dcm")
    data = (tmp_path / "a.dcm").read_bytes()
    small = spool_entry(spool, data)
    spool.remove(small.receipt_id)
    received = tmp_path / "incoming.dcm"
    received.write_bytes(data)
    receipt = _too_big_for_an_attribute(small)
    spool.commit(received, receipt)
    assert sorted(os.listdir(spool.entries)) == [f"{receipt.receipt_id}.dcm",
                                                 f"{receipt.receipt_id}.json"]
    assert spool.read_receipt(receipt.receipt_id) == receipt
    assert spool.receipt_ids() == [receipt.receipt_id]
    spool.remove(receipt.receipt_id)
    assert os.listdir(spool.entries) == []


def test_remove_is_idempotent(spool: Spool, tmp_path: Path) -> None:
    make_instance(tmp_path / "a.dcm")
    receipt = spool_entry(spool, (tmp_path / "a.dcm").read_bytes())
    spool.remove(receipt.receipt_id)
    spool.remove(receipt.receipt_id)
    assert spool.read_receipt(receipt.receipt_id) is None
    assert os.listdir(spool.entries) == []


def test_failed_receipt_write_leaves_no_entry(spool: Spool, tmp_path: Path) -> None:
    make_instance(tmp_path / "a.dcm")
    received = tmp_path / "incoming.dcm"
    received.write_bytes((tmp_path / "a.dcm").read_bytes())
    receipt = _too_big_for_an_attribute(Receipt(
        "20260101T000000-0123456789abcdef", "A", "B", "p", 0.0, "1.2", "1.3",
        "1.2.840.10008.1.2.1", 1, 1, "0" * 64))
    os.rmdir(spool.tmp)  # the receipt's temp file cannot be created
    with pytest.raises(OSError):
        spool.commit(received, receipt)
    assert os.listdir(spool.entries) == []


def test_the_commit_in_order(spool: Spool, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole commit in order: the receipt set on the file, the file fsynced, renamed
    into ``entries/``, and ``entries/`` fsynced."""
    make_instance(tmp_path / "a.dcm")
    data = (tmp_path / "a.dcm").read_bytes()
    receipt = spool_entry(spool, data)
    spool.remove(receipt.receipt_id)
    calls: list[str] = []
    real_setxattr, real_fsync, real_rename = os.setxattr, os.fsync, os.rename
    entries = os.stat(spool.entries)

    def setxattr(target: int, name: str, value: bytes) -> None:
        calls.append(f"set {name}")
        real_setxattr(target, name, value)

    def fsync(fd: int) -> None:
        synced = os.fstat(fd)
        is_entries = (synced.st_dev, synced.st_ino) == (entries.st_dev, entries.st_ino)
        calls.append("fsync entries/" if is_entries else "fsync the file")
        real_fsync(fd)

    def rename(source: Path, target: Path) -> None:
        calls.append(f"rename into {Path(target).parent.name}/")
        real_rename(source, target)

    monkeypatch.setattr(os, "setxattr", setxattr)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)

    received = tmp_path / "incoming.dcm"
    received.write_bytes(data)
    spool.commit(received, receipt)
    assert calls == [f"set {RECEIPT_XATTR}", "fsync the file", "rename into entries/",
                     "fsync entries/"]
    assert spool.read_receipt(receipt.receipt_id) == receipt


def test_claim_is_exclusive(spool: Spool, tmp_path: Path) -> None:
    make_instance(tmp_path / "a.dcm")
    receipt = spool_entry(spool, (tmp_path / "a.dcm").read_bytes())
    with spool.claim(receipt.receipt_id) as first:
        assert first
        with spool.claim(receipt.receipt_id) as second:
            assert not second
    with spool.claim(receipt.receipt_id) as again:
        assert again
    with spool.claim("20260101T000000-0123456789abcdef") as missing:
        assert not missing


def test_receipt_decode_rejects_garbage() -> None:
    for data in (b"{", b"[]", b'{"receipt_id": "../x"}'):
        with pytest.raises((SpoolError, ValueError)):
            Receipt.decode(data)


def test_spool_dir_must_be_usable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        Spool(tmp_path / "file").ensure()


@pytest.mark.parametrize("lost", ["attribute", "empty file"])
def test_a_lost_receipt_is_rebuilt_from_the_file(spool: Spool, tmp_path: Path,
                                                 lost: str) -> None:
    """An entry without a readable receipt (a receipt file left empty by a power loss, its
    contents are not fsynced; an entry from an interrupted commit of an older version):
    reading it rebuilds it from the File Meta and the file, and writes it back."""
    import pydicom

    make_instance(tmp_path / "a.dcm")
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY1"
    ds.file_meta.ReceivingApplicationEntityTitle = "DICOM-INGEST"
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    original = spool_entry(spool, (tmp_path / "a.dcm").read_bytes(), calling="MODALITY1")
    dcm = spool.dcm_path(original.receipt_id)
    os.removexattr(dcm, RECEIPT_XATTR)
    if lost == "empty file":
        spool.receipt_path(original.receipt_id).write_bytes(b"")
    rebuilt = spool.read_receipt(original.receipt_id)
    assert rebuilt is not None
    assert rebuilt.calling_aet == "MODALITY1" and rebuilt.called_aet == "DICOM-INGEST"
    for name in ("sop_class_uid", "sop_instance_uid", "transfer_syntax", "size",
                 "dataset_offset", "crc32"):
        assert getattr(rebuilt, name) == getattr(original, name), name
    assert rebuilt.sha256 == hashlib.sha256(dcm.read_bytes()).hexdigest()  # taken as rebuilt
    assert Receipt.decode(os.getxattr(dcm, RECEIPT_XATTR)) == rebuilt
    assert spool.read_receipt(original.receipt_id) == rebuilt


def test_spare_temp_files_are_locked_until_used(spool: Spool) -> None:
    from ingest.spool import TempFilePool, in_use

    pool = TempFilePool(spool.tmp, size=4)
    pool.start()
    taken = pool.take()
    assert in_use(Path(taken.path))
    os.close(taken.fd)
    assert not in_use(Path(taken.path))
    pool.stop()
    assert os.listdir(spool.tmp) == [os.path.basename(taken.path)]  # spares removed


def test_attempts_are_counted_on_the_entry_not_in_files_of_their_own(
        spool: Spool, tmp_path: Path) -> None:
    """The poison counter lives in an extended attribute of the entry: no file is made or
    deleted per task (on a spool with much churn that costs an inode allocation each)."""
    make_instance(tmp_path / "a.dcm")
    receipt = spool_entry(spool, (tmp_path / "a.dcm").read_bytes())
    names = sorted(os.listdir(spool.entries))
    assert [spool.begin_attempt(receipt.receipt_id) for _ in range(3)] == [1, 2, 3]
    assert sorted(os.listdir(spool.entries)) == names
    spool.end_attempt(receipt.receipt_id)
    assert spool.begin_attempt(receipt.receipt_id) == 1
    assert spool.read_receipt(receipt.receipt_id) == receipt  # the receipt itself unchanged
    spool.remove(receipt.receipt_id)
    assert os.listdir(spool.entries) == []
    assert spool.begin_attempt(receipt.receipt_id) == 1  # gone: a hint, never an error


def test_the_receipt_crc_is_zlibs_crc32_whatever_computes_it(tmp_path: Path) -> None:
    """Receipts hold zlib's CRC-32 whether ISA-L or zlib computed it (a receipt written where
    one is installed is checked where the other is), fed in pieces of any size."""
    import random
    import zlib

    from ingest.spool import Crc32, crc32_hex, file_digests

    rng = random.Random(7)
    data = rng.randbytes(3 * 1024 * 1024 + 17)
    crc, at = Crc32(), 0
    while at < len(data):
        step = rng.choice((1, 6, 4096, 131060, 262144, 1 << 20))
        crc.update(memoryview(data)[at : at + step])
        at += step
    assert crc.hexdigest() == crc32_hex(zlib.crc32(data)) == format(zlib.crc32(data), "08x")
    (tmp_path / "f").write_bytes(data)
    assert file_digests(tmp_path / "f", chunk=65536) == (
        len(data), hashlib.sha256(data).hexdigest(), crc.hexdigest())
    assert file_digests(tmp_path / "f", sha=False) == (len(data), "", crc.hexdigest())
    assert Crc32().hexdigest() == "00000000"


def test_isal_computes_the_crc_where_it_is_installed() -> None:
    """isal is a dependency where it has wheels (x86_64, aarch64): there the receiver's CRC
    runs on ISA-L, not on zlib's slower loop."""
    need(platform.machine() in ("x86_64", "aarch64"), "isal (x86_64 and aarch64 only)")
    from isal import isal_zlib

    import ingest.spool

    assert ingest.spool.crc32 is isal_zlib.crc32


def test_a_receipt_written_before_version_2_still_reads() -> None:
    """A receipt of version 1 (an entry left in the spool across the upgrade) has no crc32
    key: it reads with an empty CRC and keeps its sha256, by which the worker checks it."""
    import json

    old = {"receipt_id": "20261128T101500-0123456789abcdef", "calling_aet": "CT1",
           "called_aet": "DICOM-INGEST", "peer": "10.0.0.7:4100", "received_at": 1.0,
           "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "sop_instance_uid": "1.2.3",
           "transfer_syntax": "1.2.840.10008.1.2.1", "size": 1000, "dataset_offset": 300,
           "sha256": "ab" * 32, "version": 1}
    receipt = Receipt.decode(json.dumps(old).encode())
    assert receipt.crc32 == "" and receipt.sha256 == "ab" * 32 and receipt.version == 1
