"""Study events, the workers' side: write the stable study's manifest into the archive, then
deliver its event (a webhook POST, a Celery task sent by name), each once it succeeded.

Plain Python, like the pipeline: the task in :mod:`workers.tasks` only calls
:meth:`Announcer.deliver`. A failed attempt is written back to the outbox with its next time
(exponential backoff, no limit); the receiver's stabiliser sends the event again then. An event
is never dropped, and a step done (the webhook answered 2xx, the task queued) is not repeated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ingest import __version__
from ingest.catalog import CatalogError
from ingest.studies import Event, Studies
from workers.archive import Archive
from workers.errors import TransientError
from workers.inventory import CatalogLink

log = logging.getLogger("dicom_ingest.studies")

SIGNATURE_HEADER = "X-Dicom-Ingest-Signature"
EVENT_HEADER = "X-Dicom-Ingest-Event"
#: seconds the webhook has to answer
WEBHOOK_TIMEOUT = 10.0
_BACKOFF_MOST = 300.0


class DeliveryError(Exception):
    """A delivery step failed; the event is tried again later."""


def sign(body: bytes, secret: str) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff(attempts: int) -> float:
    """Seconds before attempt ``attempts + 1``: exponential from 1 s, capped, with jitter."""
    return min(2.0 ** attempts, _BACKOFF_MOST) * random.uniform(0.8, 1.2)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # a redirect would turn the POST into a GET without its body: take it as an answer
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post_json(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST ``body`` to ``url``; the HTTP status. OSError when there is no answer."""
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(request, timeout=WEBHOOK_TIMEOUT) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


@dataclass
class Announcer:
    archive: Archive
    catalog: CatalogLink
    webhook: str = ""
    secret: str = ""
    task_name: str = ""
    task_queue: str = ""
    #: sends a Celery task by name: (name, args, queue)
    send_task: Callable[[str, list[Any], str], None] | None = None
    post: Callable[[str, bytes, dict[str, str]], int] = post_json
    #: told of each step: (target, ok) with target "manifest", "webhook" or "task"
    observer: Callable[[str, bool], None] | None = None

    def studies(self) -> Studies:
        return Studies(self.catalog.catalog())

    def deliver(self, event_id: str, now: float | None = None) -> str:
        """One delivery attempt of ``event_id``: "delivered", "retry" (it failed and waits
        in the outbox) or "skipped" (delivered already, or another worker holds it)."""
        now = time.time() if now is None else now
        try:
            studies = self.studies()
            event = studies.claim(event_id, now)
        except CatalogError as exc:
            raise TransientError(str(exc)) from exc
        if event is None:
            return "skipped"
        target = "manifest"
        try:
            if event.manifest_written_at is None:
                self._write_manifest(studies, event)
                studies.mark(event_id, "manifest_written_at", time.time())
                self._observe(target, True)
            if self.webhook and event.webhook_delivered_at is None:
                target = "webhook"
                self._post(event)
                studies.mark(event_id, "webhook_delivered_at", time.time())
                self._observe(target, True)
            if self.task_name and event.task_delivered_at is None:
                target = "task"
                self._send(event)
                studies.mark(event_id, "task_delivered_at", time.time())
                self._observe(target, True)
            studies.delivered(event_id, time.time())
        except (DeliveryError, TransientError, CatalogError, OSError) as exc:
            self._observe(target, False)
            delay = backoff(event.attempts)
            log.warning("study event=%s: %s failed (attempt %d), again in %.0fs: %s",
                        event_id, target, event.attempts + 1, delay, exc)
            try:
                studies.failed(event_id, event.attempts + 1, time.time() + delay,
                               f"{target}: {exc}")
            except CatalogError as again:  # the claim runs out; the event is sent again then
                raise TransientError(str(again)) from again
            return "retry"
        log.info("study event=%s delivered (manifest %s%s%s)", event_id, event.manifest_key,
                 ", webhook" if self.webhook else "", ", task" if self.task_name else "")
        return "delivered"

    def _observe(self, target: str, ok: bool) -> None:
        if self.observer is not None:
            self.observer(target, ok)

    def _write_manifest(self, studies: Studies, event: Event) -> None:
        """``{Study}/study.json`` holds the newest revision's manifest: written, then checked
        that no newer revision appeared meanwhile (else written again), so that an older
        event's late attempt never leaves an older manifest behind."""
        while True:
            latest = studies.latest(event.study_uid) or event
            data = latest.manifest.encode()
            self.archive.put_bytes(latest.manifest_key, data, "application/json")
            if self.archive.read_bytes(latest.manifest_key) != data:
                raise TransientError(f"{latest.manifest_key}: the archive holds other bytes "
                                     "than the manifest written")
            newest = studies.latest(event.study_uid)
            if newest is None or newest.revision <= latest.revision:
                return

    def _post(self, event: Event) -> None:
        body = event.payload.encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"dicom-ingest/{__version__}",
                   EVENT_HEADER: event.event_id}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(body, self.secret)
        status = self.post(self.webhook, body, headers)
        if not 200 <= status < 300:
            raise DeliveryError(f"the webhook answered HTTP {status}")

    def _send(self, event: Event) -> None:
        if self.send_task is None:
            raise DeliveryError("no broker to send the task with")
        try:
            self.send_task(self.task_name, [event.manifest_key, json.loads(event.payload)],
                           self.task_queue)
        except Exception as exc:  # kombu's and redis's errors: the broker did not take it
            raise DeliveryError(f"sending {self.task_name}: {exc}") from exc
