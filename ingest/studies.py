"""Studies and their events, kept in the catalog: when a study is stable, its manifest and
its event (an outbox row, ``{study}:{revision}``) until the event is delivered.

A study is *open* from its first archived instance (:meth:`Catalog.record_archived`) and
*stable* once it has had no newly archived instance for ``INGEST_STUDY_STABLE_SECONDS`` and
no spool may still hold one of its instances. The receiver's stabiliser decides it
(:mod:`receiver.stabiliser`); the workers write the manifest and deliver the event
(:mod:`workers.events`). Every transition is a conditional UPDATE, so any number of
stabilisers and workers agree: one event per stabilisation, one delivery at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa

from ingest.catalog import (
    ARCHIVED,
    OPEN,
    QUARANTINED,
    STABLE,
    Catalog,
    Row,
    as_row,
    events,
    instances,
    spools,
    studies,
)
from ingest.keys import manifest_key

#: seconds a spool's watermark lags its clock: a receipt id takes its time just before the
#: entry is renamed into the spool
RENAME_MARGIN = 2.0
#: a spool whose watermark was not renewed for this long (its receiver is gone) no longer
#: holds studies back
SPOOL_FORGET = 900.0
#: seconds an event sent to the workers, or being delivered by one, is left alone
LEASE = 120.0
_CHUNK = 500


def event_id(study_uid: str, revision: int) -> str:
    """The event's stable id, which consumers de-duplicate on."""
    return f"{study_uid}:{revision}"


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass(frozen=True)
class Event:
    """One row of the outbox. ``manifest`` and ``payload`` are fixed when the event is made:
    every delivery of an id carries the same bytes."""

    event_id: str
    study_uid: str
    revision: int
    created_at: float
    manifest_key: str
    manifest: str
    payload: str
    manifest_written_at: float | None
    webhook_delivered_at: float | None
    task_delivered_at: float | None
    delivered_at: float | None
    attempts: int
    next_attempt_at: float
    claimed_until: float
    last_error: str | None


_EVENT_FIELDS = tuple(f.name for f in fields(Event))


@dataclass(frozen=True)
class StudyStatus:
    """A line of ``dicom-ingest studies``."""

    study_uid: str
    state: str
    revision: int
    series: int
    instances: int
    quarantined: int
    first_received_at: float
    last_received_at: float
    last_archived_at: float
    event_id: str | None  # the latest event's
    event: str  # "delivered", "pending" or "none"
    last_error: str | None


def build_manifest(study_uid: str, revision: int, rows: Sequence[Row],
                   stabilised_at: float) -> dict[str, Any]:
    """The manifest of a study from its catalog rows: per series its instances, the
    quarantined objects known to be of the study apart, with their reasons."""
    archived = sorted((r for r in rows if r.state == ARCHIVED), key=lambda r: r.key)
    quarantined = sorted((r for r in rows if r.state == QUARANTINED), key=lambda r: r.key)
    series: dict[str, list[dict[str, Any]]] = {}
    for r in archived:
        series.setdefault(r.series_uid, []).append(
            {"sop_instance_uid": r.sop_instance_uid, "key": r.key,
             "sop_class_uid": r.sop_class_uid, "size": r.size, "sha256": r.sha256})
    received = [r.received_at for r in archived] or [stabilised_at]
    return {
        "study_instance_uid": study_uid,
        "revision": revision,
        "event_id": event_id(study_uid, revision),
        "stabilised_at": iso(stabilised_at),
        "first_received_at": iso(min(received)),
        "last_received_at": iso(max(received)),
        "calling_aets": sorted({r.calling_aet for r in rows if r.calling_aet}),
        "counts": {"series": len(series), "instances": len(archived),
                   "quarantined": len(quarantined), "bytes": sum(r.size for r in archived)},
        "series": [{"series_instance_uid": uid, "instances": items}
                   for uid, items in sorted(series.items())],
        "quarantined": [{"sop_instance_uid": r.sop_instance_uid, "key": r.key,
                         "reason": r.reason, "calling_aet": r.calling_aet,
                         "received_at": iso(r.received_at)} for r in quarantined],
    }


