"""Operator commands: sweep, echo, status, quarantine list and replay, find, studies and catalog
rebuild.
They use both sides (the receiver's sweep pass, the workers' archive and quarantine), as only
this layer may."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

from ingest.broker import archive_queue, make_celery, publish, queue_length
from ingest.catalog import Catalog, CatalogError, catalog_url
from ingest.keys import quarantine_keys
from ingest.scu import associate
from ingest.settings import Settings, redact_url
from ingest.spool import Spool

T = TypeVar("T")


def sweep(settings: Settings) -> int:
    """One reconciliation pass, as the receiver's periodic sweeper does it."""
    from receiver.sweeper import sweep_once

    spool = Spool(settings.spool_dir)
    spool.ensure()
    app = make_celery(settings, "dicom-ingest-sweep")
    queue = archive_queue(settings)
    result = sweep_once(spool, lambda rid: publish(app, queue, rid), settings.sweep_age,
                        queue_length=lambda: queue_length(settings.redis_url, queue))
    print(f"requeued {result.requeued}, pending {result.pending}, orphans removed "
          f"{result.removed_orphans}, temp files removed {result.removed_temp}")
    if result.enqueue_failed:
        print(f"dicom-ingest: could not reach the broker at {redact_url(settings.redis_url)};"
              " nothing was lost, run the sweep again when it is back", file=sys.stderr)
        return 1
    return 0


def echo(settings: Settings, host: str, calling: str = "INGEST-ECHO") -> int:
    """C-ECHO ``host``:``settings.port``; 0 when it answers Success."""
    import logging

    from pynetdicom import AE

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = associate(ae, host, settings.port, ae_title=settings.ae_title)
    if not assoc.is_established:
        print(f"dicom-ingest: no association with {settings.ae_title} at {host}:{settings.port}",
              file=sys.stderr)
        return 1
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code != 0:
        print(f"dicom-ingest: C-ECHO answered {code!r}", file=sys.stderr)
        return 1
    print(f"C-ECHO {settings.ae_title} at {host}:{settings.port}: Success")
    return 0


def status(settings: Settings, as_json: bool) -> int:
    from workers.archive import open_archive

    spool = Spool(settings.spool_dir)
    spool.ensure()
    depth, oldest = spool.stats()
    from receiver.commitment import Requests

    requests = Requests(settings.spool_dir)
    requests.ensure()
    commitments, expired = len(requests.pending()), len(requests.expired_ids())
    queue = archive_queue(settings)
    queued = queue_length(settings.redis_url, queue)
    workers: list[str] | None = None
    if queued is None:
        print(f"dicom-ingest: broker unreachable at {redact_url(settings.redis_url)}",
              file=sys.stderr)
    else:
        app = make_celery(settings, "dicom-ingest-status")
        replies = app.control.ping(timeout=1.0) or []
        workers = sorted(name for reply in replies for name in reply)
    quarantined: int | None
    archive_state = "ok"
    try:
        archive, prefix = open_archive(settings)
        from workers import quarantine

        quarantined = len(quarantine.records(archive, prefix))
    except Exception as exc:  # an operator command: say what is wrong, keep going
        from workers.errors import ConfigurationError

        if isinstance(exc, ConfigurationError):
            archive_state = f"configuration error: {exc}"
            print(f"dicom-ingest: the archive refuses us; fix its settings: {exc}",
                  file=sys.stderr)
        else:
            archive_state = f"unreachable: {exc}"
            print(f"dicom-ingest: archive unreachable: {exc}", file=sys.stderr)
        quarantined = None
    report: dict[str, Any] = {"spool_depth": depth, "oldest_age_seconds": round(oldest, 1),
                              "queue": queue, "queue_length": queued,
                              "quarantined": quarantined, "archive": archive_state,
                              "commitments_pending": commitments,
                              "commitments_expired": expired,
                              "workers": workers}
    if as_json:
        print(json.dumps(report))
        return 0

    def show(value: object) -> str:
        return "unknown" if value is None else str(value)

    print(f"spool depth      {depth}")
    print(f"oldest entry     {oldest:.0f} s" if depth else "oldest entry     -")
    print(f"queue length     {show(queued)} ({queue})")
    print(f"quarantined      {show(quarantined)}")
    print(f"commitments      {commitments} pending"
          + (f", {expired} expired (undeliverable)" if expired else ""))
    print(f"archive          {archive_state}")
    print(f"workers          {show(len(workers) if workers is not None else None)}"
          + (f" ({', '.join(workers)})" if workers else ""))
    return 0


def quarantine_list(settings: Settings, as_json: bool) -> int:
    from workers.archive import open_archive
    from workers.quarantine import records

    archive, prefix = open_archive(settings)
    rows = records(archive, prefix)
    if _printed_plainly(rows, as_json, "quarantine is empty"):
        return 0
    print(f"{'receipt id':33} {'reason':25} {'sender':16} {'received (UTC)':20} SOP Instance UID")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.received_at))
        print(f"{r.receipt_id:33} {r.reason:25} {r.calling_aet:16} {when:20} "
              f"{r.sop_instance_uid[:64]}")
    print(f"{len(rows)} quarantined")
    return 0


