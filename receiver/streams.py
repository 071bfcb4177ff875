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

import collections
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pynetdicom.dimse_messages

from ingest.spool import Crc32, Spool, TempFile, create_temp
from receiver import aio

WRITEBACK_STEP = 256 * 1024
_SYNC_FILE_RANGE_WRITE = 2

#: direct I/O writes whole blocks of this many bytes from memory aligned to it (4 KiB covers
#: every common logical block size)
DIRECT_ALIGN = 4096
#: what a stream gathers before it writes to the disk: one direct write per this many bytes
DIRECT_CHUNK = 256 * 1024
_O_DIRECT = getattr(os, "O_DIRECT", 0)
#: direct writes of one stream in flight at once (each holds a staging buffer till it ends)
ASYNC_DEPTH = 2
#: how far ahead of its writes a stream allocates its file at most (it doubles up to this)
_MAX_GROW = 64 * 1024 * 1024
#: errors of io_setup, io_submit or fallocate after which a stream writes synchronously
#: (EAGAIN: the machine's AIO events, fs.aio-max-nr, are all taken)
_NO_ASYNC = {errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL,
             errno.EAGAIN}
#: whether this process may use Linux native AIO at all (a seccomp profile may refuse it)
_AIO = aio.available()


class _Buffers:
    """Page-aligned staging buffers for direct writes, reused from stream to stream (fresh
    anonymous memory would cost a page fault per page, each time)."""

    def __init__(self, keep: int = 16) -> None:
        self._free: collections.deque[mmap.mmap] = collections.deque()
        self._keep = keep

    def take(self) -> mmap.mmap:
        try:
            return self._free.pop()  # the last one given back: the warmest
        except IndexError:
            return mmap.mmap(-1, DIRECT_CHUNK + DIRECT_ALIGN)

    def give(self, buffer: mmap.mmap) -> None:
        if len(self._free) < self._keep:
            self._free.append(buffer)
        else:
            buffer.close()


_buffers = _Buffers()


class _Contexts:
    """AIO contexts reused from stream to stream: ``io_destroy`` waits for an RCU grace
    period (about 30 ms here), far too long for the end of every C-STORE. A context goes
    back only once the writes of its stream have all ended."""

    def __init__(self) -> None:
        self._free: collections.deque[aio.Writes] = collections.deque()

    def take(self) -> aio.Writes:
        try:
            return self._free.pop()
        except IndexError:
            return aio.Writes(ASYNC_DEPTH)

    def give(self, writes: aio.Writes) -> None:
        if len(writes):  # a write still in flight: never hand it to another stream
            writes.close()
        else:
            self._free.append(writes)


_contexts = _Contexts()


