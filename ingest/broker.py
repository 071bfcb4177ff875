"""The Celery configuration both sides share: broker, queue, timeouts. Tasks are sent by name."""

from __future__ import annotations

from typing import Any

from celery import Celery

from ingest.messages import ARCHIVE_TASK, QUEUE, STUDY_EVENT_TASK, queue_for
from ingest.settings import Settings
from ingest.spool import Spool

_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings for a Celery app on the configured Redis broker (no result backend)."""
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "broker_transport_options": {
            # a task not acked within this many seconds is delivered again: it must be
            # longer than the slowest archive (a 1 GB instance to a slow S3)
            "visibility_timeout": settings.visibility_timeout,
            # look for expired unacked messages at a pace that fits the timeout
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
            "unacked_restore_throttle": 1 if settings.visibility_timeout < 100 else 10,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "retry_on_timeout": True,
            "health_check_interval": 25,
        },
        "task_default_queue": QUEUE,  # every send names its spool's queue
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }


def archive_queue(settings: Settings) -> str:
    """The archive queue of the configured spool (``INGEST_SPOOL_ID``, else the spool's own
    id); the spool directory is made if it is not there."""
    if settings.spool_id:
        return queue_for(settings.spool_id)
    spool = Spool(settings.spool_dir)
    spool.ensure()
    return queue_for(spool.identity())


def queue_length(redis_url: str, queue: str) -> int | None:
    """Messages waiting in ``queue``, or None when Redis cannot be reached."""
    import redis

    try:
        with redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) as r:
            return int(r.llen(queue))
    except redis.RedisError:
        return None


def make_celery(settings: Settings, main: str) -> Celery:
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def publish(app: Celery, queue: str, receipt_id: str) -> None:
    """Send one archive task to ``queue`` with Celery, by name (the receiver's sweeper, the
    operator's sweep and replay); raises when the broker cannot take it."""
    app.send_task(ARCHIVE_TASK, args=[receipt_id], queue=queue, retry=True,
                  retry_policy=_RETRY_POLICY)


def publish_event(app: Celery, queue: str, event_id: str) -> None:
    """Send one study event task to ``queue`` by name (the receiver's stabiliser); raises when
    the broker cannot take it (the outbox keeps the event and it is sent again)."""
    app.send_task(STUDY_EVENT_TASK, args=[event_id], queue=queue, retry=True,
                  retry_policy=_RETRY_POLICY)
