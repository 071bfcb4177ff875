"""Catalog rows for tests: one study's instances, as the pipeline records them."""

from __future__ import annotations

import dataclasses

from ingest.catalog import ARCHIVED, Row

STUDY = "1.2.826.0.1.3680043.10.99.1"
T0 = 1_750_000_000.0


def row(n: int, series: str = "1.2.3.1", **changes: object) -> Row:
    """The archived row of instance ``n`` of :data:`STUDY` (received at ``T0 + n``)."""
    made = Row(sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
               study_uid=STUDY, series_uid=series, key=f"{STUDY}/{series}/1.2.3.{n}.dcm",
               size=100 + n, sha256=f"{n:064x}", transfer_syntax="1.2.840.10008.1.2.1",
               calling_aet="CT1", receipt_id=f"20250101T000000-{n:016x}",
               received_at=T0 + n, archived_at=T0 + n, state=ARCHIVED)
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]
