"""The archive task: thin, like a web view; the work is in :mod:`workers.pipeline`."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery

from ingest.messages import (
    ARCHIVE_TASK,
    STUDY_EVENT_TASK,
    MessageError,
    check_event_id,
    check_receipt_id,
)
from ingest.spool import Receipt
from workers import metrics
from workers.errors import ConfigurationError, TransientError
from workers.events import Announcer
from workers.pipeline import Outcome, Pipeline

log = logging.getLogger("dicom_ingest.worker")
T = TypeVar("T")


def backoff(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: exponential, capped, with jitter."""
    return float(min(2**retries, 120)) * random.uniform(0.8, 1.2)


def observe(outcome: Outcome, receipt: Receipt, reason: str | None) -> None:
    """Count what the pipeline finished (per pool process; summed by /metrics)."""
    m = metrics.get()
    if outcome is Outcome.ARCHIVED:
        m["archived"].inc()
        m["latency"].observe(max(0.0, time.time() - receipt.received_at))
    elif outcome is Outcome.ALREADY_ARCHIVED:
        m["duplicates"].labels(receipt.calling_aet).inc()
    elif outcome is Outcome.QUARANTINED:
        m["quarantined"].labels(reason or "unknown").inc()


def per_process(make: Callable[[], T]) -> Callable[[], T]:
    """``make()`` once per worker process, at its first use (after the prefork pool forked,
    so no connection is shared across processes)."""
    cache: dict[int, T] = {}

    def get() -> T:
        pid = os.getpid()
        if pid not in cache:
            cache.clear()
            cache[pid] = make()
        return cache[pid]

    return get


def register(app: Celery, make_pipeline: Callable[[], Pipeline], max_retries: int) -> None:
    """Add the archive task to ``app``. The pipeline is built once per worker process
    (after the prefork pool forks, so no connection is shared across processes)."""
    def make() -> Pipeline:
        made = make_pipeline()
        made.observer = observe
        return made

    pipeline = per_process(make)

    @app.task(  # type: ignore[untyped-decorator]
        name=ARCHIVE_TASK,
        # not shared: a shared task would be added to every app created later, and a second
        # app (another settings) would then run the first app's closure under this name
        shared=False,
        bind=True,
        max_retries=max_retries,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def archive(self: Any, receipt_id: object) -> str:
        try:
            rid = check_receipt_id(receipt_id)
        except MessageError as exc:
            log.error("dropping a malformed message: %s", exc)
            return "malformed"
        try:
            return pipeline().process(rid).value
        except (TransientError, OSError) as exc:  # the spool's disk, a service: not the object
            delay = backoff(self.request.retries)
            metrics.get()["retries"].inc()
            configuration = isinstance(exc, ConfigurationError)
            if configuration:
                metrics.get()["errors"].labels("configuration").inc()
            log.log(
                logging.ERROR if configuration else logging.WARNING,
                "receipt=%s %s (attempt %d of %d), retry in %.0fs: %s",
                rid,
                "the archive refuses us; fix its settings" if configuration
                else "transient failure",
                self.request.retries + 1,
                max_retries + 1,
                delay,
                exc,
            )
            # past max_retries this raises: the entry stays in the spool for the sweeper
            raise self.retry(exc=exc, countdown=delay) from exc
        except Exception:
            # a bug: it surfaces with its traceback; the entry stays in the spool with its
            # attempt open, so the sweeper's deliveries end in quarantine as poison
            metrics.get()["errors"].labels("unexpected").inc()
            log.exception("receipt=%s unexpected error; the entry stays in the spool", rid)
            raise


def observe_event(target: str, ok: bool) -> None:
    """Count a study event's delivery steps (per pool process; summed by /metrics)."""
    m = metrics.get()
    (m["events_delivered"] if ok else m["event_failures"]).labels(target).inc()


def register_events(app: Celery, make_announcer: Callable[[], Announcer]) -> None:
    """Add the study event task to ``app``. It is not retried by Celery: a failed attempt is
    written to the outbox with its next time, and the receiver's stabiliser sends the event
    again then (so an attempt lost with Redis, or a worker killed mid-way, is tried again
    too)."""
    def make() -> Announcer:
        made = make_announcer()
        made.observer = observe_event
        return made

    announcer = per_process(make)

    @app.task(  # type: ignore[untyped-decorator]
        name=STUDY_EVENT_TASK, shared=False, acks_late=True, reject_on_worker_lost=True)
    def study_event(event_id: object) -> str:
        try:
            eid = check_event_id(event_id)
        except MessageError as exc:
            log.error("dropping a malformed message: %s", exc)
            return "malformed"
        try:
            return announcer().deliver(eid)
        except TransientError as exc:  # the catalog is down: the outbox sends it again
            log.warning("study event=%s: %s; it stays in the outbox", eid, exc)
            return "catalog-down"
