"""Archive backends with one layout: S3 (through the ``minio`` client) and a local directory.

Both translate their SDK's or the OS's errors by what they are: a service that is down, slow
or failing is a :class:`TransientError` (retried), a refusal an operator must fix is a
:class:`ConfigurationError` (retried too, and logged as an error). Anything else is a bug
and surfaces as it is.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar
from urllib.parse import urlparse

from ingest.keys import archive_prefix
from ingest.settings import Settings
from ingest.spool import file_digest, fsync_dir
from workers.errors import ConfigurationError, TransientError
from workers.identity import DatasetIdentity, IdentityError, read_identity

log = logging.getLogger("dicom_ingest.worker")

META_PREFIX = "x-amz-meta-"
#: why os.link may refuse where a copy still works: another filesystem, no hard links there
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}
#: OS errors on the archive directory that an operator must fix
_LOCAL_CONFIGURATION = {errno.EACCES, errno.EPERM, errno.EROFS}
#: S3 error codes that mean the settings or the bucket are wrong, not the service down
S3_CONFIGURATION_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId",
    "InvalidBucketName", "NoSuchBucket", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "AuthorizationHeaderMalformed", "InvalidRegion", "PermanentRedirect",
    "NotImplemented", "InvalidBucketState", "MethodNotAllowed",
})
#: S3 error codes of a busy or failing service: retry
S3_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
    "ServiceUnavailable", "RequestTimeTooSkewed", "OperationAborted", "BadDigest",
    "IncompleteBody", "XMinioServerNotInitialized", "XMinioStorageFull",
})


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


#: the mode a new archive file gets (what ``open(..., "wb")`` gives under this umask)
_FILE_MODE = 0o666 & ~_umask()
_CHUNK = 1 << 20
_T = TypeVar("_T")
PART_SIZE = 16 * 2**20


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str
    version_id: str | None = None
    calling_aet: str = ""  # the sender of the archived copy, where its metadata says
    #: from :meth:`Archive.head`: the object's metadata by short name (``sha256``,
    #: ``calling-aet``, ...), and when the store last changed it (seconds since the epoch)
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False)
    modified: float | None = None


class Archive(Protocol):
    """Where instances and quarantined objects go; ``metadata`` keys are short ASCII names."""

    description: str

    def head(self, key: str) -> StoredObject | None:
        """Size, sha256 and metadata of the object under ``key`` as the store describes it;
        None when there is no such object."""
        ...

    def read_back(self, key: str) -> StoredObject | None:
        """Size and sha256 of the bytes the store returns for ``key`` now (not of the
        metadata we wrote); None when there is no such object."""
        ...

    def dataset_identity(self, key: str) -> DatasetIdentity | None:
        """The identity of the object's dataset (:mod:`workers.identity`), read from the
        object itself; None when there is no such object or it is not a Part 10 file."""
        ...

    def put_file(
        self, key: str, path: Path, size: int, sha256: str, metadata: dict[str, str]
    ) -> StoredObject: ...

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None: ...

    def versioned_key(self, key: str, suffix: str) -> str:
        """The key under which the ``version`` duplicate policy keeps a second object."""
        ...

    def keeps_versions(self) -> bool:
        """Whether writing :meth:`versioned_key` keeps the earlier object."""
        ...

    def list_keys(self, prefix: str) -> list[str]: ...

    def read_bytes(self, key: str) -> bytes: ...

    def download(self, key: str, path: Path) -> None: ...

    def delete(self, key: str) -> None: ...


def open_archive(settings: Settings) -> tuple[Archive, str]:
    """The backend named by ``INGEST_ARCHIVE_URL`` and the key prefix inside it."""
    url = settings.archive_url
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"INGEST_ARCHIVE_URL={url!r}: s3:// needs a bucket name")
        return S3Archive(settings, parsed.netloc), archive_prefix(url)
    if parsed.scheme == "file":
        return LocalArchive(Path(parsed.path)), ""
    if parsed.scheme:
        raise ValueError(f"INGEST_ARCHIVE_URL={url!r}: use s3://, file:// or a plain path")
    return LocalArchive(Path(url)), ""


def safe_header(value: str) -> str:
    """Object metadata travels as HTTP headers: printable ASCII only."""
    value = value[:256]
    if value.isascii() and value.isprintable():  # nearly always: no walk through it
        return value
    return "".join(c if " " <= c <= "~" else "?" for c in value)


class LocalArchive:
    """A directory; metadata in ``user.dicom_ingest.*`` extended attributes where supported."""

    XATTR = "user.dicom_ingest."

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"directory {root}"

    def _path(self, key: str) -> Path:
        path = self.root / key
        if ".." in Path(key).parts or Path(key).is_absolute():
            raise ValueError(f"refusing key {key!r}")
        return path

    def head(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _local_error(exc, f"cannot stat {path}") from exc
        metadata = self._metadata(path)
        sha = metadata.get("sha256", "") or file_digest(path)[1]
        # ctime: the file got its name here (a hard link keeps the spool file's mtime)
        return StoredObject(key, stat.st_size, sha, calling_aet=metadata.get("calling-aet", ""),
                            metadata=metadata, modified=stat.st_ctime)

    def _metadata(self, path: Path) -> dict[str, str]:
        """The ``user.dicom_ingest.*`` attributes of ``path`` by short name (none where the
        filesystem has no user attributes)."""
        found: dict[str, str] = {}
        try:
            names = os.listxattr(path)
        except OSError:
            return found
        for name in names:
            if name.startswith(self.XATTR):
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    found[name[len(self.XATTR):]] = os.getxattr(path, name).decode()
        return found

    def read_back(self, key: str) -> StoredObject | None:
        try:
            size, sha = file_digest(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _local_error(exc, f"cannot read {key}") from exc
        return StoredObject(key, size, sha)

    def dataset_identity(self, key: str) -> DatasetIdentity | None:
        try:
            with open(self._path(key), "rb") as fh:
                return read_identity(fh)
        except FileNotFoundError:
            return None
        except IdentityError as exc:
            log.warning("archived %s is not a Part 10 file we can compare: %s", key, exc)
            return None
        except OSError as exc:
            raise _local_error(exc, f"cannot read {key}") from exc

    def put_file(
        self, key: str, path: Path, size: int, sha256: str, metadata: dict[str, str]
    ) -> StoredObject:
        """Archive the file at ``path``. A spooled file on the archive's filesystem gets a
        second name, ``key``, instead of a copy: the same bytes by construction, already
        durable (the receiver fsynced them), with no data to read, hash, write or fsync
        again. The caller has checked it against ``sha256`` and holds its spool entry, so
        nothing writes to it; the spool's name for it goes once it is archived. Elsewhere (another
        filesystem, or one without hard links) it is copied, and hashed on the way."""
        target = self._path(key)
        metadata = metadata | {"sha256": sha256}
        try:
            try:
                self._place(target, metadata, lambda tmp: _hard_link(path, tmp))
                return StoredObject(key, target.stat().st_size, sha256)
            except _NoLink:
                pass
            with open(path, "rb") as src:
                written_sha = self._place(target, metadata, lambda tmp: _copy(src, tmp))
            stored_size = target.stat().st_size
        except OSError as exc:
            raise _local_error(exc, f"cannot write {target}") from exc
        # what landed on disk is what we hashed while writing it
        return StoredObject(key, stored_size, written_sha)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self._place(self._path(key), {}, lambda tmp: _copy(io.BytesIO(data), tmp))
        except OSError as exc:
            raise _local_error(exc, f"cannot write {key}") from exc

    def versioned_key(self, key: str, suffix: str) -> str:
        return f"{key[: -len('.dcm')]}.{suffix}.dcm" if key.endswith(".dcm") else f"{key}.{suffix}"

    def keeps_versions(self) -> bool:
        return True

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _local_error(exc, f"cannot read {key}") from exc

    def download(self, key: str, path: Path) -> None:
        shutil.copyfile(self._path(key), path)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def _place(self, target: Path, metadata: dict[str, str],
               make: Callable[[Path], _T]) -> _T:
        """Make the file under a temporary name beside ``target`` (``make(tmp)``), give it
        the mode of a new file and ``metadata`` as extended attributes, fsync it, rename it
        to ``target`` and fsync the directory. Returns what ``make`` returned."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            made = make(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fchmod(fd, _FILE_MODE)  # a linked spool file: as a copy would be
                for name, value in metadata.items():
                    with contextlib.suppress(OSError):  # no xattrs: head() hashes instead
                        os.setxattr(fd, self.XATTR + name, safe_header(value).encode())
                os.fsync(fd)  # data, attributes, link count
            finally:
                os.close(fd)
            os.rename(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(target.parent)
        return made


def _local_error(exc: OSError, what: str) -> TransientError:
    if exc.errno in _LOCAL_CONFIGURATION:
        return ConfigurationError(f"{what}: {exc} (check the archive directory's permissions)")
    return TransientError(f"{what}: {exc}")


class _NoLink(Exception):
    """os.link cannot give this file a name there; copy it instead."""


def _hard_link(path: Path, tmp: Path) -> None:
    try:
        os.link(path, tmp)
    except OSError as exc:
        if exc.errno in _NO_LINK:
            raise _NoLink from exc
        raise


def _copy(src: io.BufferedIOBase | io.BytesIO, tmp: Path) -> str:
    """Copy ``src`` to a new file ``tmp``; the sha256 of what was written."""
    digest = hashlib.sha256()
    with open(tmp, "xb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


class S3Archive:
    """Any S3 service (MinIO, AWS, moto, ...) through the ``minio`` client.

    An object is verified by reading it back after the PUT and hashing what the service
    returns: the check rests on the bytes the service stored, not on the metadata we sent."""

    def __init__(self, settings: Settings, bucket: str) -> None:
        import urllib3
        from minio import Minio
        from minio.helpers import check_bucket_name

        check_bucket_name(bucket)  # ValueError: a setting to fix, said at start
        endpoint, secure = settings.s3_endpoint, settings.s3_secure
        if "://" in endpoint:
            parsed = urlparse(endpoint)
            endpoint, secure = parsed.netloc, parsed.scheme == "https"
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=60),
            retries=urllib3.Retry(
                total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)
            ),
            maxsize=4,
        )
        self.client = Minio(
            endpoint,
            access_key=settings.s3_access_key or None,
            secret_key=settings.s3_secret_key or None,
            secure=secure,
            region=settings.s3_region or None,
            http_client=http,
        )
        self.bucket = bucket
        self.description = f"s3://{bucket} at {endpoint}"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate the SDK's and the HTTP stack's errors met while doing ``what``."""
        import urllib3
        from minio.error import InvalidResponseError, S3Error, ServerError

        try:
            yield
        except S3Error as exc:
            status = getattr(exc.response, "status", 0) or 0
            text = f"S3 {what} failed ({self.description}): {exc.code}: {exc.message}"
            if exc.code in S3_CONFIGURATION_CODES:
                raise ConfigurationError(text) from exc
            if exc.code in S3_TRANSIENT_CODES or status >= 500 or status == 429:
                raise TransientError(text) from exc
            raise
        except (ServerError, InvalidResponseError, urllib3.exceptions.HTTPError,
                OSError) as exc:
            raise TransientError(f"S3 {what} failed ({self.description}): {exc}") from exc

    def head(self, key: str) -> StoredObject | None:
        from minio.error import S3Error

        try:
            with self._errors(f"HEAD {key}"):
                stat = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise
        metadata = {k.lower()[len(META_PREFIX):]: v for k, v in (stat.metadata or {}).items()
                    if k.lower().startswith(META_PREFIX)}
        modified = stat.last_modified.timestamp() if stat.last_modified else None
        return StoredObject(
            key, int(stat.size or 0), metadata.get("sha256", ""), stat.version_id,
            metadata.get("calling-aet", ""), metadata=metadata, modified=modified,
        )

    def read_back(self, key: str) -> StoredObject | None:
        try:
            size, sha = self._read(key, None, _size_and_sha256)
        except FileNotFoundError:
            return None
        return StoredObject(key, size, sha)

    def dataset_identity(self, key: str) -> DatasetIdentity | None:
        try:
            return self._read(key, None, read_identity)
        except FileNotFoundError:
            return None
        except IdentityError as exc:
            log.warning("archived %s is not a Part 10 file we can compare: %s", key, exc)
            return None

    def put_file(
        self, key: str, path: Path, size: int, sha256: str, metadata: dict[str, str]
    ) -> StoredObject:
        headers: dict[str, str | list[str] | tuple[str]] = {
            name: safe_header(value) for name, value in metadata.items()
        }
        headers["sha256"] = sha256
        with self._errors(f"PUT {key}"), open(path, "rb") as fh:
            result = self.client.put_object(
                self.bucket,
                key,
                fh,
                size,
                content_type="application/dicom",
                metadata=headers,
                part_size=PART_SIZE,
            )
        try:
            stored_size, stored_sha = self._read(key, result.version_id, _size_and_sha256)
        except FileNotFoundError:
            raise TransientError(f"S3 PUT {key} succeeded but the object is not there") from None
        return StoredObject(key, stored_size, stored_sha, result.version_id)

    def _read(self, key: str, version_id: str | None,
              reader: Callable[[BinaryIO], _T]) -> _T:
        """``reader`` applied to the object's bytes as the service returns them."""
        from minio.error import S3Error

        try:
            with self._errors(f"GET {key}"):
                response = self.client.get_object(self.bucket, key, version_id=version_id)
                try:
                    return reader(response)  # type: ignore[arg-type]  # file-like
                finally:
                    response.close()
                    response.release_conn()
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchVersion"):
                raise FileNotFoundError(key) from exc
            raise

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        with self._errors(f"PUT {key}"):
            self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )

    def versioned_key(self, key: str, suffix: str) -> str:
        return key  # the bucket's versioning keeps the earlier object

    def keeps_versions(self) -> bool:
        with self._errors("GET versioning"):
            status = self.client.get_bucket_versioning(self.bucket).status
        return bool(status == "Enabled")

    def list_keys(self, prefix: str) -> list[str]:
        with self._errors(f"LIST {prefix}"):
            return sorted(str(o.object_name) for o in
                          self.client.list_objects(self.bucket, prefix=prefix, recursive=True))

    def read_bytes(self, key: str) -> bytes:
        return self._read(key, None, lambda response: bytes(response.read()))

    def download(self, key: str, path: Path) -> None:
        with self._errors(f"GET {key}"):
            self.client.fget_object(self.bucket, key, str(path))

    def delete(self, key: str) -> None:
        with self._errors(f"DELETE {key}"):
            self.client.remove_object(self.bucket, key)


def _size_and_sha256(fh: BinaryIO) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()
