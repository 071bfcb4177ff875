"""The benchmark's corpus: CT-like instances of a given size, and one large instance."""

from __future__ import annotations

import os
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def _dataset(pixel_bytes: int, study: str, series: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Bench^Patient", "BENCH-1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    frames = max(1, pixel_bytes // (512 * 512 * 2))
    rows = 512 if frames > 1 else max(1, int((pixel_bytes // 2) ** 0.5))
    ds.Rows = ds.Columns = rows
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.add_new(0x7FE00010, "OW", b"")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def make_corpus(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` instances of about ``size`` bytes in one series."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = _dataset(size, study, series)
        ds.PixelData = os.urandom(ds.Rows * ds.Columns * 2)
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_large(folder: Path, megabytes: int) -> Path:
    """One multi-frame instance of about ``megabytes`` MB, written without holding it in
    memory: the header from pydicom, the pixel data streamed after it."""
    folder.mkdir(parents=True)
    ds = _dataset(megabytes * 2**20, generate_uid(), generate_uid())
    frames = int(ds.NumberOfFrames)
    length = frames * 512 * 512 * 2
    path = folder / "large.dcm"
    ds.save_as(path, enforce_file_format=True)  # ends with an empty (7FE0,0010) OW element
    data = bytearray(path.read_bytes())
    assert data[-12:-4] == b"\xe0\x7f\x10\x00OW\x00\x00"
    data[-4:] = length.to_bytes(4, "little")
    chunk = os.urandom(8 * 2**20)
    with open(path, "wb") as out:
        out.write(data)
        remaining = length
        while remaining:
            n = min(remaining, len(chunk))
            out.write(chunk[:n])
            remaining -= n
    return path
