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
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pynetdicom.dimse_messages


class SpoolTempFile:
    """The part of a ``NamedTemporaryFile`` that pynetdicom uses, tolerant of write errors.
    It hashes what passes through, so the handler need not read the file back."""

    HEAD = 256  # enough of the start to find where the File Meta ends

    def __init__(self, directory: Path) -> None:
        fd, self.name = tempfile.mkstemp(suffix=".dcm", prefix="recv-", dir=directory)
        self._fh = os.fdopen(fd, "wb")
        self.file = self  # pynetdicom calls ``.file.flush()``
        self.error: OSError | None = None
        self.digest = hashlib.sha256()
        self.size = 0
        self.head = b""

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                self._fh.write(data)
            except OSError as exc:
                self.error = exc
                return len(data)
            self.digest.update(data)  # hashlib lets other threads run on large buffers
            self.size += len(data)
            if len(self.head) < self.HEAD:
                self.head += bytes(data[: self.HEAD - len(self.head)])
        return len(data)

    def sync(self) -> None:
        """Flush and fsync; raises the first write error, if there was one."""
        self.flush()
        if self.error is not None:
            raise self.error
        os.fsync(self._fh.fileno())

    def flush(self) -> None:
        if self.error is None:
            try:
                self._fh.flush()
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()


def install(directory: Path) -> None:
    """Make pynetdicom stream incoming datasets into :class:`SpoolTempFile` in ``directory``
    (a module attribute, set once at the receiver's entry, like pynetdicom's ``_config``)."""

    def factory(*args: Any, **kwargs: Any) -> SpoolTempFile:
        return SpoolTempFile(directory)

    setattr(pynetdicom.dimse_messages, "NamedTemporaryFile", factory)  # noqa: B010
