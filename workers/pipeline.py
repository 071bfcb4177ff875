"""The worker's pipeline, plain Python: validate, name, archive, verify, catalogue, then free
the spool."""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ingest.catalog import catalog_url
from ingest.keys import instance_key, quarantine_keys
from ingest.settings import Settings
from ingest.spool import Receipt, Spool, file_digest
from workers import errors
from workers.archive import Archive, StoredObject, open_archive, safe_header
from workers.errors import PermanentError, TransientError
from workers.identity import dataset_identity
from workers.inventory import CatalogLink, format_time, instance_row, quarantine_row
from workers.validate import Instance, inspect

log = logging.getLogger("dicom_ingest.worker")


class Outcome(enum.Enum):
    ARCHIVED = "archived"
    ALREADY_ARCHIVED = "already-archived"  # a duplicate delivery or a resend of the same bytes
    QUARANTINED = "quarantined"
    GONE = "gone"  # no such spool entry: another delivery finished it
    BUSY = "busy"  # another worker holds the entry right now


@dataclass
class Pipeline:
    spool: Spool
    archive: Archive
    prefix: str
    duplicate_policy: str = "reject"
    max_attempts: int = 5
    #: told of every finished entry: (outcome, receipt, quarantine reason or None)
    observer: Callable[[Outcome, Receipt, str | None], None] | None = None
    #: where a row for each archived and quarantined object goes (None: nowhere)
    catalog: CatalogLink | None = None

    @classmethod
    def from_settings(cls, settings: Settings, archive: tuple[Archive, str] | None = None,
                      catalog: CatalogLink | None = None) -> Pipeline:
        """The pipeline ``settings`` describe; the catalog opens at its first use. A worker
        process passes the archive (``open_archive``) and catalog it shares with its study
        events."""
        store, prefix = archive if archive is not None else open_archive(settings)
        return cls(Spool(settings.spool_dir), store, prefix, settings.duplicate_policy,
                   settings.poison_max_attempts,
                   catalog=catalog if catalog is not None else CatalogLink(catalog_url(settings)))

    def close(self) -> None:
        """Release the catalog's connections (a worker process's exit does it too)."""
        if self.catalog is not None:
            self.catalog.close()

    def process(self, receipt_id: str) -> Outcome:
        """Handle one spool entry. Idempotent; raises TransientError when storage is down."""
        with self.spool.claim(receipt_id) as claimed:
            if not claimed:
                gone = self.spool.read_receipt(receipt_id) is None
                return Outcome.GONE if gone else Outcome.BUSY
            receipt = self.spool.read_receipt(receipt_id)
            if receipt is None:
                return Outcome.GONE
            attempt = self.spool.begin_attempt(receipt_id)
            reason: str | None = None
            study = ""  # known once the dataset is decoded: a quarantine record names it
            try:
                if attempt > self.max_attempts:
                    raise PermanentError(
                        errors.POISON,
                        f"{attempt - 1} attempts at this object never finished (a worker "
                        f"crashed or was killed while handling it)")
                instance = inspect(self.spool.dcm_path(receipt_id), receipt)
                study = instance.study_uid
                outcome = self._archive(receipt, instance)
            except PermanentError as exc:
                self._quarantine(receipt, exc, exc.study_uid or study)
                outcome, reason = Outcome.QUARANTINED, exc.code
            except TransientError:
                self.spool.end_attempt(receipt_id)  # it ended; storage was the problem
                raise
            self.spool.remove(receipt_id)
            if self.observer is not None:
                self.observer(outcome, receipt, reason)
            return outcome

    def _archive(self, receipt: Receipt, instance: Instance) -> Outcome:
        key = instance_key(
            self.prefix, instance.study_uid, instance.series_uid, instance.sop_instance_uid
        )
        sha256 = instance.sha256  # inspect() checked the file against the receipt
        existing = self.archive.head(key)
        if existing is not None:
            target = self._duplicate(key, existing, receipt, sha256)
            if target is None:
                # no row yet: an earlier attempt archived it and then found the catalog down,
                # or it was archived before the catalog existed
                if self.catalog is not None and not self.catalog.has(key):
                    self._catalogue(existing)
                return Outcome.ALREADY_ARCHIVED
            key = target
        metadata = _metadata(receipt)
        stored = self.archive.put_file(
            key,
            self.spool.dcm_path(receipt.receipt_id),
            receipt.size,
            sha256,
            metadata,
        )
        _verify(stored, receipt.size, sha256)
        self._catalogue(StoredObject(key, stored.size, sha256,
                                     metadata=metadata | {"sha256": sha256}))
        log.info(
            "archived receipt=%s sop=%s calling=%s key=%s bytes=%d",
            receipt.receipt_id,
            instance.sop_instance_uid,
            receipt.calling_aet,
            key,
            stored.size,
        )
        return Outcome.ARCHIVED

    def _catalogue(self, stored: StoredObject) -> None:
        """The catalog row of the instance archived as ``stored`` (its key and metadata), new
        to the catalog: its study is opened, or re-opened after its event, in the same
        transaction (an identical resend never gets here: it has its row already)."""
        if self.catalog is None:
            return
        row = instance_row(stored, self.prefix)
        if row is not None:
            self.catalog.record_archived(row)

    def _duplicate(self, key: str, existing: StoredObject, receipt: Receipt,
                   sha256: str) -> str | None:
        """Something is archived under ``key`` already: None when it is this instance (the
        same file, or the same dataset behind another sender's File Meta), else the key to
        write to under the duplicate policy (PermanentError: policy 'reject')."""
        if existing.sha256 == sha256 and existing.size == receipt.size:
            # the metadata says so; the bytes the store returns must say so too
            held = self.archive.read_back(key)
            if held is not None and (held.size, held.sha256) == (receipt.size, sha256):
                log.info("already archived receipt=%s key=%s", receipt.receipt_id, key)
                return None
            log.warning("receipt=%s key=%s: the archived object is not the one its metadata "
                        "describes; writing it again", receipt.receipt_id, key)
            return key
        if self._same_dataset(key, receipt):
            # the same dataset behind another File Meta: another sender, or a resend
            log.info("already archived receipt=%s key=%s: the same dataset, now sent by %s "
                     "(the archived copy came from %s)", receipt.receipt_id, key,
                     receipt.calling_aet, existing.calling_aet or "an unrecorded sender")
            return None
        if self.duplicate_policy == "reject":
            raise PermanentError(
                errors.DUPLICATE_CONFLICT,
                f"{key} already holds a different object (sha256 {existing.sha256[:12]}...)"
                f"; policy 'reject' keeps the first",
            )
        if self.duplicate_policy == "version":
            if not self.archive.keeps_versions():
                raise TransientError(
                    f"policy 'version' needs versioning on {self.archive.description}; "
                    "the instance stays in the spool until it is turned on")
            key = self.archive.versioned_key(key, receipt.receipt_id)
        log.warning("duplicate receipt=%s key=%s: policy %s", receipt.receipt_id, key,
                    self.duplicate_policy)
        return key

    def _same_dataset(self, key: str, receipt: Receipt) -> bool:
        """Whether the archived object under ``key`` holds the dataset bytes, in the same
        transfer syntax, that this spooled instance holds after its File Meta."""
        theirs = self.archive.dataset_identity(key)
        if theirs is None:
            return False
        with open(self.spool.dcm_path(receipt.receipt_id), "rb") as fh:  # OSError: retry
            ours = dataset_identity(fh, receipt.dataset_offset, receipt.transfer_syntax)
        return ours == theirs

    def _quarantine(self, receipt: Receipt, exc: PermanentError, study: str = "") -> None:
        data_key, reason_key = quarantine_keys(self.prefix, receipt.receipt_id)
        reason: dict[str, object] = {
            "reason": exc.code,
            "message": exc.message,
            "quarantined_at": time.time(),
            "receipt": asdict(receipt),
        }
        if study:  # the dataset named it (not for what could not be decoded)
            reason["study_uid"] = study
        # the object as it is now, which is not what the receipt says when the reason is a
        # checksum mismatch: the receipt's own size and sha256 are in the reason record
        size, sha256 = file_digest(self.spool.dcm_path(receipt.receipt_id))  # OSError: retry
        stored = self.archive.put_file(
            data_key,
            self.spool.dcm_path(receipt.receipt_id),
            size,
            sha256,
            _metadata(receipt),
        )
        _verify(stored, size, sha256)
        self.archive.put_bytes(
            reason_key, json.dumps(reason, indent=2).encode(), "application/json"
        )
        if self.catalog is not None:
            self.catalog.record(quarantine_row(data_key, size, sha256, reason))
        log.warning(
            "quarantined receipt=%s sop=%s calling=%s reason=%s: %s",
            receipt.receipt_id,
            receipt.sop_instance_uid,
            receipt.calling_aet,
            exc.code,
            exc.message,
        )


def _metadata(receipt: Receipt) -> dict[str, str]:
    """The object metadata of an archived (or quarantined) object, as the store keeps it."""
    metadata = {
        "calling-aet": receipt.calling_aet,
        "received-at": format_time(receipt.received_at),
        "transfer-syntax": receipt.transfer_syntax,
        "receipt-id": receipt.receipt_id,
        "sop-class-uid": receipt.sop_class_uid,
        "archived-at": format_time(time.time()),
    }
    return {name: safe_header(value) for name, value in metadata.items()}


def _verify(stored: StoredObject, size: int, sha256: str) -> None:
    if stored.size != size or stored.sha256 != sha256:
        raise TransientError(
            f"{stored.key}: stored object does not match the spool (size {stored.size} vs "
            f"{size}, sha256 {stored.sha256[:12]}... vs {sha256[:12]}...); will write it again"
        )
