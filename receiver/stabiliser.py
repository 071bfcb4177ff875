"""The stabiliser: finds studies that have become stable, puts their events in the outbox, and
sends due events to the workers. A process of its own, started by the first receiver process
of each spool (:func:`main`).

A study is stable when it has had no newly archived instance for ``INGEST_STUDY_STABLE_SECONDS``
and none of its instances can still be in a spool. A receipt does not name its study (the
receiver never decodes), so the rule is conservative: every spool reports a watermark, the
receive time of its oldest entry (or now), and a study whose last archive was at ``T`` waits
until every live spool's watermark is past ``T + INGEST_STUDY_STABLE_SECONDS``: an entry
received before then, of whatever study, holds it back until a worker has finished it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ingest.catalog import CatalogError
from ingest.spool import Spool
from ingest.studies import RENAME_MARGIN, Studies

log = logging.getLogger("dicom_ingest.studies")


class StudyMetrics(Protocol):
    def stabilised(self) -> None: ...

    def pending(self, count: int) -> None: ...


@dataclass
class PassResult:
    stabilised: list[str] = field(default_factory=list)  # event ids made
    sent: int = 0  # events sent to the workers
    pending: int = 0  # events not delivered yet


def interval(stable_seconds: float) -> float:
    """Seconds between passes: a quarter of the stable time, between 0.2 and 5."""
    return max(0.2, min(5.0, stable_seconds / 4))


class Stabiliser:
    """One pass (:meth:`once`) decides and sends; :func:`main` makes one every
    :func:`interval` seconds."""

    def __init__(self, spool: Spool, spool_id: str, studies: Callable[[], Studies],
                 publish: Callable[[str], None], stable_seconds: float, prefix: str,
                 metrics: StudyMetrics | None = None) -> None:
        self.spool, self.spool_id = spool, spool_id
        self._studies, self._publish = studies, publish
        self.stable_seconds, self.prefix = stable_seconds, prefix
        self.metrics = metrics
        self.interval = interval(stable_seconds)

    def safe_once(self) -> None:
        """:meth:`once`, whose failures wait for the next pass."""
        try:
            self.once()
        except CatalogError as exc:
            log.warning("studies: %s; the studies and their events wait", exc)
        except Exception:  # the catalog is down, say: the studies and events wait there
            log.exception("studies: a pass failed; trying again")

    def once(self, now: float | None = None) -> PassResult:
        now = time.time() if now is None else now
        result = PassResult()
        studies = self._studies()
        # the watermark: what this spool held a moment ago (a receipt id's time is taken
        # just before its entry appears, so a little margin)
        _, oldest = self.spool.census()
        clear_before = now - RENAME_MARGIN if oldest is None else min(oldest, now - RENAME_MARGIN)
        studies.report_spool(self.spool_id, clear_before, now)
        cutoff = studies.cutoff(now, self.stable_seconds)
        for study_uid in studies.quiet(cutoff):
            event = studies.stabilise(study_uid, cutoff, now, self.prefix)
            if event is None:
                continue  # another stabiliser won, or an instance came meanwhile
            result.stabilised.append(event.event_id)
            if self.metrics is not None:
                self.metrics.stabilised()
            log.info("study stable event=%s %s", event.event_id, event.payload)
        for event_id in studies.due(now):
            if not studies.lease(event_id, now):
                continue
            try:
                self._publish(event_id)
            except Exception as exc:  # the broker is down: the outbox keeps it
                log.warning("studies: sending event=%s failed (%s); trying again", event_id, exc)
                studies.defer(event_id, now + self.interval)
                break
            result.sent += 1
        result.pending = studies.pending_count()
        if self.metrics is not None:
            self.metrics.pending(result.pending)
        return result


def ready() -> None:
    """Tell the receiver that started this process that its first pass is done: a line on
    standard output, a pipe the receiver reads that line from and then closes (so standard
    output is /dev/null from here on)."""
    try:
        with contextlib.suppress(OSError):  # the receiver stopped waiting, or is gone
            os.write(1, b"ready\n")
    finally:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


def main() -> int:
    """The stabiliser as a process of its own, which the receiver's first process starts
    (``python -m receiver.stabiliser``, settings in its environment): its catalog work then
    takes no CPU time or GIL from the associations. It ends on SIGTERM or SIGINT, or when
    the receiver that started it is gone."""
    from ingest import logs
    from ingest.broker import archive_queue, make_celery, publish_event
    from ingest.catalog import LazyCatalog, catalog_url
    from ingest.keys import archive_prefix
    from ingest.settings import from_env
    from ingest.stopsignals import StopSignals
    from receiver.metrics import StudyCounters

    stop = StopSignals().install()
    settings = from_env()
    logs.configure(settings.log_format, settings.log_level)
    spool = Spool(settings.spool_dir)
    queue = archive_queue(settings)
    app = make_celery(settings, "dicom-ingest-stabiliser")
    catalog = LazyCatalog(catalog_url(settings))

    def studies() -> Studies:
        return Studies(catalog())

    stabiliser = Stabiliser(spool, settings.spool_id or spool.identity(), studies,
                            lambda event_id: publish_event(app, queue, event_id),
                            settings.study_stable_seconds, archive_prefix(settings.archive_url),
                            StudyCounters())
    parent = os.getppid()
    # the first pass at once: opening the catalog (its migrations) is start-up work, done
    # before the receiver serves (it waits for the line below) rather than amid associations
    stabiliser.safe_once()
    ready()
    while not stop.wait(stabiliser.interval) and os.getppid() == parent:
        stabiliser.safe_once()
    stop.finished()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
