"""Archive backends with one layout: S3 (through the ``minio`` client) and a local directory.

Both translate their SDK's or the OS's errors into :class:`TransientError`: a storage failure
is never the object's fault.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlparse

from ingest.settings import Settings
from ingest.spool import file_digest, fsync_dir
from workers.errors import TransientError

META_PREFIX = "x-amz-meta-"
#: why os.link may refuse where a copy still works: another filesystem, no hard links there
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}


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


class Archive(Protocol):
    """Where instances and quarantined objects go; ``metadata`` keys are short ASCII names."""

    description: str

    def head(self, key: str) -> StoredObject | None: ...

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
        return S3Archive(settings, parsed.netloc), parsed.path.lstrip("/")
    if parsed.scheme == "file":
        return LocalArchive(Path(parsed.path)), ""
    if parsed.scheme:
        raise ValueError(f"INGEST_ARCHIVE_URL={url!r}: use s3://, file:// or a plain path")
    return LocalArchive(Path(url)), ""


def _safe_header(value: str) -> str:
    """Object metadata travels as HTTP headers: printable ASCII only."""
    return "".join(c if " " <= c <= "~" else "?" for c in value)[:256]


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
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TransientError(f"cannot stat {path}: {exc}") from exc
        sha = ""
        with contextlib.suppress(OSError):
            sha = os.getxattr(path, self.XATTR + "sha256").decode()
        if not sha:
            sha = file_digest(path)[1]
        return StoredObject(key, size, sha)

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
            raise TransientError(f"cannot write {target}: {exc}") from exc
        # what landed on disk is what we hashed while writing it
        return StoredObject(key, stored_size, written_sha)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self._place(self._path(key), {}, lambda tmp: _copy(io.BytesIO(data), tmp))
        except OSError as exc:
            raise TransientError(f"cannot write {key}: {exc}") from exc

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
            raise TransientError(f"cannot read {key}: {exc}") from exc

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
                        os.setxattr(fd, self.XATTR + name, _safe_header(value).encode())
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
    """Any S3 service (MinIO, AWS, moto, ...) through the ``minio`` client."""

    def __init__(self, settings: Settings, bucket: str) -> None:
        import urllib3
        from minio import Minio

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

    def _translate(self, exc: Exception, what: str) -> TransientError:
        return TransientError(f"S3 {what} failed ({self.description}): {exc}")

    def head(self, key: str) -> StoredObject | None:
        from minio.error import S3Error

        try:
            stat = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise self._translate(exc, f"HEAD {key}") from exc
        except Exception as exc:
            raise self._translate(exc, f"HEAD {key}") from exc
        metadata = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        return StoredObject(
            key, int(stat.size or 0), metadata.get(META_PREFIX + "sha256", ""), stat.version_id
        )

    def put_file(
        self, key: str, path: Path, size: int, sha256: str, metadata: dict[str, str]
    ) -> StoredObject:
        headers: dict[str, str | list[str] | tuple[str]] = {
            name: _safe_header(value) for name, value in metadata.items()
        }
        headers["sha256"] = sha256
        try:
            with open(path, "rb") as fh:
                result = self.client.put_object(
                    self.bucket,
                    key,
                    fh,
                    size,
                    content_type="application/dicom",
                    metadata=headers,
                    part_size=PART_SIZE,
                )
        except Exception as exc:
            raise self._translate(exc, f"PUT {key}") from exc
        stored = self.head(key)
        if stored is None:
            raise TransientError(f"S3 PUT {key} succeeded but the object is not there")
        return StoredObject(key, stored.size, stored.sha256, result.version_id)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
        except Exception as exc:
            raise self._translate(exc, f"PUT {key}") from exc

    def versioned_key(self, key: str, suffix: str) -> str:
        return key  # the bucket's versioning keeps the earlier object

    def keeps_versions(self) -> bool:
        try:
            status = self.client.get_bucket_versioning(self.bucket).status
        except Exception as exc:
            raise self._translate(exc, "GET versioning") from exc
        return bool(status == "Enabled")

    def list_keys(self, prefix: str) -> list[str]:
        try:
            return sorted(str(o.object_name) for o in
                          self.client.list_objects(self.bucket, prefix=prefix, recursive=True))
        except Exception as exc:
            raise self._translate(exc, f"LIST {prefix}") from exc

    def read_bytes(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.bucket, key)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise FileNotFoundError(key) from exc
            raise self._translate(exc, f"GET {key}") from exc
        except Exception as exc:
            raise self._translate(exc, f"GET {key}") from exc

    def download(self, key: str, path: Path) -> None:
        try:
            self.client.fget_object(self.bucket, key, str(path))
        except Exception as exc:
            raise self._translate(exc, f"GET {key}") from exc

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, key)
        except Exception as exc:
            raise self._translate(exc, f"DELETE {key}") from exc
