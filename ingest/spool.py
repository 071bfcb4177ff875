"""The spool: the system of record for every instance until it is archived.

Layout under the spool root (one filesystem, so that ``rename`` is atomic):

- ``tmp/``: files being written (pynetdicom's streamed datasets, receipts before rename);
- ``entries/{receipt_id}.dcm``: the Part 10 file as received (File Meta + the sender's bytes),
  with its receipt (JSON) as the extended attribute ``user.dicom_ingest.receipt``. The file
  is renamed into ``entries/`` only once it and its receipt are fsynced, and the directory is
  fsynced before the sender hears ``0x0000``: a ``.dcm`` under ``entries/`` is a complete
  entry.
- ``entries/{receipt_id}.json``: the receipt as a file of its own, where the filesystem has no
  user extended attributes (and in spools written before receipts became attributes). It is
  renamed in before its ``.dcm`` and removed after it, so one alone is a leftover.
"""

from __future__ import annotations

import calendar
import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingest.messages import check_receipt_id, is_receipt_id

try:  # the same CRC-32 as zlib's, computed with ISA-L's vector code, which is much faster
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - a platform without isal's wheels
    from zlib import crc32

#: 2: the receiver takes a CRC-32 (``crc32``) and leaves ``sha256`` to the workers; 1: it
#: took the sha256 itself (such receipts are still read and checked by their sha256)
RECEIPT_VERSION = 2

log = logging.getLogger("dicom_ingest.spool")


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
    #: of the whole Part 10 file, where it was taken before the worker (receipts of version
    #: 1, replays, rebuilt receipts); "" when the worker is to take it
    sha256: str
    #: CRC-32 (zlib's, 8 hex digits) of the whole Part 10 file as the receiver wrote it: the
    #: worker checks the spooled file against it before it takes the sha256
    crc32: str = ""
    version: int = RECEIPT_VERSION

    def encode(self) -> bytes:
        # the fields are plain values: no need for asdict's recursive deep copy (hot path)
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return json.dumps(fields, sort_keys=True).encode()

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
    size, sha256, _ = file_digests(path, chunk, crc=False)
    return size, sha256


def file_digests(path: Path, chunk: int = 1 << 20, crc: bool = True,
                 sha: bool = True) -> tuple[int, str, str]:
    """(size, sha256 hex, CRC-32 hex) of a file in one read; the CRC is "" unless ``crc``,
    the sha256 "" unless ``sha``."""
    digest, size, value = hashlib.sha256() if sha else None, 0, 0
    with open(path, "rb") as fh:
        while data := fh.read(chunk):
            if digest is not None:
                digest.update(data)
            if crc:
                value = crc32(data, value)
            size += len(data)
    return (size, digest.hexdigest() if digest is not None else "",
            crc32_hex(value) if crc else "")


def crc32_hex(value: int) -> str:
    """A receipt's spelling of a CRC-32: 8 lowercase hex digits."""
    return f"{value & 0xFFFFFFFF:08x}"


class Crc32:
    """A running CRC-32 with the two methods of a hashlib object that the receiver uses.

    The receiver checksums what it writes with this rather than sha256, which costs far more
    CPU on the C-STORE path; the workers, which scale out, take the sha256 as they check the
    file against this CRC."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = crc32(data, self.value)

    def hexdigest(self) -> str:
        return crc32_hex(self.value)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_temp(tmp_dir: Path | str, prefix: str = "recv-", suffix: str = ".dcm") -> TempFile:
    """A new empty file in ``tmp_dir``, open for writing and locked (``flock``) so that the
    sweeper leaves it alone for as long as it is open, however old it gets."""
    path = os.path.join(tmp_dir, f"{prefix}{secrets.token_hex(8)}{suffix}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    return TempFile(fd, path)


def try_lock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting: False when another open file
    holds it; other errors raise."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def in_use(path: Path) -> bool:
    """Whether a process holds the lock :func:`create_temp` takes on a temp file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return not try_lock(fd)
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TempFile:
    """An open, locked, empty file in the spool's ``tmp/``."""

    fd: int
    path: str


