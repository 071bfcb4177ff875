"""The Celery app factory: explicit settings in, an app with its one task out."""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import Any

from celery import Celery, bootsteps
from celery.worker import state
from kombu import Queue  # type: ignore[attr-defined]

from ingest.broker import archive_queue, make_celery
from ingest.catalog import catalog_url
from ingest.messages import QUEUE
from ingest.metrics import summed
from ingest.settings import Settings, usable_cores
from ingest.stopsignals import STOP_SIGNALS, ignore_stop_signals
from workers import tasks
from workers.archive import Archive, open_archive
from workers.events import Announcer
from workers.inventory import CatalogLink
from workers.pipeline import Pipeline

log = logging.getLogger("dicom_ingest.worker")

#: worker processes per usable core when INGEST_WORKER_CONCURRENCY is 0
PROCESSES_PER_CORE = 2


def default_concurrency() -> int:
    """Worker processes when none are asked for: two per core this process may run on.

    A task waits for about a third of its time (its fsyncs, Redis, the pool's messages to
    and from its process), and each process takes one task at a time (prefetch 1), so one
    process per core leaves the cores idle in those waits (``docs/performance.md``)."""
    return PROCESSES_PER_CORE * usable_cores()


def create_app(settings: Settings) -> Celery:
    app = make_celery(settings, "dicom-ingest-worker")
    app.conf.worker_consumer = "workers.consumer:Consumer"  # task events in batches
    app.conf.worker_concurrency = settings.worker_concurrency or default_concurrency()
    # this spool's queue, and the plain one that receivers of earlier versions send to
    own = archive_queue(settings)
    app.conf.task_queues = (Queue(own), Queue(QUEUE))  # type: ignore[no-untyped-call]
    app.conf.task_default_queue = own
    # one archive client and one catalog per worker process, for both tasks
    archive = tasks.per_process(lambda: open_archive(settings))
    catalog = tasks.per_process(lambda: CatalogLink(catalog_url(settings)))
    tasks.register(app, lambda: Pipeline.from_settings(settings, archive(), catalog()),
                   settings.task_max_retries)
    tasks.register_events(app, lambda: announcer(settings, archive()[0], catalog()))
    return app


def announcer(settings: Settings, archive: Archive, catalog: CatalogLink) -> Announcer:
    """The study events' deliverer ``settings`` describe, with the worker process's archive
    client and catalog."""
    # hook tasks go out through an app of their own: Celery adds a queue an app sends to
    # to that app's queues, and a worker that consumes all of its app's queues could then
    # take the hospital's tasks, which it does not know, from INGEST_ON_STUDY_QUEUE
    hooks = make_celery(settings, "dicom-ingest-hooks")

    def send_task(name: str, args: list[Any], queue: str) -> None:
        hooks.send_task(name, args=args, queue=queue, retry=True,
                        retry_policy={"max_retries": 2, "interval_start": 0.5})

    return Announcer(archive, catalog,
                     webhook=settings.on_study_webhook, secret=settings.webhook_secret,
                     task_name=settings.on_study_task, task_queue=settings.on_study_queue,
                     send_task=send_task)


class WarmStopSignals(bootsteps.StartStopStep):  # type: ignore[misc]
    """SIGTERM and SIGINT, however many arrive, are one warm shutdown (running tasks end
    first), asked for by a handler that only sets Celery's own flag, which its loop checks.

    Celery's handlers, installed just before this step starts, send its
    ``worker_shutting_down`` signal from inside the handler; a second SIGINT starts a cold
    shutdown there (cancelling the consumer over the broker connection, stopping the pool)
    and a later one raises wherever the main thread happens to be: not safe under a burst of
    signals to the process group (see :class:`ingest.stopsignals.StopSignals`). SIGQUIT
    remains Celery's cold shutdown."""

    signum: int | None = None

    def start(self, parent: Any) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # assignments only: Celery's loop raises WorkerShutdown when it sees the flag
        self.signum = signum
        state.should_stop = os.EX_OK

    def stop(self, parent: Any) -> None:
        if self.signum is not None:  # outside the handler, logging is safe
            log.info("worker: %s, warm shutdown", signal.Signals(self.signum).name)


def run(settings: Settings, extra_args: list[str] | None = None) -> int:
    """Run a worker in this process (prefork pool); SIGTERM or SIGINT, any number of them,
    is a warm shutdown (see :class:`WarmStopSignals`)."""
    Pipeline.from_settings(settings).spool.ensure()
    # before anything imports prometheus_client
    with summed(settings.worker_metrics_port):
        app = create_app(settings)
        app.steps["worker"].add(WarmStopSignals)
        argv = [
            "worker",
            "-n",
            f"dicom-ingest-{os.getpid()}@%h",
            f"--loglevel={settings.log_level}",
            "--without-mingle",
            "--without-gossip",
            "-E",
        ]
        try:
            app.worker_main(argv + list(extra_args or []))
        finally:
            ignore_stop_signals()  # stopped: a late signal must not end the exit with -SIGTERM
    return 0
