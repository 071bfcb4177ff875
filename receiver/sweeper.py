"""Reconciliation: re-enqueue spool entries that no task finished, remove stale leftovers."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ingest.spool import Spool, in_use

log = logging.getLogger("dicom_ingest.sweeper")


@dataclass
class SweepResult:
    requeued: int = 0
    pending: int = 0  # complete entries younger than the sweep age
    removed_orphans: int = 0  # files under entries/ without their entry's .dcm (leftovers)
    removed_temp: int = 0
    enqueue_failed: bool = False
    strays: int = 0  # *.dcm under entries/ not named by a receipt id (left alone)


def sweep_once(spool: Spool, enqueue: Callable[[str], None], age: float,
               now: float | None = None,
               queue_length: Callable[[], int | None] | None = None) -> SweepResult:
    """One pass. An entry is re-enqueued when its file is older than ``age`` seconds; its
    mtime is then set to now, so it is re-enqueued at most once per ``age``.

    With ``queue_length``, a pass that finds at least as many messages waiting in the queue as
    it has old entries re-enqueues nothing: they are most likely still queued behind a
    backlog, and copying them again would only grow the queue. When Redis lost its queue the
    length is 0 and everything old is re-enqueued."""
    now = time.time() if now is None else now
    result = SweepResult()
    names = set(os.listdir(spool.entries))
    old: list[str] = []
    for name in sorted(names):
        path = spool.entries / name
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue  # a worker finished it meanwhile
        if (receipt_id := spool.entry_id(name)) is not None:
            if now - mtime < age:
                result.pending += 1
            else:
                old.append(receipt_id)
        elif spool.is_dcm_name(name):
            result.strays += 1  # not ours to archive or to delete
            if result.strays == 1:
                log.warning("sweep: entries/%s is not a spool entry (its name is not a receipt "
                            "id); left alone. Send files to the receiver instead (storescu), "
                            "or move them out of the spool", name[:120])
        elif (
            # an entry's .dcm is renamed in last and removed first: a receipt or attempts
            # file without it, and old, is an interrupted write (never acked) or removal
            now - mtime >= age
            and not (spool.entries / (name.split(".", 1)[0] + ".dcm")).exists()
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            result.removed_orphans += 1
    waiting = queue_length() if (queue_length is not None and old) else None
    if old:
        log.debug("sweep: %d old entries, queue length %s", len(old), waiting)
    if waiting is not None and waiting >= len(old):
        result.pending += len(old)
        log.debug("sweep: %d old entries, %d messages queued: nothing re-enqueued",
                  len(old), waiting)
        old = []
    for receipt_id in old:
        try:
            enqueue(receipt_id)
        except Exception as exc:
            log.warning("sweep: enqueue failed (%s); will try again next pass", exc)
            result.enqueue_failed = True
            break
        with contextlib.suppress(FileNotFoundError):
            os.utime(spool.dcm_path(receipt_id), (now, now))
        result.requeued += 1
    for name in os.listdir(spool.tmp):
        path = spool.tmp / name
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime >= age and not in_use(path):
                path.unlink()
                result.removed_temp += 1
    if result.requeued or result.removed_orphans or result.removed_temp:
        log.info("sweep: requeued=%d pending=%d orphans_removed=%d temp_removed=%d",
                 result.requeued, result.pending, result.removed_orphans, result.removed_temp)
    return result


class PeriodicSweeper:
    """Runs :func:`sweep_once` every ``interval`` seconds on a daemon thread."""

    def __init__(self, spool: Spool, enqueue: Callable[[str], None], interval: float,
                 age: float, queue_length: Callable[[], int | None] | None = None) -> None:
        self._spool, self._enqueue, self._queue_length = spool, enqueue, queue_length
        self._interval, self._age = interval, age
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # only the first receiver process runs one
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                sweep_once(self._spool, self._enqueue, self._age,
                           queue_length=self._queue_length)
            except Exception:
                log.exception("sweep pass failed")
