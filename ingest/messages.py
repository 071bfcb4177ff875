"""Names shared by the publisher (receiver, sweeper) and the consumer (workers)."""

from __future__ import annotations

import re
from typing import TypeGuard

#: The Celery task that archives one spool entry; its only argument is the receipt id.
ARCHIVE_TASK = "dicom_ingest.archive"
#: The Celery task that writes a stable study's manifest and delivers its event; its only
#: argument is the event id, ``{StudyInstanceUID}:{revision}``. It goes to the archive queue
#: of the spool whose receiver stabilised the study.
STUDY_EVENT_TASK = "dicom_ingest.study_event"
#: The archive queues' common name: each spool has its own queue, ``{QUEUE}.{spool id}`` (a
#: Redis list of that name), so that its tasks reach only workers that see that spool. Workers
#: also take tasks from a queue of this plain name, where receivers before per-spool queues
#: put them.
QUEUE = "dicom-ingest"


def queue_for(spool_id: str) -> str:
    """The archive queue of the spool with this id."""
    return f"{QUEUE}.{spool_id}"

_RECEIPT_ID = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{16}$")


class MessageError(ValueError):
    """A queue message that is not a valid receipt id."""


def is_receipt_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a well-formed receipt id."""
    return isinstance(value, str) and _RECEIPT_ID.match(value) is not None


_EVENT_ID = re.compile(r"^[0-9.]{1,64}:[1-9][0-9]{0,8}$")


def check_event_id(value: object) -> str:
    """Return ``value`` if it is a well-formed study event id; raise MessageError otherwise."""
    if not isinstance(value, str) or _EVENT_ID.match(value) is None:
        raise MessageError(f"not a study event id: {value!r:.80}")
    return value


def check_receipt_id(value: object) -> str:
    """Return ``value`` if it is a well-formed receipt id; raise MessageError otherwise."""
    if not is_receipt_id(value):
        raise MessageError(f"not a receipt id: {value!r:.80}")
    return value
