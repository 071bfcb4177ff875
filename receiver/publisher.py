"""Enqueue archive tasks by name, off the C-STORE path, on a thread of their own.

The handler hands over a receipt id and returns at once; if Redis is down the publish fails,
the entry stays in the spool and the sweeper enqueues it later. Nothing here can lose data.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from celery import Celery

from ingest.messages import ARCHIVE_TASK, QUEUE

log = logging.getLogger("dicom_ingest.receiver")

_STOP = ""
_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def publish(app: Celery, receipt_id: str) -> None:
    """Send one archive task; raises when the broker cannot take it."""
    app.send_task(
        ARCHIVE_TASK, args=[receipt_id], queue=QUEUE, retry=True, retry_policy=_RETRY_POLICY
    )


class Publisher:
    """A bounded hand-off queue drained by one thread that publishes to the broker."""

    def __init__(self, app: Celery, capacity: int = 10_000,
                 on_failure: Callable[[], None] | None = None) -> None:
        self._app = app
        self._on_failure = on_failure
        self._queue: queue.Queue[str] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, receipt_id: str) -> None:
        try:
            self._queue.put_nowait(receipt_id)
        except queue.Full:
            log.warning("publish queue full; receipt %s left to the sweeper", receipt_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Publish what is queued (up to ``timeout``), then stop the thread."""
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            receipt_id = self._queue.get()
            if receipt_id == _STOP:
                return
            try:
                publish(self._app, receipt_id)
            except Exception as exc:  # broker down: the sweeper re-enqueues from the spool
                self.failures += 1
                if self._on_failure is not None:
                    self._on_failure()
                log.warning(
                    "enqueue failed for receipt %s (%s); the sweeper will retry it", receipt_id, exc
                )
