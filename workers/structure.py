"""A structural walk of an encoded dataset: every length must fit and the walk must end at EOF.

pydicom reads a value cut short by the end of the file without complaint (it returns fewer
bytes), so "parses to the end" needs its own check. This walk reads only element headers and
seeks past values, so it costs no memory whatever the size of the pixel data.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_MAX_DEPTH = 64


class StructureError(ValueError):
    """The bytes are not a well-formed dataset; ``truncated`` says whether they end too soon."""

    def __init__(self, message: str, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


class _Walker:
    def __init__(self, fp: BinaryIO, end: int, implicit: bool, little: bool) -> None:
        self.fp, self.end, self.implicit = fp, end, implicit
        order = "<" if little else ">"
        self.tag_len = struct.Struct(order + "HHI")  # group, element, 32-bit length
        self.tag_vr_short = struct.Struct(order + "HH2sH")
        self.u32 = struct.Struct(order + "I")

    def read(self, n: int) -> bytes:
        data = self.fp.read(n)
        if len(data) != n:
            raise StructureError(f"ends inside an element header at {self.fp.tell()}", True)
        return data

    def skip(self, length: int, what: str) -> None:
        pos = self.fp.tell()
        if pos + length > self.end:
            raise StructureError(
                f"{what} at {pos} declares {length} bytes but only {self.end - pos} remain", True
            )
        self.fp.seek(pos + length)

    def header(self) -> tuple[int, bytes | None, int]:
        """(tag, VR or None, length) of the next element; item tags have no VR."""
        raw = self.read(8)
        group, element, length = self.tag_len.unpack(raw)
        tag = group << 16 | element
        if self.implicit or group == 0xFFFE:
            return tag, None, length
        _, _, vr, short = self.tag_vr_short.unpack(raw)
        if vr in _LONG_VRS:
            return tag, vr, self.u32.unpack(self.read(4))[0]
        if not (b"AA" <= vr <= b"ZZ"):
            raise StructureError(f"invalid VR {vr!r} at {self.fp.tell() - 8}")
        return tag, vr, short

    def dataset(self, depth: int, in_item: bool) -> None:
        """Walk elements until the end (top level) or an item delimiter (nested)."""
        if depth > _MAX_DEPTH:
            raise StructureError("sequences nested too deep")
        while self.fp.tell() < self.end:
            tag, _vr, length = self.header()
            if tag == ITEM_DELIMITER:
                if in_item:
                    return
                raise StructureError(f"item delimiter outside an item at {self.fp.tell() - 8}")
            if tag in (ITEM, SEQUENCE_DELIMITER):
                raise StructureError(f"unexpected item tag at {self.fp.tell() - 8}")
            if length == UNDEFINED:
                self.items(depth + 1)
            else:
                self.skip(length, f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        if in_item:
            raise StructureError("an undefined-length item is never closed", True)

    def items(self, depth: int) -> None:
        """Walk the items of an undefined-length sequence or encapsulated pixel data."""
        while True:
            if self.fp.tell() >= self.end:
                raise StructureError("an undefined-length element is never closed", True)
            tag, _vr, length = self.header()
            if tag == SEQUENCE_DELIMITER:
                return
            if tag != ITEM:
                raise StructureError(f"expected an item at {self.fp.tell() - 8}")
            if length == UNDEFINED:
                self.dataset(depth, in_item=True)
            else:
                self.skip(length, "item")


def check_structure(fp: BinaryIO, start: int, end: int, implicit: bool, little: bool) -> None:
    """Walk the dataset in ``fp`` from ``start`` to ``end``; raise StructureError if malformed."""
    fp.seek(start)
    walker = _Walker(fp, end, implicit, little)
    walker.dataset(0, in_item=False)
    if fp.tell() != end:
        raise StructureError(f"the walk ended at {fp.tell()}, not at the end {end}")
