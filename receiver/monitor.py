"""Back-pressure: whether the spool can take another instance, decided without slowing the
C-STORE path (depth and age are counted on a thread; free space is one statvfs call)."""

from __future__ import annotations

import logging
import shutil
import threading
import time

from ingest.spool import Spool

log = logging.getLogger("dicom_ingest.receiver")


class SpoolMonitor:
    """Counts the spool every ``interval`` seconds and answers :meth:`refusal` from that."""

    def __init__(self, spool: Spool, min_free_bytes: int = 0, max_depth: int = 0,
                 max_age: float = 0.0, interval: float = 1.0) -> None:
        self.spool = spool
        self.min_free_bytes, self.max_depth, self.max_age = min_free_bytes, max_depth, max_age
        self.interval = interval
        self.depth, self.oldest_age = 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-monitor", daemon=True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def refresh(self) -> None:
        self.depth, self.oldest_age = self.spool.stats()

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
        if self.max_age and self.oldest_age >= self.max_age:
            return f"oldest spool entry {self.oldest_age:.0f} s old, limit {self.max_age:.0f} s"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                started = time.monotonic()
                self.refresh()
                if time.monotonic() - started > self.interval:
                    log.debug("counting the spool took longer than %.1f s", self.interval)
            except OSError as exc:
                log.warning("cannot count the spool: %s", exc)