def _set_direct(fd: int, on: bool) -> None:
    """Turn direct I/O (``O_DIRECT``) on or off for an open file; raises where refused."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)


def enable_direct(fd: int) -> bool:
    """Turn on direct I/O for an open file; False where the filesystem or the platform
    refuses it (the file then stays buffered)."""
    if not _O_DIRECT:
        return False
    try:
        _set_direct(fd, True)
    except OSError:
        return False
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT)


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

    By default the file is written through the page cache, and the kernel is asked to start
    writing it back as it grows (:func:`start_writeback`): the fsync before the answer finds
    most of it on the disk already, and a worker that checks the file on the same machine
    reads it from memory. On the machines measured that was as fast as direct I/O or faster
    (one association 1.18x, four 1.08x on the slowest disk; see README "Performance").

    With ``direct`` (``INGEST_SPOOL_DIRECT_IO=true``), and where the filesystem allows it, the
    file is written with direct I/O instead: the bytes are gathered in a reused, page-aligned
    buffer and go from there to the disk in whole blocks as they arrive, without a copy into
    page-cache pages (which cost ten times more on a VM whose host backs memory the guest has
    not touched before), and the fsync before the answer writes the last block and the inode.
    Elsewhere (tmpfs, some network filesystems) the file is written through the page cache
    either way.

    With direct I/O, and where the kernel allows it (:mod:`receiver.aio`), each full buffer is
    submitted and the stream goes on receiving into another while the disk writes it (at most
    :data:`ASYNC_DEPTH` in flight). The fast path waits for the last of them only right
    before the commit's fsync (:meth:`wait`), so it goes out while the tail is written and
    the receipt is made and set. Over one association the asynchronous writes took in about
    9 % more per second (paired rounds taking turns: 23 of 28 faster); waiting at the fsync
    instead of before the tail took 0.06 ms off the answer (0.81 against 0.87 ms, 8 of ten
    rounds).
    """

    HEAD = 256  # enough of the start to find where the File Meta ends

    def __init__(self, directory: Path, temp: TempFile | None = None,
                 direct: bool = True, asynchronous: bool = True) -> None:
        if temp is None:
            temp = create_temp(directory)
        self.name = temp.path
        self.file = self  # pynetdicom calls ``.file.flush()``
        self.error: OSError | None = None
        self.crc = Crc32()
        self.size = 0
        self.head = b""
        self._kicked = 0  # bytes handed to start_writeback so far (buffered mode)
        self._fd = temp.fd
        self._fh: Any = None  # buffered mode: the file object
        self._staging: mmap.mmap | None = None  # direct mode: the aligned buffer
        self._staged = 0  # bytes in it not yet written
        self._written = 0  # bytes written to the file (direct mode: whole blocks)
        self.direct = direct and enable_direct(temp.fd)  # written with direct I/O
        # full chunks submitted (receiver.aio) and waited for only at finish()
        self._async = self.direct and asynchronous and _AIO
        self._writes: aio.Writes | None = None
        # the writes in flight: tag -> (buffer, bytes)
        self._inflight: dict[int, tuple[mmap.mmap, int]] = {}
        self._allocated = 0  # the file's size as fallocate set it
        self.async_writes = 0  # direct writes submitted asynchronously so far
        if self.direct:
            self._staging = _buffers.take()
        else:
            self._fh = os.fdopen(temp.fd, "wb")

    @classmethod
    def failed(cls, error: OSError) -> SpoolTempFile:
        """One that could not even be created: it swallows what is written and raises
        ``error`` at :meth:`finish`."""
        stream = cls.__new__(cls)
        stream.name, stream._fh, stream._fd, stream._staging = "", None, -1, None
        stream.direct = False
        stream.file = stream
        stream.error, stream.crc, stream.size, stream.head = error, Crc32(), 0, b""
        stream._kicked = stream._staged = stream._written = stream._allocated = 0
        stream._async, stream._writes, stream._inflight = False, None, {}
        stream.async_writes = 0
        return stream

    def write(self, data: bytes | memoryview) -> int:
        if self.error is None:
            try:
                if self._staging is not None:
                    self._stage(data)
                else:
                    self._fh.write(data)
            except OSError as exc:
                self.error = exc
                return len(data)
            self._took(data)
            if self._fh is not None and self.size - self._kicked >= WRITEBACK_STEP:
                self._start_writeback()
        return len(data)

    def _took(self, data: bytes | memoryview) -> None:
        """Count bytes that are in the file (or staged for it): CRC, size, head."""
        self.crc.update(data)  # ISA-L: 0.035 ms per 512 KB here
        self.size += len(data)
        if len(self.head) < self.HEAD:
            self.head += bytes(data[: self.HEAD - len(self.head)])

    @property
    def receives_directly(self) -> bool:
        """Whether :meth:`receive` can take bytes from a socket into the staging buffer:
        direct mode, and no write error so far."""
        return self._staging is not None and self.error is None

    def receive(self, sock: Any, count: int) -> int:
        """Direct mode: read at most ``count`` bytes from ``sock`` into the staging buffer
        itself (no copy from a receive buffer), and write the buffer out when it is full.
        Returns how many bytes arrived, 0 when the peer has closed. Errors of the socket
        raise; an error of the disk is kept for :meth:`finish`, and from then on
        :attr:`receives_directly` is False (the caller drains the rest through
        :meth:`write`, which drops it)."""
        staging = self._staging
        assert staging is not None and self.error is None
        start = self._staged
        with memoryview(staging) as buffer, \
                buffer[start : start + min(DIRECT_CHUNK - start, count)] as room:
            got = int(sock.recv_into(room))
            if got:
                with room[:got] as arrived:
                    self._took(arrived)
        self._staged += got
        if self._staged == DIRECT_CHUNK:
            try:
                self._write_staged()
            except OSError as exc:
                self.error = exc
                self._staged = 0
        return got

    def _stage(self, data: bytes | memoryview) -> None:
        """Direct mode: copy into the staging buffer, writing whole chunks as it fills."""
        view = memoryview(data)
        try:
            while view:
                staging = self._staging  # a new one after each asynchronous write
                assert staging is not None
                room = DIRECT_CHUNK - self._staged
                part = view[:room]
                staging[self._staged : self._staged + len(part)] = part
                self._staged += len(part)
                view = view[len(part) :]
                if self._staged == DIRECT_CHUNK:
                    self._write_staged()
        finally:
            view.release()

    def _write_staged(self) -> None:
        """Write what is staged at the end of the file, and start staging again. A full
        buffer with direct I/O on goes out asynchronously where it can (:meth:`_submit`);
        otherwise the call waits for the disk."""
        assert self._staging is not None
        if self._async and self._staged == DIRECT_CHUNK:
            try:
                self._submit()
                return
            except OSError as exc:
                if exc.errno not in _NO_ASYNC:
                    raise
                self._async = False  # this kernel or filesystem cannot: write and wait
        with memoryview(self._staging) as buffer:
            done = 0
            while done < self._staged:
                done += os.pwrite(self._fd, buffer[done : self._staged], self._written + done)
        self._written += self._staged
        self._staged = 0

    def _submit(self) -> None:
        """Start writing the full staging buffer at the end of the file and stage into
        another one. The file is first allocated over the write (ext4 carries out a direct
        write that extends a file inside ``io_submit``, synchronously), doubling as it grows;
        :meth:`finish` cuts it back to its size."""
        end = self._written + self._staged
        if end > self._allocated:
            grow = max(end, min(2 * max(self._allocated, DIRECT_CHUNK),
                                self._allocated + _MAX_GROW))
            aio.fallocate(self._fd, self._allocated, grow - self._allocated)
            self._allocated = grow
        if self._writes is None:
            self._writes = _contexts.take()
        if len(self._inflight) >= ASYNC_DEPTH:
            self._reap(1)
            if self.error is not None:
                raise self.error
        assert self._staging is not None
        tag = self._writes.submit(self._fd, aio.address_of(self._staging), self._staged,
                                  self._written)
        self._inflight[tag] = (self._staging, self._staged)
        self.async_writes += 1
        self._staging = _buffers.take()
        self._written = end
        self._staged = 0

    def _reap(self, at_least: int) -> None:
        """Wait for asynchronous writes to end (at least ``at_least`` of them), give their
        buffers back and keep the first error."""
        assert self._writes is not None
        for tag, result in self._writes.wait(at_least):
            buffer, length = self._inflight.pop(tag)
            _buffers.give(buffer)
            if result != length and self.error is None:
                self.error = (OSError(-result, os.strerror(-result)) if result < 0 else
                              OSError(errno.EIO, f"a direct write wrote {result} of {length} "
                                      "bytes"))

    def _start_writeback(self) -> None:
        """Have the kernel start writing what has arrived so far, while the rest arrives:
        the fsync before the answer then waits for the tail only. A hint; errors surface
        at fsync."""
        try:
            self._fh.flush()
            start_writeback(self._fd, self._kicked, self.size - self._kicked)
        except OSError as exc:
            self.error = exc
        self._kicked = self.size

    @property
    def fd(self) -> int:
        """The open file (for the spool's commit to fsync); -1 once closed."""
        return self._fd

    def finish(self, wait: bool = True) -> None:
        """Hand everything written to the kernel (direct mode: the last block, to the disk);
        raises the first write error, if there was one. The spool's commit fsyncs.

        With ``wait`` False the asynchronous writes still in flight are left to
        :meth:`wait`, which must come before the fsync: the last 256 KB of an instance
        goes out while its tail is written and its receipt made and set."""
        self.flush()
        if self.error is None and self._staging is not None and self._staged:
            # the last partial block goes through the page cache (direct I/O writes whole
            # blocks only; padding it and cutting the file back made the kernel read that
            # block back from the disk), and the fsync writes it with the inode
            try:
                _set_direct(self._fd, False)
                self._write_staged()
            except OSError as exc:
                self.error = exc
        if self.error is None and self._allocated > self.size:
            try:  # allocated ahead beyond its end (the kernel waits for writes in flight)
                os.ftruncate(self._fd, self.size)
            except OSError as exc:
                self.error = exc
        if wait:
            self.wait()
        elif self.error is not None:
            raise self.error

    def wait(self) -> None:
        """Wait for the asynchronous writes still in flight; raises the first write error,
        if there was one."""
        if self._inflight:
            try:
                self._reap(len(self._inflight))
            except OSError as exc:
                self.error = self.error or exc
        if self.error is not None:
            raise self.error

    def flush(self) -> None:
        """Buffered mode: hand what is buffered to the kernel. Direct mode keeps the last
        partial block until :meth:`finish`: only whole blocks can be written directly."""
        if self.error is None and self._fh is not None:
            try:
                self._fh.flush()
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        if self._writes is not None:
            with contextlib.suppress(OSError):
                if self._inflight:  # abandoned mid-dataset: let the writes end first
                    self._reap(len(self._inflight))
            # a context with a write still in flight (the wait failed) is closed, not reused,
            # and that write's buffer is dropped, not handed to another stream
            with contextlib.suppress(OSError):
                _contexts.give(self._writes)
            self._inflight.clear()
            self._writes = None
        if self._staging is not None:
            _buffers.give(self._staging)
            self._staging = None
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        elif self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1


class Streams:
    """Makes the files incoming datasets stream into, in the spool's ``tmp/`` (a spare one
    from its pool where the receiver runs one), with one set of options for both ways a
    C-STORE arrives: the fast path calls it, and pynetdicom calls it in place of
    ``NamedTemporaryFile`` (:func:`install`; its arguments are ignored)."""

    def __init__(self, spool: Spool, direct: bool = True, asynchronous: bool = True) -> None:
        self.spool = spool
        self.direct = direct  # direct I/O where the filesystem allows
        self.asynchronous = asynchronous  # those writes submitted with Linux AIO where allowed

    def __call__(self, *args: Any, **kwargs: Any) -> SpoolTempFile:
        spool = self.spool
        temp = spool.temp_files.take() if spool.temp_files is not None else None
        return SpoolTempFile(spool.tmp, temp, direct=self.direct,
                             asynchronous=self.asynchronous)


def install(streams: Streams) -> None:
    """Make pynetdicom stream incoming datasets into the files ``streams`` makes (a module
    attribute, set once at the receiver's entry, like pynetdicom's ``_config``)."""
    setattr(pynetdicom.dimse_messages, "NamedTemporaryFile", streams)  # noqa: B010