class TempFilePool:
    """Empty temp files made ahead of need by a thread of their own.

    Creating a file costs an inode allocation, which is slow on a filesystem where many files
    were recently deleted (a spool, whose entries the workers delete as they archive them).
    Taken from this pool, the C-STORE path does not wait for it. Pooled files
    are locked, so the sweeper leaves them be; the ones left when the process ends are
    unlocked then, and it removes them later.
    """

    def __init__(self, tmp_dir: Path | str, size: int = 16) -> None:
        self._tmp_dir = str(tmp_dir)
        self._size = size
        self._ready: collections.deque[TempFile] = collections.deque()
        self._wanted = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="temp-files", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take(self) -> TempFile:
        """A fresh temp file (made at once if the pool is empty)."""
        if len(self._ready) <= self._size // 2:
            self._wanted.set()
        try:
            return self._ready.popleft()
        except IndexError:
            return create_temp(self._tmp_dir)

    def stop(self) -> None:
        self._stopped = True
        self._wanted.set()
        self._thread.join(5)
        while self._ready:
            spare = self._ready.popleft()
            with contextlib.suppress(OSError):
                os.unlink(spare.path)
            os.close(spare.fd)

    def _run(self) -> None:
        while not self._stopped:
            self._wanted.wait(5.0)
            self._wanted.clear()
            while not self._stopped and len(self._ready) < self._size:
                try:
                    self._ready.append(create_temp(self._tmp_dir))
                except OSError:  # disk full, or gone: the C-STORE path says so itself
                    break


def write_durable(path: Path, data: bytes, tmp_dir: Path, temp: TempFile | None = None,
                  sync: bool = True) -> None:
    """Write ``data`` to a temp file (``temp``, or a new one), fsync it (unless not
    ``sync``) and rename it to ``path`` (no directory fsync)."""
    if temp is None:
        temp = create_temp(tmp_dir, prefix=f".{path.name}.", suffix=".tmp")
    fd, tmp = temp.fd, temp.path
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
        os.rename(tmp, path)  # still locked: no sweeper takes it meanwhile
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


#: the entry file's extended attribute that holds its receipt
RECEIPT_XATTR = "user.dicom_ingest.receipt"
#: the entry file's extended attribute that counts unfinished attempts at it
ATTEMPTS_XATTR = "user.dicom_ingest.attempts"
_NO_XATTRS = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
# a receipt that does not fit in an attribute (very long UIDs) goes to a file as well
_RECEIPT_NOT_IN_XATTR = _NO_XATTRS | {errno.E2BIG, errno.ERANGE, errno.ENOSPC}


def _attempts(raw: bytes) -> int:
    try:
        return max(0, int(raw.decode("ascii") or 0))
    except (UnicodeDecodeError, ValueError):
        return 0  # garbled by a crash: start again


def _read_id(path: Path) -> str:
    value = path.read_text().strip()
    if not value or not all(c.isalnum() or c in "-_" for c in value) or len(value) > 64:
        raise SpoolError(f"{path} holds no spool id ({value!r:.40}); remove it to make one")
    return value


