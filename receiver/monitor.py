"""Back-pressure: whether the spool can take another instance, decided without slowing the
C-STORE path (depth and age are counted on a thread; free space is one statvfs call).

Counting lists the spool's ``entries/``, which takes longer the larger the backlog (with a
backlog of a million entries, workers stopped or storage down for hours, a count takes about a
second), and every receiver process counts. So the count waits at least ``took / COUNT_SHARE``
after a count that took ``took`` seconds: the monitor spends at most that share of its time
listing the directory, however large the backlog, and the receiver keeps pace when a backlog
grows. The age of the oldest entry is computed from its receive time when it is asked for, so it
does not go stale in between; the metrics' gauges (``report``) have it as of each count."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable

from ingest.spool import Spool

log = logging.getLogger("dicom_ingest.receiver")

#: the largest share of its time the monitor spends counting the spool
COUNT_SHARE = 0.05


def next_wait(interval: float, took: float) -> float:
    """Seconds to wait before the next count, after one that took ``took`` seconds."""
    return max(interval, took / COUNT_SHARE)


class SpoolMonitor:
    """Counts the spool every ``interval`` seconds and answers :meth:`refusal` from that."""

    def __init__(self, spool: Spool, min_free_bytes: int = 0, max_depth: int = 0,
                 max_age: float = 0.0, interval: float = 1.0,
                 report: Callable[[int, float], None] | None = None) -> None:
        self.spool = spool
        self.report = report  # called with depth and oldest age after each count
        self.min_free_bytes, self.max_depth, self.max_age = min_free_bytes, max_depth, max_age
        self.interval = interval
        self.depth = 0
        self.oldest_at: float | None = None  # receive time of the oldest entry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-monitor", daemon=True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def refresh(self) -> None:
        self.depth, self.oldest_at = self.spool.census()
        if self.report is not None:
            self.report(self.depth, self.oldest_age)

    @property
    def oldest_age(self) -> float:
        """Seconds since the oldest entry (as of the last count) was received; 0: none."""
        return 0.0 if self.oldest_at is None else max(0.0, time.time() - self.oldest_at)

    def stored(self) -> None:
        """One more entry: counted now, so a burst cannot overshoot the depth limit."""
        self.depth += 1

    def refusal(self) -> str | None:
        """Why a new C-STORE must be refused (``0xA700``), or None when it may proceed."""
        if self.min_free_bytes > 0:
            free = shutil.disk_usage(self.spool.entries).free
            if free < self.min_free_bytes:
                floor = self.min_free_bytes // 2**20
                return f"{free // 2**20} MB free on the spool, floor {floor} MB"
        if self.max_depth and self.depth >= self.max_depth:
            return f"spool depth {self.depth} at its limit {self.max_depth}"
        if self.max_age and (age := self.oldest_age) >= self.max_age:
            return f"oldest spool entry {age:.0f} s old, limit {self.max_age:.0f} s"
        return None

    def _run(self) -> None:
        wait, slow = self.interval, False
        while not self._stop.wait(wait):
            started = time.monotonic()
            try:
                self.refresh()
            except (OSError, ValueError) as exc:  # ValueError: an id naming no real time
                log.warning("cannot count the spool: %s", exc)
            took = time.monotonic() - started
            wait = next_wait(self.interval, took)
            if (wait > self.interval) != slow:
                slow = not slow
                if slow:
                    log.info("counting the spool (%d entries) took %.2f s: counting every "
                             "%.0f s while the backlog lasts", self.depth, took, wait)
                else:
                    log.info("counting the spool every %.0f s again", self.interval)
