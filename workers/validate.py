"""Validation of one spooled instance: integrity, structure, decoding, identity."""

from __future__ import annotations

import io
import logging
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement

from ingest.keys import is_safe_uid
from ingest.spool import Receipt, file_digests
from workers import errors
from workers.errors import PermanentError
from workers.structure import StructureError, check_structure

log = logging.getLogger("dicom_ingest.worker")

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95")
MAX_INFLATED = 1 << 30  # a deflated dataset may not inflate beyond 1 GiB (deflate bombs)
DEFER_SIZE = 64 * 1024  # values larger than this stay on disk while we decode
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Instance:
    """What naming and archiving need from a valid instance."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    sha256: str  # of the spooled Part 10 file, checked against the receipt's checksums


def inspect(path: Path, receipt: Receipt) -> Instance:
    """Check the spooled file against its receipt and the DICOM rules; raise PermanentError."""
    sha256 = _check_digest(path, receipt)
    meta_ts = _check_structure(path, receipt)
    dataset = _decode(path)
    uids: dict[str, str] = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = dataset.get(keyword)
        if value is None or str(value).strip("\0 ") == "":
            raise PermanentError(errors.MISSING_ATTRIBUTE, f"the dataset has no {keyword}")
        text = str(value).strip("\0 ")
        if not is_safe_uid(text):
            raise PermanentError(
                errors.INVALID_UID, f"{keyword} {text!r:.80} is not a UID of [0-9.]{{1,64}}"
            )
        uids[keyword] = text
    if uids["SOPInstanceUID"] != receipt.sop_instance_uid:
        raise PermanentError(
            errors.UID_MISMATCH,
            f"the dataset's SOPInstanceUID {uids['SOPInstanceUID']} differs from the "
            f"request's {receipt.sop_instance_uid!r:.80}",
            study_uid=uids["StudyInstanceUID"],
        )
    if uids["SOPClassUID"] != receipt.sop_class_uid:
        raise PermanentError(
            errors.UID_MISMATCH,
            f"the dataset's SOPClassUID {uids['SOPClassUID']} differs from the "
            f"request's {receipt.sop_class_uid!r:.80}",
            study_uid=uids["StudyInstanceUID"],
        )
    return Instance(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax=meta_ts,
        sha256=sha256,
    )


def _check_digest(path: Path, receipt: Receipt) -> str:
    """The file's sha256, once its size and the checksums its receipt carries match."""
    size, sha256, crc32 = file_digests(path, crc=bool(receipt.crc32))
    taken = [(name, mine, theirs) for name, mine, theirs in
             (("CRC-32", crc32, receipt.crc32), ("sha256", sha256, receipt.sha256)) if theirs]
    if not taken:
        raise PermanentError(errors.CHECKSUM_MISMATCH, "the receipt carries no checksum")
    wrong = [name for name, mine, theirs in taken if mine != theirs]
    if size != receipt.size or wrong:
        what = f"{size} bytes, not {receipt.size}" if size != receipt.size else \
            f"its {' and '.join(wrong)} differs"
        raise PermanentError(
            errors.CHECKSUM_MISMATCH,
            f"the spooled file no longer matches what was taken at receipt ({what})",
        )
    return sha256


def _check_structure(path: Path, receipt: Receipt) -> str:
    """Walk the File Meta and the dataset; return the File Meta transfer syntax."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the checks below say what is wrong, in our terms
            file_meta = pydicom.filereader.read_file_meta_info(path)
        start = receipt.dataset_offset
        with open(path, "rb") as fh:
            meta_ts = str(file_meta.get("TransferSyntaxUID", "")).strip("\0 ")
            if meta_ts != receipt.transfer_syntax:
                raise PermanentError(
                    errors.TRANSFER_SYNTAX_MISMATCH,
                    f"File Meta transfer syntax {meta_ts!r:.80} is not the negotiated "
                    f"{receipt.transfer_syntax}",
                )
            if meta_ts in DEFLATED:
                fh.seek(start)
                body = _inflate(fh)
                check_structure(io.BytesIO(body), 0, len(body), implicit=False, little=True)
            else:
                check_structure(
                    fh,
                    start,
                    receipt.size,
                    implicit=meta_ts == IMPLICIT_LITTLE,
                    little=meta_ts != EXPLICIT_BIG,
                )
    except StructureError as exc:
        code = errors.TRUNCATED if exc.truncated else errors.UNREADABLE
        raise PermanentError(code, f"the dataset is malformed: {exc}") from exc
    except PermanentError:
        raise
    except Exception as exc:  # untrusted bytes: any parser failure is the object's fault
        raise PermanentError(errors.UNREADABLE, f"the File Meta cannot be read: {exc}") from exc
    return meta_ts


def _inflate(fh: Any) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        while chunk := fh.read(_CHUNK):
            out += inflater.decompress(chunk, MAX_INFLATED + 1 - len(out))
            if len(out) > MAX_INFLATED:
                raise PermanentError(errors.TOO_LARGE, "the deflated dataset inflates past 1 GiB")
        out += inflater.flush()
    except zlib.error as exc:
        raise StructureError(f"the deflated dataset does not inflate: {exc}") from exc
    if not inflater.eof:
        raise StructureError("the deflated dataset ends before its deflate stream", True)
    return bytes(out)


def _decode(path: Path) -> pydicom.Dataset:
    """Decode with pydicom, converting every value small enough to have been read."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = pydicom.dcmread(path, defer_size=DEFER_SIZE)
            for tag in list(dataset.keys()):
                raw = dataset.get_item(tag)
                if isinstance(raw, RawDataElement) and raw.value is None:
                    continue  # deferred: large (pixel data); the walk checked its extent
                dataset[tag]  # converts the raw element, raising if it cannot
    except PermanentError:
        raise
    except Exception as exc:  # untrusted bytes: any decoder failure is the object's fault
        raise PermanentError(errors.UNREADABLE, f"pydicom cannot decode it: {exc}") from exc
    for warning in caught[:5]:
        log.debug("decode warning for %s: %s", path.name, warning.message)
    return dataset
