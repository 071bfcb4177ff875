"""Association events: a log line each, counted by result and, when rejected, by reason."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ingest.settings import Settings
from receiver.metrics import ReceiverMetrics

log = logging.getLogger("dicom_ingest.receiver")


@dataclass
class AssociationContext:
    settings: Settings
    metrics: ReceiverMetrics


def _peer(event: Any) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), f"{requestor.address}:{requestor.port}"


def rejection_reason(event: Any, settings: Settings) -> str:
    """Why pynetdicom rejected an association (it does not say): the same checks, replayed."""
    calling, _ = _peer(event)
    ae = event.assoc.ae
    if len([a for a in ae.active_associations if a.is_acceptor]) > ae.maximum_associations:
        return "too-many-associations"  # pynetdicom checks this last, so it wins
    if settings.allowed_calling_aets and calling not in settings.allowed_calling_aets:
        return "calling-aet-not-allowed"
    if settings.require_called_aet:
        return "called-aet-mismatch"
    return "other"


def on_accepted(event: Any, ctx: AssociationContext) -> None:
    calling, peer = _peer(event)
    ctx.metrics.associations.labels("accepted", "").inc()
    log.info("association accepted calling=%s peer=%s", calling, peer)


def on_rejected(event: Any, ctx: AssociationContext) -> None:
    calling, peer = _peer(event)
    reason = rejection_reason(event, ctx.settings)
    ctx.metrics.associations.labels("rejected", reason).inc()
    log.warning("association rejected calling=%s peer=%s reason=%s", calling, peer, reason)


def on_ended(event: Any) -> None:
    calling, peer = _peer(event)
    how = "released" if event.event.name == "EVT_RELEASED" else "aborted"
    log.info("association %s calling=%s peer=%s", how, calling, peer)
