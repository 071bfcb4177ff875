"""DICOM files for the tests: the pydicom corpus, made instances, hostile and raw ones,
and reading back what was stored."""

from __future__ import annotations

import hashlib
import random
import warnings
import zlib
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CORPUS = {
    "CT_small.dcm": "explicit little endian, CT",
    "MR_small_implicit.dcm": "implicit little endian, MR",
    "MR_small_bigendian.dcm": "explicit big endian, MR",
    "image_dfl.dcm": "deflated explicit little endian",
    "SC_rgb_jpeg_dcmtk.dcm": "JPEG baseline",
    "JPEG-LL.dcm": "JPEG lossless SV1",
    "MR_small_jp2klossless.dcm": "JPEG 2000 lossless",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless",
    "MR_small_RLE.dcm": "RLE lossless",
    "test-SR.dcm": "comprehensive SR",
    "rtplan.dcm": "RT plan",
    "rtdose.dcm": "RT dose, multi-frame",
    "waveform_ecg.dcm": "12-lead ECG waveform",
    "SC_rgb_rle_2frame.dcm": "RLE multi-frame",
}

def split_part10(data: bytes) -> tuple[bytes, bytes]:
    """(File Meta with preamble, dataset bytes) of a Part 10 file."""
    assert data[128:132] == b"DICM", "not a Part 10 file"
    assert data[132:136] == b"\x02\x00\x00\x00", "File Meta without group length"
    length = int.from_bytes(data[140:144], "little")
    end = 144 + length
    return data[:end], data[end:]

def dataset_bytes(path: Path) -> bytes:
    return split_part10(path.read_bytes())[1]

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

def crc32(data: bytes) -> str:
    """A CRC-32 as receipts spell it, computed here independently of the project's code."""
    return format(zlib.crc32(data), "08x")

def corpus_source(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(path)

def unique_copy(source: Path, target: Path, rng: random.Random) -> str:
    """Copy a Part 10 file with a new SOP Instance UID of the same length (bytes replaced in
    place, so every other byte stays as it was). Returns the new UID."""
    data = source.read_bytes()
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    old, old_meta = str(ds.SOPInstanceUID), str(ds.file_meta.MediaStorageSOPInstanceUID)
    new = old[:-6] + str(rng.randint(100000, 999999))
    deflated = ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    if deflated or len(old_meta) != len(old):
        full = pydicom.dcmread(source)
        full.SOPInstanceUID = new
        full.file_meta.MediaStorageSOPInstanceUID = new
        full.save_as(target, enforce_file_format=True)
        return new
    data = data.replace(old.encode(), new.encode()).replace(old_meta.encode(), new.encode())
    target.write_bytes(data)
    return new

def _identified(sop_class: str, sop_instance: str | None = None, study: str | None = None,
                series: str | None = None) -> Dataset:
    """A dataset with its four identifying UIDs (new ones unless given)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance or generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    return ds

def make_segmentation(target: Path) -> str:
    """A small binary segmentation instance (no such file ships with pydicom)."""
    ds = _identified("1.2.840.10008.5.1.4.1.1.66.4")
    ds.Modality = "SEG"
    ds.PatientName = "Test^Segmentation"
    ds.PatientID = "SEG-1"
    ds.SegmentationType = "BINARY"
    ds.Rows, ds.Columns = 8, 8
    ds.NumberOfFrames = 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.add_new(0x7FE00010, "OB", bytes(range(16)))
    return _save(ds, target)

def make_instance(target: Path, pixel_bytes: int = 1024, study: str | None = None,
                  series: str | None = None, sop_instance: str | None = None) -> str:
    """A CT-like instance with ``pixel_bytes`` of pixel data, explicit little endian."""
    ds = _identified("1.2.840.10008.5.1.4.1.1.2", sop_instance, study, series)
    ds.Modality = "CT"
    ds.PatientName = "Test^Instance"
    ds.PatientID = "CT-1"
    side = max(1, int((pixel_bytes // 2) ** 0.5))
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = random.randbytes(side * side * 2)
    return _save(ds, target)

def _save(ds: Dataset, target: Path) -> str:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(target, enforce_file_format=True)
    return str(ds.SOPInstanceUID)

def hostile_dataset(**changes: object) -> Dataset:
    """A small CT dataset with ``changes`` applied (None deletes an attribute), for hostile
    variants: bad UIDs, missing attributes."""
    ds = _identified("1.2.840.10008.5.1.4.1.1.2")
    ds.PatientName = "Hostile^Input"
    ds.add_new(0x7FE00010, "OB", bytes(range(256)) * 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hostile values are the point
        for key, value in changes.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
    return ds

def raw_part10(sop_class: str, sop_instance: str, body: bytes,
               transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """A Part 10 file whose File Meta says ``sop_class``/``sop_instance`` and whose dataset
    bytes are exactly ``body``: the way to put anything on the wire with pynetdicom."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hostile UIDs are the point of some tests
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_instance
        meta.TransferSyntaxUID = transfer_syntax
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1"
        out = DicomBytesIO()
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + body

def encode_dataset(ds: Dataset) -> bytes:
    """Dataset bytes in explicit little endian, without File Meta."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(out, ds)
    return out.getvalue()

def objects_under(root: Path) -> dict[str, Path]:
    """Relative key -> path of every file in a directory archive."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.startswith(".")}
