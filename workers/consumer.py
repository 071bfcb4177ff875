"""The worker's consumer: Celery's own, sending task events in batches.

Celery buffers task events and flushes them at the next turn of its event loop, so with one
task at a time per process nearly every event (received, started, succeeded: three a task)
goes out in a Redis PUBLISH of its own, a noticeable share of the worker's main process's
CPU per task. This consumer flushes at most every :data:`EVENTS_INTERVAL` seconds, one
PUBLISH for all the events of that time (Celery's ``task.multi``, which Flower reads like
single events). Celery flushes on its own when the buffer holds 24 events; this consumer
flushes once more as the worker stops, before Celery closes the dispatcher (which would drop
what is buffered).
"""

from __future__ import annotations

import time
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

#: the longest a task event waits in the buffer, in seconds (a dashboard does not notice)
EVENTS_INTERVAL = 0.25


class Consumer(CeleryConsumer):  # type: ignore[misc]
    _events_due_at = 0.0  # when the scheduled flush should run (monotonic); 0: none

    def on_send_event_buffered(self) -> None:
        if self.hub is None:
            return
        now = time.monotonic()
        if self._events_due_at and now < self._events_due_at + EVENTS_INTERVAL:
            return  # a flush is on its way
        # none, or one long overdue (its timer went with a reconnection): schedule one
        self._events_due_at = now + EVENTS_INTERVAL
        self.hub.call_later(EVENTS_INTERVAL, self._flush_batched_events)

    def _flush_batched_events(self, *args: Any) -> None:
        self._events_due_at = 0.0
        self._flush_events()

    def stop(self) -> None:
        self._flush_events()  # the last batch
        super().stop()

    def shutdown(self) -> None:
        self._flush_events()
        super().shutdown()