class Spool:
    """Paths and the durable write/remove protocol of one spool root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries = root / "entries"
        self.tmp = root / "tmp"
        # the same as strings: the C-STORE path joins names to them once per instance
        self.entries_dir = str(self.entries)
        self.tmp_dir = str(self.tmp)
        self.temp_files: TempFilePool | None = None  # the receiver's, when it runs one

    def ensure(self) -> None:
        """Create the directories; fail early if the root is unusable."""
        for path in (self.root, self.entries, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        if os.stat(self.entries).st_dev != os.stat(self.tmp).st_dev:
            raise SpoolError(f"{self.tmp} and {self.entries} must be on one filesystem")

    def identity(self) -> str:
        """This spool's id (``{root}/spool-id``, made at first use): receivers and workers
        that share the spool read the same one, so its archive tasks reach only them."""
        path = self.root / "spool-id"
        with contextlib.suppress(FileNotFoundError):
            return _read_id(path)
        tmp = self.tmp / f"spool-id-{secrets.token_hex(8)}"
        tmp.write_text(secrets.token_hex(6) + "\n")
        try:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another process made it first
                os.link(tmp, path)
        finally:
            tmp.unlink()
        fsync_dir(self.root)
        return _read_id(path)

    def dcm_path(self, receipt_id: str) -> Path:
        return self.entries / f"{check_receipt_id(receipt_id)}.dcm"

    def receipt_path(self, receipt_id: str) -> Path:
        return self.entries / f"{check_receipt_id(receipt_id)}.json"

    def commit(self, received_file: Path | str, receipt: Receipt, fd: int = -1) -> None:
        """Make one received file and its receipt durable under ``entries/``.

        ``received_file`` must live on the spool filesystem; its bytes need not be fsynced
        yet (``fd``, when given, is that file open: it is not opened again). The receipt
        becomes an extended attribute of the file, one fsync makes both durable, the file is
        renamed into ``entries/`` and the directory is fsynced: from then on the entry
        survives a crash, and before, it is not there. One inode, one rename and two fsyncs
        per instance. Where the receipt cannot be an attribute it is written to
        ``{receipt_id}.json`` and renamed in first (its contents are not fsynced:
        :meth:`read_receipt` rebuilds an empty one from the file).
        """
        encoded = receipt.encode()
        in_xattr = self._seal(received_file, encoded, fd)
        name = check_receipt_id(receipt.receipt_id)
        dcm = f"{self.entries_dir}/{name}.dcm"
        receipt_file = f"{self.entries_dir}/{name}.json"
        try:
            if not in_xattr:
                temp = self.temp_files.take() if self.temp_files is not None else None
                write_durable(Path(receipt_file), encoded, self.tmp, temp, sync=False)
            os.rename(received_file, dcm)
            fsync_dir(self.entries_dir)
        except BaseException:
            for path in (dcm, receipt_file):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise

    @staticmethod
    def _seal(path: Path | str, encoded: bytes, fd: int = -1) -> bool:
        """Put the receipt on the file as an attribute and fsync it; False when the
        attribute could not be set (the file is fsynced all the same)."""
        opened = fd < 0
        if opened:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                os.setxattr(fd, RECEIPT_XATTR, encoded)
                in_xattr = True
            except OSError as exc:
                if exc.errno not in _RECEIPT_NOT_IN_XATTR:
                    raise
                in_xattr = False
            os.fsync(fd)
        finally:
            if opened:
                os.close(fd)
        return in_xattr

    def read_receipt(self, receipt_id: str) -> Receipt | None:
        """The receipt, or None when the entry is gone (already archived or quarantined).

        A receipt that cannot be read (a ``.json`` left empty by a power loss, see
        :meth:`commit`, or none at all) is rebuilt from the entry's file and written back."""
        dcm = self.dcm_path(receipt_id)
        try:
            data = os.getxattr(dcm, RECEIPT_XATTR)
        except FileNotFoundError:
            return None
        except OSError as exc:  # not there (a receipt file), or no attributes on this disk
            if exc.errno != errno.ENODATA and exc.errno not in _NO_XATTRS:
                raise
            try:
                data = self.receipt_path(receipt_id).read_bytes()
            except FileNotFoundError:
                data = b""
        try:
            return Receipt.decode(data)
        except SpoolError as exc:
            try:
                receipt = self.rebuild_receipt(receipt_id)
            except FileNotFoundError:
                return None  # archived meanwhile
            except Exception as rebuild_error:
                raise exc from rebuild_error
        encoded = receipt.encode()
        if not self._seal(dcm, encoded):
            write_durable(self.receipt_path(receipt_id), encoded, self.tmp)
        return receipt

    def rebuild_receipt(self, receipt_id: str) -> Receipt:
        """A receipt made from the entry's Part 10 file: the File Meta the receiver wrote
        names the request's UIDs, the negotiated transfer syntax and both AE titles; the
        receipt id the receive time. The checksums are taken now, so they prove only that the
        file does not change from here on; the peer address is lost."""
        import pydicom

        path = self.dcm_path(receipt_id)
        meta = pydicom.filereader.read_file_meta_info(path)
        size, sha256, crc = file_digests(path)

        def text(keyword: str) -> str:
            return str(meta.get(keyword, "")).strip("\0 ")

        receipt = Receipt(
            receipt_id=receipt_id,
            calling_aet=text("SourceApplicationEntityTitle"),
            called_aet=text("ReceivingApplicationEntityTitle"),
            peer="",
            received_at=float(receipt_time(receipt_id)),
            sop_class_uid=text("MediaStorageSOPClassUID"),
            sop_instance_uid=text("MediaStorageSOPInstanceUID"),
            transfer_syntax=text("TransferSyntaxUID"),
            size=size,
            dataset_offset=132 + 12 + int(meta.FileMetaInformationGroupLength),
            sha256=sha256,
            crc32=crc,
        )
        log.warning("receipt %s was unreadable (a crash before it reached the disk); rebuilt "
                    "from its file", receipt_id)
        return receipt

    def attempts_path(self, receipt_id: str) -> Path:
        """Where the attempt count lives on a filesystem without extended attributes."""
        return self.entries / f"{check_receipt_id(receipt_id)}.attempts"

    def begin_attempt(self, receipt_id: str) -> int:
        """Count one more attempt at an entry and return how many did not end (a worker that
        crashed or hung mid-task never calls :meth:`end_attempt`): a poison detector.

        The count is an extended attribute of the entry's file, so it goes when the entry
        goes and costs no file of its own (creating and deleting one per task is slow on a
        directory with much churn). Where the filesystem has no user xattrs it is a
        ``.attempts`` file.
        """
        entry = self.dcm_path(receipt_id)
        try:
            count = _attempts(os.getxattr(entry, ATTEMPTS_XATTR)) + 1
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                count = 1
            elif exc.errno in _NO_XATTRS:
                return self._begin_attempt_file(receipt_id)
            else:
                return 1  # the entry is gone, or its disk fails: counting is only a hint
        # a full spool disk must not stop the work that frees it: counting is only a hint
        with contextlib.suppress(OSError):
            os.setxattr(entry, ATTEMPTS_XATTR, str(count).encode())
        return count

    def _begin_attempt_file(self, receipt_id: str) -> int:
        path = self.attempts_path(receipt_id)
        try:
            count = _attempts(path.read_bytes()) + 1
        except FileNotFoundError:
            count = 1
        with contextlib.suppress(OSError):
            path.write_text(str(count))
        return count

    def end_attempt(self, receipt_id: str) -> None:
        try:
            os.removexattr(self.dcm_path(receipt_id), ATTEMPTS_XATTR)
        except OSError as exc:
            if exc.errno not in _NO_XATTRS:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.attempts_path(receipt_id))

    def remove(self, receipt_id: str) -> None:
        """Remove an entry: its file first (it marks the entry complete), then a receipt file
        and an attempts file, where the filesystem needed them.

        The file may live on as an archived object (a directory archive's hard link): the
        attempts counter is taken off it first; the receipt stays on it, a record of who sent
        it, when and from where."""
        self.end_attempt(receipt_id)
        for path in (self.dcm_path(receipt_id), self.receipt_path(receipt_id),
                     self.attempts_path(receipt_id)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        # no directory fsync: an entry that comes back after a crash is archived already,
        # and handling it again finds the same object under its key (a harmless repeat)

    @staticmethod
    def entry_id(name: str) -> str | None:
        """The receipt id of a complete entry's file name under ``entries/``, else None (also
        for a ``.dcm`` not named by a receipt id: no entry, whoever put it there)."""
        if Spool.is_dcm_name(name):
            receipt_id = name[: -len(".dcm")]
            return receipt_id if is_receipt_id(receipt_id) else None
        return None

    @staticmethod
    def is_dcm_name(name: str) -> bool:
        """Whether a name under ``entries/`` is that of a DICOM file (``*.dcm``, not hidden),
        an entry's or not."""
        return name.endswith(".dcm") and not name.startswith(".")

    def receipt_ids(self) -> list[str]:
        """Ids of the complete entries, oldest first."""
        return sorted(filter(None, map(self.entry_id, os.listdir(self.entries))))

    def depth(self) -> int:
        return self.census()[0]

    def census(self) -> tuple[int, float | None]:
        """(number of complete entries, receive time of the oldest, None when empty): one
        listing of ``entries/``, not sorted."""
        names = [name for name in os.listdir(self.entries) if self.entry_id(name) is not None]
        if not names:
            return 0, None
        return len(names), float(receipt_time(min(names)))  # ids sort by receive time

    def stats(self, now: float | None = None) -> tuple[int, float]:
        """(number of complete entries, age in seconds of the oldest one, 0 when empty)."""
        count, oldest = self.census()
        if oldest is None:
            return 0, 0.0
        now = time.time() if now is None else now
        return count, max(0.0, now - oldest)

    @contextlib.contextmanager
    def claim(self, receipt_id: str) -> Iterator[bool]:
        """Hold an exclusive, non-blocking lock on an entry while one worker handles it.

        Yields False when another process holds it (a duplicate delivery running right now)
        or the entry no longer exists. The lock dies with the process that holds it.
        """
        try:
            fd = os.open(self.dcm_path(receipt_id), os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            yield try_lock(fd)
        finally:
            os.close(fd)
