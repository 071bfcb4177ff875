"""Names shared by the publisher (receiver, sweeper) and the consumer (workers)."""

from __future__ import annotations

import re
from typing import TypeGuard

#: The Celery task that archives one spool entry; its only argument is the receipt id.
ARCHIVE_TASK = "dicom_ingest.archive"
#: The queue (a Redis list of the same name) that carries archive tasks.
QUEUE = "dicom-ingest"

_RECEIPT_ID = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{16}$")


class MessageError(ValueError):
    """A queue message that is not a valid receipt id."""


def is_receipt_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a well-formed receipt id."""
    return isinstance(value, str) and _RECEIPT_ID.match(value) is not None


def check_receipt_id(value: object) -> str:
    """Return ``value`` if it is a well-formed receipt id; raise MessageError otherwise."""
    if not is_receipt_id(value):
        raise MessageError(f"not a receipt id: {value!r:.80}")
    return value