def quarantine_replay(settings: Settings, ids: list[str], replay_all: bool) -> int:
    from workers.archive import open_archive
    from workers.quarantine import records, replay

    archive, prefix = open_archive(settings)
    spool = Spool(settings.spool_dir)
    spool.ensure()
    app = make_celery(settings, "dicom-ingest-replay")
    queue = archive_queue(settings)
    targets = [r.receipt_id for r in records(archive, prefix)] if replay_all else ids
    failed = 0
    replayed: list[str] = []
    for receipt_id in targets:
        try:
            replay(archive, prefix, spool, receipt_id, lambda rid: publish(app, queue, rid))
            replayed.append(quarantine_keys(prefix, receipt_id)[0])
            print(f"replayed {receipt_id}")
        except Exception as exc:  # a bad id, a missing record, the broker down after the
            failed += 1              # spool write (then the sweeper enqueues it): say, go on
            print(f"dicom-ingest: {receipt_id}: {exc}", file=sys.stderr)
    print(f"{len(targets) - failed} replayed, {failed} failed")
    if replayed:  # their quarantine copies are gone: so are their rows
        try:
            catalog = Catalog.open(catalog_url(settings))
            try:
                catalog.remove(replayed)
            finally:
                catalog.close()
        except CatalogError as exc:
            print(f"dicom-ingest: {exc}; the catalog still lists the replayed objects as "
                  "quarantined until `dicom-ingest catalog rebuild`", file=sys.stderr)
    return 1 if failed else 0


def find(settings: Settings, as_json: bool, limit: int | None = None,
         **filters: Any) -> int:
    """List catalog rows (``filters``: those of :meth:`Catalog.find`)."""
    rows = _read_catalog(settings, lambda catalog: catalog.find(limit=limit, **filters))
    if rows is None:
        return 1
    if _printed_plainly(rows, as_json, "no instances found"):
        return 0
    print(f"{'received (UTC)':20} {'state':11} {'sender':16} {'bytes':>10}  "
          f"{'SOP Instance UID':64} key")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.received_at))
        print(f"{when:20} {r.state:11} {r.calling_aet:16} {r.size:10d}  "
              f"{r.sop_instance_uid[:64]:64} {r.key}" + (f" ({r.reason})" if r.reason else ""))
    print(f"{len(rows)} found")
    return 0


def studies(settings: Settings, as_json: bool, limit: int = 50) -> int:
    """The studies last received, newest first, with their state and latest event."""
    from ingest.studies import Studies, StudyStatus

    def recent(catalog: Catalog) -> tuple[list[StudyStatus], int]:
        found = Studies(catalog)
        return found.recent(limit), found.pending_count()

    read = _read_catalog(settings, recent)
    if read is None:
        return 1
    found, pending = read
    if _printed_plainly(found, as_json, "no studies yet"):
        return 0
    print(f"{'last received (UTC)':20} {'state':7} {'rev':>4} {'series':>6} {'inst':>6} "
          f"{'event':10} Study Instance UID")
    for s in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.last_received_at))
        print(f"{when:20} {s.state:7} {s.revision:4d} {s.series:6d} {s.instances:6d} "
              f"{s.event:10} {s.study_uid}" + (f" ({s.last_error})" if s.event == "pending"
                                               and s.last_error else ""))
    print(f"{len(found)} studies; {pending} event(s) not delivered yet")
    return 0


def _read_catalog(settings: Settings, read: Callable[[Catalog], T]) -> T | None:
    """What ``read`` finds in the catalog; None (and a message) when it cannot be reached."""
    try:
        catalog = Catalog.open(catalog_url(settings))
        try:
            return read(catalog)
        finally:
            catalog.close()
    except CatalogError as exc:
        print(f"dicom-ingest: {exc}", file=sys.stderr)
        return None


def _printed_plainly(items: Sequence[Any], as_json: bool, none: str) -> bool:
    """JSON lines of ``items`` (dataclasses), or ``none`` when there are none: True when
    that was all there is to print (no table)."""
    if as_json:
        for item in items:
            print(json.dumps(asdict(item)))
        return True
    if not items:
        print(none)
        return True
    return False


def catalog_rebuild(settings: Settings) -> int:
    """Rebuild the catalog from the archive, with a progress bar on stderr."""
    from tqdm import tqdm

    from workers.archive import open_archive
    from workers.errors import TransientError
    from workers.inventory import rebuild

    archive, prefix = open_archive(settings)
    try:
        catalog = Catalog.open(catalog_url(settings))
    except CatalogError as exc:
        print(f"dicom-ingest: {exc}", file=sys.stderr)
        return 1
    try:
        done = rebuild(archive, prefix, catalog, lambda keys: tqdm(
            keys, desc="catalog rebuild", unit="key", file=sys.stderr, mininterval=0.5))
    except (CatalogError, TransientError) as exc:
        print(f"dicom-ingest: {exc}; run the rebuild again when it is back", file=sys.stderr)
        return 1
    finally:
        catalog.close()
    print(f"catalog rebuilt from {archive.description}: {done.recorded} rows written, "
          f"{done.removed} removed, {done.skipped} keys left out")
    return 0
