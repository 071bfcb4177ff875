"""Validation rules, on real files: pydicom's corpus and hostile variants of it."""

import random
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from ingest.spool import Spool
from tests.support import (
    CORPUS,
    corpus_source,
    encode_dataset,
    hostile_dataset,
    raw_part10,
    sha256,
    spool_entry,
    unique_copy,
)
from workers import errors
from workers.errors import PermanentError
from workers.validate import inspect

CT = "1.2.840.10008.5.1.4.1.1.2"



def check(spool: Spool, part10: bytes):  # type: ignore[no-untyped-def]
    receipt = spool_entry(spool, part10)
    return inspect(spool.dcm_path(receipt.receipt_id), receipt)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_is_valid(spool: Spool, name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    unique_copy(corpus_source(name), path, random.Random(name))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    instance = check(spool, path.read_bytes())
    assert instance.sop_instance_uid == ds.SOPInstanceUID
    assert instance.study_uid == ds.StudyInstanceUID
    assert instance.transfer_syntax == ds.file_meta.TransferSyntaxUID


def expect(spool: Spool, part10: bytes, code: str) -> PermanentError:
    with pytest.raises(PermanentError) as info:
        check(spool, part10)
    assert info.value.code == code, info.value.message
    return info.value


def test_sop_instance_differs_from_request(spool: Spool) -> None:
    ds = hostile_dataset()
    error = expect(spool, raw_part10(CT, generate_uid(), encode_dataset(ds)), errors.UID_MISMATCH)
    assert "SOPInstanceUID" in error.message


def test_cut_off_mid_pixel_data(spool: Spool) -> None:
    ds = hostile_dataset()
    body = encode_dataset(ds)
    expect(spool, raw_part10(CT, ds.SOPInstanceUID, body[:-1000]), errors.TRUNCATED)


def test_file_meta_and_dataset_disagree(spool: Spool) -> None:
    # pydicom's rtplan.dcm carries a MediaStorageSOPInstanceUID that is not its SOPInstanceUID
    expect(spool, corpus_source("rtplan.dcm").read_bytes(), errors.UID_MISMATCH)


def test_pydicom_truncated_file(spool: Spool) -> None:
    path = corpus_source("MR_truncated.dcm")
    expect(spool, path.read_bytes(), errors.TRUNCATED)


def test_bytes_that_are_no_dataset(spool: Spool) -> None:
    uid = generate_uid()
    with pytest.raises(PermanentError) as info:
        check(spool, raw_part10(CT, uid, b"this is not DICOM at all, just text\n" * 50))
    assert info.value.code in (errors.TRUNCATED, errors.UNREADABLE)


def test_random_bytes(spool: Spool) -> None:
    rng = random.Random(7)
    body = bytes(rng.randrange(256) for _ in range(5000))
    with pytest.raises(PermanentError) as info:
        check(spool, raw_part10(CT, generate_uid(), body))
    assert info.value.code in (errors.TRUNCATED, errors.UNREADABLE)


@pytest.mark.parametrize("bad", ["1.2/3", "../../1.2", "1.2.3.", "1.2..3"])
def test_uid_with_path_characters(spool: Spool, bad: str) -> None:
    ds = hostile_dataset(SeriesInstanceUID=bad)
    expect(spool, raw_part10(CT, ds.SOPInstanceUID, encode_dataset(ds)), errors.INVALID_UID)


def test_sop_instance_uid_with_dots_is_refused_too(spool: Spool) -> None:
    ds = hostile_dataset(SOPInstanceUID="../../etc/passwd")
    expect(spool, raw_part10(CT, "../../etc/passwd", encode_dataset(ds)), errors.INVALID_UID)


def test_missing_study_uid(spool: Spool) -> None:
    ds = hostile_dataset(StudyInstanceUID=None)
    error = expect(spool, raw_part10(CT, ds.SOPInstanceUID, encode_dataset(ds)),
                   errors.MISSING_ATTRIBUTE)
    assert "StudyInstanceUID" in error.message


def test_sop_class_differs_from_request(spool: Spool) -> None:
    ds = hostile_dataset()
    mr = "1.2.840.10008.5.1.4.1.1.4"
    expect(spool, raw_part10(mr, ds.SOPInstanceUID, encode_dataset(ds)), errors.UID_MISMATCH)


@pytest.mark.parametrize("legacy", [False, True], ids=["crc32-receipt", "sha256-receipt"])
def test_spool_file_changed_after_receipt(spool: Spool, legacy: bool) -> None:
    """One flipped bit is caught by the receipt's CRC-32, or by the sha256 of a receipt
    written before version 2."""
    ds = hostile_dataset()
    receipt = spool_entry(spool, raw_part10(CT, ds.SOPInstanceUID, encode_dataset(ds)),
                          legacy=legacy)
    path = spool.dcm_path(receipt.receipt_id)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PermanentError) as info:
        inspect(path, receipt)
    assert info.value.code == errors.CHECKSUM_MISMATCH
    assert ("sha256" if legacy else "CRC-32") in info.value.message


@pytest.mark.parametrize("legacy", [False, True], ids=["crc32-receipt", "sha256-receipt"])
def test_the_worker_takes_the_sha256_of_the_checked_file(spool: Spool, legacy: bool) -> None:
    ds = hostile_dataset()
    part10 = raw_part10(CT, ds.SOPInstanceUID, encode_dataset(ds))
    receipt = spool_entry(spool, part10, legacy=legacy)
    assert bool(receipt.sha256) is legacy and bool(receipt.crc32) is not legacy
    instance = inspect(spool.dcm_path(receipt.receipt_id), receipt)
    assert instance.sha256 == sha256(part10)


def test_a_receipt_without_a_checksum_is_not_trusted(spool: Spool) -> None:
    from dataclasses import replace

    ds = hostile_dataset()
    receipt = spool_entry(spool, raw_part10(CT, ds.SOPInstanceUID, encode_dataset(ds)))
    with pytest.raises(PermanentError) as info:
        inspect(spool.dcm_path(receipt.receipt_id), replace(receipt, crc32=""))
    assert info.value.code == errors.CHECKSUM_MISMATCH


def test_a_spool_file_of_another_length_is_caught(spool: Spool) -> None:
    ds = hostile_dataset()
    receipt = spool_entry(spool, raw_part10(CT, ds.SOPInstanceUID, encode_dataset(ds)))
    path = spool.dcm_path(receipt.receipt_id)
    with open(path, "ab") as fh:
        fh.write(b"\0\0\0\0")
    with pytest.raises(PermanentError) as info:
        inspect(path, receipt)
    assert info.value.code == errors.CHECKSUM_MISMATCH and "bytes, not" in info.value.message
