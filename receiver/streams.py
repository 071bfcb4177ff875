"""The file pynetdicom streams an incoming dataset into: on the spool filesystem, and one that
survives a full disk.

pynetdicom (``STORE_RECV_CHUNKED_DATASET``) writes each dataset fragment to a temporary file
as it arrives. If such a write raises (the disk is full), the exception escapes pynetdicom's
reactor thread: the association hangs until the sender times out, and nobody tells it why.
This file records the first write error instead, swallows the rest of the dataset, and lets
the C-STORE reach our handler, which answers ``0xA700`` (out of resources) so that the sender
retries later. pynetdicom closes and removes the file after the handler returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from ingest.spool import Crc32, Spool, TempFile, create_temp
from receiver import internals

WRITEBACK_STEP = 256 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_sync_file_range = _libc_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a file to disk without waiting (Linux ``sync_file_range``
    with ``SYNC_FILE_RANGE_WRITE``); nothing where that call does not exist."""
    if _sync_file_range is not None and _sync_file_range(
            fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        error = ctypes.get_errno()
        if error not in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE):
            raise OSError(error, os.strerror(error))


class SpoolTempFile:
    """The part of a ``NamedTemporaryFile`` that pynetdicom uses, tolerant of write errors.
    It takes the CRC-32 of what passes through (the receipt's checksum, see
    :class:`ingest.spool.Crc32`), so the handler need not read the file back.

    The file is written through the page cache with plain ``write`` calls (a short write, such
    as the fast path's File Meta, waits to go out with the next in one ``writev``), and the
    kernel is asked to start writing it back as it grows (:func:`start_writeback`): the fsync
    before the answer finds most of it on the disk already, and a worker on the same machine
    reads it from memory.
    """

    HEAD = 256  # enough of the start to find where the File Meta ends
    # writes shorter than this (a File Meta, pynetdicom's preamble) wait to go out with the
    # next; dataset fragments, 16 KB ones too, go out as they come, without a copy
    GATHER = 4096

    def __init__(self, directory: Path | str, temp: TempFile | None = None) -> None:
        if temp is None:
            temp = create_temp(directory)
        self.name = temp.path
        self.file = self  # pynetdicom calls ``.file.flush()``
        self.error: OSError | None = None
        self.crc = Crc32()
        self.size = 0
        self.head = b""
        self._kicked = 0  # bytes handed to start_writeback so far
        self._fd = temp.fd
        self._gathered: list[bytes] = []  # short writes not yet handed to the kernel
        self._gathered_size = 0

    @classmethod
    def failed(cls, error: OSError) -> SpoolTempFile:
        """One that could not even be created: it swallows what is written and raises
        ``error`` at :meth:`finish`."""
        stream = cls.__new__(cls)
        stream.name, stream._fd = "", -1
        stream.file = stream
        stream.error, stream.crc, stream.size, stream.head = error, Crc32(), 0, b""
        stream._kicked, stream._gathered, stream._gathered_size = 0, [], 0
        return stream

    def write(self, data: bytes | memoryview) -> int:
        length = len(data)
        if self.error is None:
            self.crc.update(data)  # cheap with ISA-L, and saves reading the file back
            self.size += length
            if len(self.head) < self.HEAD:
                self.head += bytes(data[: self.HEAD - len(self.head)])
            if length < self.GATHER:
                self._gathered.append(bytes(data))
                self._gathered_size += length
                if self._gathered_size >= self.GATHER or len(self._gathered) >= 64:
                    self.flush()
            else:
                self._gathered.append(data)  # type: ignore[arg-type]
                self.flush()
            if self.error is None and self.size - self._kicked >= WRITEBACK_STEP:
                self._start_writeback()
        return length

    def _start_writeback(self) -> None:
        """Have the kernel start writing what has arrived so far, while the rest arrives:
        the fsync before the answer then waits for the tail only. A hint; errors surface
        at fsync."""
        self.flush()
        if self.error is None:
            try:
                start_writeback(self._fd, self._kicked, self.size - self._kicked)
            except OSError as exc:
                self.error = exc
        self._kicked = self.size

    @property
    def fd(self) -> int:
        """The open file (for the spool's commit to fsync); -1 once closed."""
        return self._fd

    def finish(self) -> None:
        """Hand everything written to the kernel; raises the first write error, if there was
        one. The spool's commit fsyncs."""
        self.flush()
        if self.error is not None:
            raise self.error

    def flush(self) -> None:
        """Hand what is gathered to the kernel (one ``writev``)."""
        chunks, self._gathered, self._gathered_size = self._gathered, [], 0
        if self.error is not None or not chunks:
            return
        try:
            written = os.writev(self._fd, chunks)
            total = sum(len(chunk) for chunk in chunks)
            if written < total:  # the kernel took part of it: write the rest plainly
                rest = memoryview(b"".join(bytes(chunk) for chunk in chunks))[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
        except OSError as exc:
            self.error = exc

    def close(self) -> None:
        self._gathered, self._gathered_size = [], 0
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1


class Streams:
    """Makes the files incoming datasets stream into, in the spool's ``tmp/`` (a spare one
    from its pool where the receiver runs one), for both ways a C-STORE arrives: the fast
    path calls it, and pynetdicom calls it in place of ``NamedTemporaryFile``
    (:func:`install`; its arguments are ignored)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def __call__(self, *args: Any, **kwargs: Any) -> SpoolTempFile:
        spool = self.spool
        temp = spool.temp_files.take() if spool.temp_files is not None else None
        return SpoolTempFile(spool.tmp_dir, temp)


def install(streams: Streams) -> None:
    """Make pynetdicom stream incoming datasets into the files ``streams`` makes (once, at
    the receiver's entry, like pynetdicom's ``_config``)."""
    internals.replace_temporary_files(streams)