def summary(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    """The event's body (the webhook's JSON, the Celery task's second argument)."""
    counts = manifest["counts"]
    return {
        "event_id": manifest["event_id"],
        "study_instance_uid": manifest["study_instance_uid"],
        "revision": manifest["revision"],
        "series": counts["series"],
        "instances": counts["instances"],
        "quarantined": counts["quarantined"],
        "manifest_key": key,
        "calling_aets": manifest["calling_aets"],
        "first_received_at": manifest["first_received_at"],
        "last_received_at": manifest["last_received_at"],
        "stabilised_at": manifest["stabilised_at"],
    }


def encode(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=False)


class Studies:
    """The studies, the outbox and the spools' watermarks in ``catalog``."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # --- the stability rule ------------------------------------------------------------------

    def report_spool(self, spool_id: str, clear_before: float, now: float) -> None:
        """Every entry of the spool ``spool_id`` received before ``clear_before`` has left it."""
        statement = self.catalog.insert(spools).values(
            spool_id=spool_id, clear_before=clear_before, updated_at=now)
        statement = statement.on_conflict_do_update(
            index_elements=[spools.c.spool_id],
            set_={"clear_before": statement.excluded.clear_before,
                  "updated_at": statement.excluded.updated_at})
        with self.catalog.transaction() as connection:
            connection.execute(statement)

    def cutoff(self, now: float, stable_seconds: float) -> float:
        """Studies whose last instance was archived at or before this are stable: quiet for
        ``stable_seconds`` at a moment before which every live spool has been emptied."""
        with self.catalog.transaction("reading") as connection:
            watermark = connection.execute(
                sa.select(sa.func.min(spools.c.clear_before))
                .where(spools.c.updated_at >= now - SPOOL_FORGET)).scalar()
        return min(now, now if watermark is None else float(watermark)) - stable_seconds

    def quiet(self, cutoff: float, limit: int = 1000) -> list[str]:
        """Open studies whose last archive was at or before ``cutoff``."""
        with self.catalog.transaction("reading") as connection:
            return list(connection.execute(
                sa.select(studies.c.study_uid)
                .where(studies.c.state == OPEN, studies.c.last_archived_at <= cutoff)
                .order_by(studies.c.last_archived_at).limit(limit)).scalars())

    def stabilise(self, study_uid: str, cutoff: float, now: float, prefix: str) -> Event | None:
        """Mark the study stable with its next revision and put its event in the outbox, in
        one transaction; None when it is no longer open and quiet (another stabiliser won,
        or an instance was archived meanwhile)."""
        with self.catalog.transaction() as connection:
            # the conditional UPDATE is the decision: a second stabiliser, or one racing a
            # worker that re-opens the study, updates no row
            won = connection.execute(
                sa.update(studies)
                .where(studies.c.study_uid == study_uid, studies.c.state == OPEN,
                       studies.c.last_archived_at <= cutoff)
                .values(state=STABLE, revision=studies.c.revision + 1, stabilised_at=now))
            if won.rowcount != 1:
                return None
            revision = int(connection.execute(
                sa.select(studies.c.revision).where(studies.c.study_uid == study_uid)
            ).scalar_one())
            rows = [as_row(raw) for raw in connection.execute(
                sa.select(instances).where(instances.c.study_uid == study_uid))]
            manifest = build_manifest(study_uid, revision, rows, now)
            key = manifest_key(prefix, study_uid)
            event = Event(
                event_id=event_id(study_uid, revision), study_uid=study_uid, revision=revision,
                created_at=now, manifest_key=key, manifest=encode(manifest),
                payload=json.dumps(summary(manifest, key)), manifest_written_at=None,
                webhook_delivered_at=None, task_delivered_at=None, delivered_at=None,
                attempts=0, next_attempt_at=now, claimed_until=0.0, last_error=None)
            connection.execute(sa.insert(events).values(
                {name: getattr(event, name) for name in _EVENT_FIELDS}))
        return event

    # --- the outbox --------------------------------------------------------------------------

    def due(self, now: float, limit: int = 100) -> list[str]:
        """Undelivered events whose next attempt is due and that no worker holds."""
        with self.catalog.transaction("reading") as connection:
            return list(connection.execute(
                sa.select(events.c.event_id)
                .where(events.c.delivered_at.is_(None), events.c.next_attempt_at <= now,
                       events.c.claimed_until < now)
                .order_by(events.c.created_at).limit(limit)).scalars())

    def lease(self, event_id: str, now: float) -> bool:
        """Take the right to send ``event_id`` to the workers now (no other stabiliser sends
        it again within :data:`LEASE`)."""
        return self._update(event_id, {"next_attempt_at": now + LEASE},
                            events.c.delivered_at.is_(None), events.c.next_attempt_at <= now,
                            events.c.claimed_until < now)

    def defer(self, event_id: str, at: float) -> None:
        """Send ``event_id`` again at ``at`` (sending it failed)."""
        self._update(event_id, {"next_attempt_at": at})

    def claim(self, event_id: str, now: float) -> Event | None:
        """Hold ``event_id`` for one delivery attempt (for at most :data:`LEASE`); None when it
        is delivered already or another worker holds it."""
        if not self._update(event_id, {"claimed_until": now + LEASE},
                            events.c.delivered_at.is_(None), events.c.claimed_until < now):
            return None
        return self.load(event_id)

    def mark(self, event_id: str, column: str, now: float) -> None:
        """One step of the delivery done: ``manifest_written_at``, ``webhook_delivered_at``,
        ``task_delivered_at``."""
        if column not in ("manifest_written_at", "webhook_delivered_at", "task_delivered_at"):
            raise ValueError(column)
        self._update(event_id, {column: now})

    def delivered(self, event_id: str, now: float) -> None:
        self._update(event_id, {"delivered_at": now, "claimed_until": 0.0, "last_error": None})

    def failed(self, event_id: str, attempts: int, next_attempt_at: float, error: str) -> None:
        self._update(event_id, {"attempts": attempts, "next_attempt_at": next_attempt_at,
                                "claimed_until": 0.0, "last_error": error[:2000]})

    def _update(self, event_id: str, values: dict[str, Any], *where: Any) -> bool:
        with self.catalog.transaction() as connection:
            result = connection.execute(
                sa.update(events).where(events.c.event_id == event_id, *where).values(values))
        return bool(result.rowcount == 1)

    def load(self, event_id: str) -> Event | None:
        with self.catalog.transaction("reading") as connection:
            raw = connection.execute(
                sa.select(events).where(events.c.event_id == event_id)).first()
        return None if raw is None else _event(raw)

    def latest(self, study_uid: str) -> Event | None:
        """The study's event of the highest revision."""
        with self.catalog.transaction("reading") as connection:
            raw = connection.execute(
                sa.select(events).where(events.c.study_uid == study_uid)
                .order_by(events.c.revision.desc()).limit(1)).first()
        return None if raw is None else _event(raw)

    def events_of(self, study_uid: str) -> list[Event]:
        with self.catalog.transaction("reading") as connection:
            return [_event(raw) for raw in connection.execute(
                sa.select(events).where(events.c.study_uid == study_uid)
                .order_by(events.c.revision))]

    def pending_count(self) -> int:
        with self.catalog.transaction("reading") as connection:
            return int(connection.execute(
                sa.select(sa.func.count()).select_from(events)
                .where(events.c.delivered_at.is_(None))).scalar_one())

    # --- operators ---------------------------------------------------------------------------

    def recent(self, limit: int = 50) -> list[StudyStatus]:
        """The studies last received, newest first, with their counts and latest event."""
        with self.catalog.transaction("reading") as connection:
            found = list(connection.execute(
                sa.select(studies).order_by(studies.c.last_received_at.desc(),
                                            studies.c.study_uid).limit(limit)))
            uids = [row.study_uid for row in found]
            counts: dict[str, tuple[int, int, int]] = {}
            latest: dict[str, Any] = {}
            for start in range(0, len(uids), _CHUNK):
                part = uids[start:start + _CHUNK]
                archived = instances.c.state == ARCHIVED
                for uid, series, total, quarantined in connection.execute(
                        sa.select(instances.c.study_uid,
                                  sa.func.count(sa.distinct(
                                      sa.case((archived, instances.c.series_uid)))),
                                  sa.func.count(sa.case((archived, 1))),
                                  sa.func.count(sa.case((~archived, 1))))
                        .where(instances.c.study_uid.in_(part))
                        .group_by(instances.c.study_uid)):
                    counts[uid] = (int(series), int(total), int(quarantined))
                for raw in connection.execute(
                        sa.select(events.c.study_uid, events.c.event_id, events.c.revision,
                                  events.c.delivered_at, events.c.last_error)
                        .where(events.c.study_uid.in_(part))):
                    if raw.study_uid not in latest or raw.revision > latest[raw.study_uid].revision:
                        latest[raw.study_uid] = raw
        result = []
        for row in found:
            series, total, quarantined = counts.get(row.study_uid, (0, 0, 0))
            event = latest.get(row.study_uid)
            result.append(StudyStatus(
                study_uid=row.study_uid, state=row.state, revision=row.revision,
                series=series, instances=total, quarantined=quarantined,
                first_received_at=row.first_received_at, last_received_at=row.last_received_at,
                last_archived_at=row.last_archived_at,
                event_id=None if event is None else event.event_id,
                event="none" if event is None else
                ("delivered" if event.delivered_at is not None else "pending"),
                last_error=None if event is None else event.last_error))
        return result


def _event(raw: Any) -> Event:
    return Event(**{name: getattr(raw, name) for name in _EVENT_FIELDS})


__all__ = [
    "LEASE",
    "OPEN",
    "STABLE",
    "Event",
    "Studies",
    "StudyStatus",
    "build_manifest",
    "event_id",
    "summary",
]
