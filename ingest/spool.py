"""The spool: the system of record for every instance until it is archived.

Layout under the spool root (one filesystem, so that ``rename`` is atomic):

- ``tmp/``: files being written (pynetdicom's streamed datasets, receipts before rename);
- ``entries/{receipt_id}.dcm``: the Part 10 file as received (File Meta + the sender's bytes);
- ``entries/{receipt_id}.json``: the receipt. Its presence is what makes an entry complete:
  it is renamed into place after the ``.dcm`` and the directory is fsynced before the sender
  hears ``0x0000``.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ingest.messages import check_receipt_id

RECEIPT_VERSION = 1


class SpoolError(Exception):
    """The spool could not be written or read."""


@dataclass(frozen=True)
class Receipt:
    """What the receiver knew about one C-STORE when it made it durable."""

    receipt_id: str
    calling_aet: str
    called_aet: str
    peer: str
    received_at: float  # seconds since the epoch, UTC
    sop_class_uid: str  # as in the C-STORE request
    sop_instance_uid: str  # as in the C-STORE request
    transfer_syntax: str  # the negotiated one
    size: int  # bytes of the Part 10 file in the spool
    dataset_offset: int  # where the sender's bytes start in that file
    sha256: str  # of the whole Part 10 file
    version: int = RECEIPT_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        try:
            raw: Any = json.loads(data)
            fields = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw}
            receipt = cls(**fields)
        except (ValueError, TypeError, KeyError) as exc:
            raise SpoolError(f"unreadable receipt: {exc}") from exc
        check_receipt_id(receipt.receipt_id)
        return receipt


def new_receipt_id(now: float | None = None) -> str:
    """A time-sortable, path-safe id: ``YYYYMMDDTHHMMSS-<16 hex>`` (UTC)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(8)}"


def receipt_time(receipt_id: str) -> float:
    """The receive time (to the second) encoded in a receipt id."""
    return calendar.timegm(time.strptime(receipt_id[:15], "%Y%m%dT%H%M%S"))


def file_digest(path: Path, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while data := fh.read(chunk):
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to a temp file, fsync it and rename it to ``path`` (no directory fsync)."""
    tmp = tmp_dir / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)


class Spool:
    """Paths and the durable write/remove protocol of one spool root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries = root / "entries"
        self.tmp = root / "tmp"

    def ensure(self) -> None:
        """Create the directories; fail early if the root is unusable."""
        for path in (self.root, self.entries, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        if os.stat(self.entries).st_dev != os.stat(self.tmp).st_dev:
            raise SpoolError(f"{self.tmp} and {self.entries} must be on one filesystem")

    def dcm_path(self, receipt_id: str) -> Path:
        return self.entries / f"{check_receipt_id(receipt_id)}.dcm"

    def receipt_path(self, receipt_id: str) -> Path:
        return self.entries / f"{check_receipt_id(receipt_id)}.json"

    def commit(self, received_file: Path, receipt: Receipt) -> None:
        """Make one received file and its receipt durable under ``entries/``.

        ``received_file`` must already be fsynced and live on the spool filesystem.
        """
        dcm = self.dcm_path(receipt.receipt_id)
        os.rename(received_file, dcm)
        try:
            write_durable(self.receipt_path(receipt.receipt_id), receipt.encode(), self.tmp)
            fsync_dir(self.entries)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dcm)
            raise

    def read_receipt(self, receipt_id: str) -> Receipt | None:
        """The receipt, or None when the entry is gone (already archived or quarantined)."""
        try:
            data = self.receipt_path(receipt_id).read_bytes()
        except FileNotFoundError:
            return None
        return Receipt.decode(data)

    def attempts_path(self, receipt_id: str) -> Path:
        return self.entries / f"{check_receipt_id(receipt_id)}.attempts"

    def begin_attempt(self, receipt_id: str) -> int:
        """Count one more attempt at an entry and return how many did not end (a worker that
        crashed or hung mid-task never calls :meth:`end_attempt`): a poison detector."""
        path = self.attempts_path(receipt_id)
        try:
            count = int(path.read_text() or 0) + 1
        except (FileNotFoundError, ValueError):
            count = 1
        # a full spool disk must not stop the work that frees it: counting is only a hint
        with contextlib.suppress(OSError):
            path.write_text(str(count))
        return count

    def end_attempt(self, receipt_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.attempts_path(receipt_id))

    def remove(self, receipt_id: str) -> None:
        """Remove an entry: the receipt first (it marks the entry complete), then the file."""
        for path in (self.receipt_path(receipt_id), self.dcm_path(receipt_id),
                     self.attempts_path(receipt_id)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        # no directory fsync: an entry that comes back after a crash is archived already,
        # and handling it again finds the same object under its key (a harmless repeat)

    def receipt_ids(self) -> list[str]:
        """Ids of the complete entries, oldest first."""
        ids = []
        for name in os.listdir(self.entries):
            if name.endswith(".json") and not name.startswith("."):
                ids.append(name[: -len(".json")])
        return sorted(ids)

    def depth(self) -> int:
        return len(self.receipt_ids())

    def stats(self, now: float | None = None) -> tuple[int, float]:
        """(number of complete entries, age in seconds of the oldest one, 0 when empty)."""
        ids = self.receipt_ids()
        if not ids:
            return 0, 0.0
        now = time.time() if now is None else now
        return len(ids), max(0.0, now - receipt_time(ids[0]))

    @contextlib.contextmanager
    def claim(self, receipt_id: str) -> Iterator[bool]:
        """Hold an exclusive, non-blocking lock on an entry while one worker handles it.

        Yields False when another process holds it (a duplicate delivery running right now)
        or the entry no longer exists. The lock dies with the process that holds it.
        """
        try:
            fd = os.open(self.receipt_path(receipt_id), os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    yield False
                    return
                raise
            yield True
        finally:
            os.close(fd)
