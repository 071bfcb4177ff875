"""An instance's identity for duplicates: the dataset bytes the sender sent and their
transfer syntax. The File Meta in front of them is the receiver's (it names the sending AE),
so two copies of one dataset from different senders are one object."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import BinaryIO

_CHUNK = 1 << 20
#: explicit VRs whose length takes four bytes after two reserved ones
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
             b"UV"}
_MAX_META = 1 << 20  # a File Meta larger than this is not one the receiver wrote


class IdentityError(ValueError):
    """The bytes are not a Part 10 file with a readable File Meta."""


@dataclass(frozen=True)
class DatasetIdentity:
    transfer_syntax: str
    sha256: str  # of the dataset bytes after the File Meta


def read_identity(fh: BinaryIO) -> DatasetIdentity:
    """The identity of the Part 10 file read from ``fh`` (from its start to its end)."""
    if _read(fh, 132)[128:] != b"DICM":
        raise IdentityError("no DICM prefix after the preamble")
    transfer_syntax, meta_size = None, 0
    while True:
        header = fh.read(8)
        group = struct.unpack("<H", header[:2])[0] if len(header) >= 2 else None
        if group != 0x0002:
            rest = header  # the first bytes of the dataset (or of nothing)
            break
        element, vr = struct.unpack("<H", header[2:4])[0], header[4:6]
        if len(header) < 8:
            raise IdentityError("the File Meta ends inside an element header")
        if vr in _LONG_VRS:
            length = struct.unpack("<I", _read(fh, 4))[0]
        else:
            length = struct.unpack("<H", header[6:8])[0]
        meta_size += 8 + length
        if meta_size > _MAX_META:
            raise IdentityError("the File Meta is implausibly large")
        value = _read(fh, length)
        if element == 0x0010:
            transfer_syntax = value.rstrip(b"\0 ").decode("ascii", "replace")
    if transfer_syntax is None:
        raise IdentityError("the File Meta names no transfer syntax")
    return DatasetIdentity(transfer_syntax, _sha256(fh, rest))


def dataset_identity(fh: BinaryIO, offset: int, transfer_syntax: str) -> DatasetIdentity:
    """The identity of a spooled file whose dataset starts at ``offset`` (its receipt's)."""
    fh.seek(offset)
    return DatasetIdentity(transfer_syntax, _sha256(fh, b""))


def _sha256(fh: BinaryIO, first: bytes) -> str:
    digest = hashlib.sha256(first)
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _read(fh: BinaryIO, size: int) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise IdentityError("the file ends inside its File Meta")
    return data
