"""The catalog's rows from what the archive holds: the pipeline writes them as it archives and
quarantines, and :func:`rebuild` makes them again from the archive's keys and object metadata
alone, so the two agree by construction."""

from __future__ import annotations

import calendar
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ingest.catalog import ARCHIVED, QUARANTINED, Catalog, CatalogError, LazyCatalog, Row
from ingest.keys import is_safe_uid, normalize_prefix
from ingest.messages import is_receipt_id
from workers.archive import Archive, StoredObject
from workers.errors import TransientError

log = logging.getLogger("dicom_ingest.catalog")

#: how times are written in object metadata (``received-at``, ``archived-at``): UTC, seconds
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
#: ``{SOP}.{receipt_id}.dcm``: the second object of a SOP Instance UID under policy 'version'
_VERSIONED = re.compile(r"^(?P<sop>.+)\.(?P<receipt>\d{8}T\d{6}-[0-9a-f]{16})\.dcm$")
#: catalog rows written per transaction by a rebuild
_BATCH = 500


def format_time(seconds: float) -> str:
    return time.strftime(TIME_FORMAT, time.gmtime(seconds))


def parse_time(text: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(text, TIME_FORMAT)))
    except ValueError:
        return None


def key_uids(key: str, prefix: str) -> tuple[str, str, str] | None:
    """(Study, Series, SOP Instance UID) named by an instance's key, None for any other key
    (quarantine, a study manifest, something not ours)."""
    base = normalize_prefix(prefix)
    if not key.startswith(base):
        return None
    parts = key[len(base):].split("/")
    if len(parts) != 3 or not parts[2].endswith(".dcm"):
        return None
    study, series, name = parts
    versioned = _VERSIONED.match(name)
    sop = versioned.group("sop") if versioned else name[: -len(".dcm")]
    if not all(is_safe_uid(uid) for uid in (study, series, sop)):
        return None
    return study, series, sop


def instance_row(stored: StoredObject, prefix: str) -> Row | None:
    """The row of an archived instance, from its key and metadata (an object archived before
    ``archived-at`` was written: the store's modification time). None: not an instance key."""
    uids = key_uids(stored.key, prefix)
    if uids is None:
        return None
    study, series, sop = uids
    meta = stored.metadata
    received = parse_time(meta.get("received-at", ""))
    archived = parse_time(meta.get("archived-at", ""))
    if archived is None:
        archived = stored.modified
    return Row(
        sop_instance_uid=sop, sop_class_uid=meta.get("sop-class-uid", ""), study_uid=study,
        series_uid=series, key=stored.key, size=stored.size, sha256=stored.sha256,
        transfer_syntax=meta.get("transfer-syntax", ""), calling_aet=meta.get("calling-aet", ""),
        receipt_id=meta.get("receipt-id", ""),
        received_at=received if received is not None else (stored.modified or 0.0),
        archived_at=archived, state=ARCHIVED)


def quarantine_row(key: str, size: int, sha256: str, record: Mapping[str, Any]) -> Row:
    """The row of a quarantined object under ``key``, from its reason record
    (``quarantine/{receipt_id}.json``); KeyError, TypeError or ValueError when the record is
    not one."""
    receipt = record["receipt"]
    return Row(
        sop_instance_uid=str(receipt["sop_instance_uid"]),
        sop_class_uid=str(receipt["sop_class_uid"]),
        study_uid=str(record.get("study_uid") or ""), series_uid="", key=key,
        size=size, sha256=sha256, transfer_syntax=str(receipt["transfer_syntax"]),
        calling_aet=str(receipt["calling_aet"]), receipt_id=str(receipt["receipt_id"]),
        received_at=float(receipt["received_at"]), archived_at=None, state=QUARANTINED,
        reason=str(record["reason"]))


class CatalogLink:
    """The catalog as a worker writes it: opened at first use, in the process that uses it
    (after the prefork pool forked, so no connection is shared); a database that cannot be
    reached is a :class:`TransientError`, like storage that is down."""

    def __init__(self, url: str) -> None:
        self.catalog = LazyCatalog(url)  # CatalogError when it cannot be reached

    def record(self, row: Row) -> None:
        try:
            self.catalog().record(row)
        except CatalogError as exc:
            raise TransientError(str(exc)) from exc

    def record_archived(self, row: Row) -> None:
        """The row of a newly archived instance, its study opened or re-opened with it."""
        try:
            self.catalog().record_archived(row)
        except CatalogError as exc:
            raise TransientError(str(exc)) from exc

    def has(self, key: str) -> bool:
        try:
            return self.catalog().get(key) is not None
        except CatalogError as exc:
            raise TransientError(str(exc)) from exc

    def close(self) -> None:
        self.catalog.close()


@dataclass(frozen=True)
class Rebuilt:
    recorded: int  # rows written (new or brought up to date)
    removed: int  # rows of objects no longer in the archive
    skipped: int  # keys that are neither an instance nor a quarantine record we can read


def rebuild(archive: Archive, prefix: str, catalog: Catalog,
            progress: Callable[[list[str]], Iterable[str]] = lambda keys: keys) -> Rebuilt:
    """Bring ``catalog`` up to date with the archive: a row for every instance and
    quarantined object (upserted by key), none for keys the archive no longer holds. Only
    rows that existed before the listing are removed, so what workers catalogue meanwhile
    stays. ``progress`` wraps the keys as they are read (a progress bar)."""
    before = catalog.keys()
    base = normalize_prefix(prefix)
    keys = archive.list_keys(base)
    listed = set(keys)
    batch: list[Row] = []
    recorded = skipped = 0
    for key in progress(keys):
        rel = key[len(base):]
        if rel.endswith("/study.json") or (rel.startswith("quarantine/")
                                           and rel.endswith(".dcm")):
            continue  # a study manifest; a quarantined object goes with its record
        row = _quarantine_row(archive, key, listed) if rel.startswith("quarantine/") \
            else _instance_row(archive, key, prefix)
        if row is None:
            skipped += 1
            continue
        batch.append(row)
        if len(batch) >= _BATCH:
            catalog.record_many(batch)
            recorded, batch = recorded + len(batch), []
    catalog.record_many(batch)
    recorded += len(batch)
    removed = catalog.remove(before - listed)
    return Rebuilt(recorded, removed, skipped)


def _instance_row(archive: Archive, key: str, prefix: str) -> Row | None:
    if key_uids(key, prefix) is None:
        log.debug("not an instance key, left out: %s", key)
        return None
    stored = archive.head(key)
    return None if stored is None else instance_row(stored, prefix)


def _quarantine_row(archive: Archive, key: str, listed: set[str]) -> Row | None:
    stem = key.rsplit("/", 1)[1].removesuffix(".json")
    data_key = key.removesuffix(".json") + ".dcm"
    if not key.endswith(".json") or not is_receipt_id(stem) or data_key not in listed:
        return None
    stored = archive.head(data_key)
    if stored is None:
        return None
    try:
        return quarantine_row(data_key, stored.size, stored.sha256,
                              json.loads(archive.read_bytes(key)))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        log.warning("unreadable quarantine record %s, left out: %s", key, exc)
        return None
