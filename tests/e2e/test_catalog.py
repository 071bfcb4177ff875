"""The workers, as processes, catalogue what they archive: a row per instance with its key,
size, sha256 and sender, once the spool entry is gone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ingest.catalog import ARCHIVED, Catalog
from receiver import statuses
from tests.processes import start_pipeline
from tests.support import make_instance, objects_under, pynetdicom_send, wait_for

pytestmark = pytest.mark.e2e


def test_workers_catalogue_what_they_archive(tmp_path: Path, redis_url: str) -> None:
    with start_pipeline(tmp_path, redis_url) as pipeline:
        sops = {}
        for n in range(4):
            sops[make_instance(tmp_path / f"{n}.dcm", pixel_bytes=32 * 1024)] = n
        sent = pynetdicom_send(pipeline.port, [tmp_path / f"{n}.dcm" for n in range(4)],
                               calling="MODALITY7")
        assert sent == [statuses.SUCCESS] * 4
        entries = pipeline.settings.spool_dir / "entries"
        wait_for(lambda: len(objects_under(pipeline.archive)) == 4
                 and not list(entries.iterdir()), 60, 0.1, "four archived, the spool empty")
        catalog = Catalog.open(pipeline.settings.catalog_url)
        try:
            rows = catalog.by_sop(sops)
        finally:
            catalog.close()
    assert set(rows) == set(sops)
    archived = objects_under(pipeline.archive)
    for sop, found in rows.items():
        (row,) = found
        assert row.state == ARCHIVED and row.calling_aet == "MODALITY7"
        assert row.key.endswith(f"/{sop}.dcm") and row.key in archived
        data = archived[row.key].read_bytes()
        assert (row.size, row.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert row.archived_at is not None and row.archived_at >= int(row.received_at)
