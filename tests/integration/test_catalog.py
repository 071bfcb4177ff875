"""The catalog with real databases (SQLite and a PostgreSQL server the tests start), written
by the real pipeline into a directory or a real S3 server, rebuilt from the archive alone,
through an outage, and through the command line."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from ingest.catalog import ARCHIVED, QUARANTINED, Catalog, CatalogError, LazyCatalog, Row
from ingest.settings import Settings, environment
from tests.support import cli, make_instance, raw_part10, run, spool_entry
from tests.support.postgres import PostgresServer
from workers.errors import TransientError
from workers.inventory import rebuild
from workers.pipeline import Outcome, Pipeline

pytestmark = pytest.mark.integration

STUDY, SERIES = "1.2.826.0.1.3680043.10.77.1", "1.2.826.0.1.3680043.10.77.2"


@pytest.fixture
def pipeline_for() -> Iterator[Callable[[Settings], Pipeline]]:
    """Pipelines from settings, their catalog connections closed at the end."""
    made: list[Pipeline] = []

    def make(settings: Settings) -> Pipeline:
        made.append(Pipeline.from_settings(settings))
        made[-1].spool.ensure()
        return made[-1]

    yield make
    for pipeline in made:
        pipeline.close()


def a_row(n: int, **changes: Any) -> Row:
    row = Row(sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
              study_uid=STUDY, series_uid=SERIES, key=f"{STUDY}/{SERIES}/1.2.3.{n}.dcm",
              size=1000 + n, sha256=f"{n:064x}", transfer_syntax="1.2.840.10008.1.2.1",
              calling_aet="MODALITY", receipt_id=f"20250101T00000{n}-{n:016x}",
              received_at=1_700_000_000.0 + n, archived_at=1_700_000_001.0 + n, state=ARCHIVED)
    return dataclasses.replace(row, **changes)


def test_open_creates_the_schema_and_finds_it_current(url: str) -> None:
    catalog = Catalog.open(url)
    try:
        inspector = sa.inspect(catalog.engine)
        assert {"instances", "studies", "events", "spools", "alembic_version"} <= set(
            inspector.get_table_names())
        with catalog.engine.connect() as connection:
            version = connection.execute(sa.text("SELECT version_num FROM alembic_version"))
            assert version.scalar_one() == "0002"
        catalog.record(a_row(1))
    finally:
        catalog.close()
    again = Catalog.open(url)  # an existing schema at head: nothing to do, rows kept
    try:
        assert again.get(a_row(1).key) == a_row(1)
    finally:
        again.close()


def test_record_upserts_and_reads_back(url: str) -> None:
    catalog = Catalog.open(url)
    try:
        catalog.record(a_row(1))
        catalog.record(a_row(2, calling_aet="PACS", series_uid="1.2.9"))
        catalog.record(a_row(1, size=5))  # the same key again: replaced, not added
        quarantined = a_row(3, key="quarantine/20250101T000003-0000000000000003.dcm",
                            study_uid="", series_uid="", archived_at=None, state=QUARANTINED,
                            reason="invalid-uid")
        versioned = a_row(1, key=f"{STUDY}/{SERIES}/1.2.3.1.20250101T000009-0000000000000009.dcm")
        catalog.record_many([quarantined, versioned])
        assert len(catalog.keys()) == 4
        assert catalog.get(a_row(1).key) == a_row(1, size=5)
        found = catalog.by_sop(["1.2.3.1", "1.2.3.3", "9.9.9"])
        assert set(found) == {"1.2.3.1", "1.2.3.3"}
        assert sorted(r.key for r in found["1.2.3.1"]) == sorted([a_row(1).key, versioned.key])
        assert found["1.2.3.3"] == [quarantined]
        assert catalog.by_sop([]) == {}
        assert [r.key for r in catalog.find(study=STUDY, series=SERIES)] == sorted(
            [a_row(1).key, versioned.key])  # the same receive time: by key
        assert [r.sop_instance_uid for r in catalog.find(calling_aet="PACS")] == ["1.2.3.2"]
        assert [r.sop_instance_uid for r in catalog.find(sop="1.2.3.3")] == ["1.2.3.3"]
        assert [r.sop_instance_uid for r in catalog.find(since=1_700_000_002.0)] == [
            "1.2.3.2", "1.2.3.3"]
        assert len(catalog.find(limit=2)) == 2
        assert catalog.find(study="0.0") == []
        assert catalog.remove([versioned.key, "no/such/key.dcm"]) == 1
    finally:
        catalog.close()


def _fill(pipeline: Pipeline, tmp_path: Path) -> dict[str, Outcome]:
    """Three instances of one study, the first sent twice, and an undecodable object."""
    outcomes = {}
    for n in range(3):
        make_instance(tmp_path / f"{n}.dcm", study=STUDY, series=SERIES)
        receipt = spool_entry(pipeline.spool, (tmp_path / f"{n}.dcm").read_bytes(),
                              calling=f"AE{n}")
        outcomes[receipt.receipt_id] = pipeline.process(receipt.receipt_id)
    again = spool_entry(pipeline.spool, (tmp_path / "0.dcm").read_bytes(), calling="PACS")
    outcomes[again.receipt_id] = pipeline.process(again.receipt_id)
    bad = spool_entry(pipeline.spool, raw_part10("1.2.840.10008.5.1.4.1.1.2", generate_uid(),
                                                 b"\x08\x00\x16\x00UI\xff\xff" + b"\xde" * 99))
    outcomes[bad.receipt_id] = pipeline.process(bad.receipt_id)
    return outcomes


@pytest.mark.parametrize("backend", ["directory", "s3"])
def test_the_pipeline_writes_rows_that_a_rebuild_reproduces(
        tmp_path: Path, settings: Settings, url: str, backend: str,
        request: pytest.FixtureRequest, pipeline_for: Callable[[Settings], Pipeline]) -> None:
    if backend == "s3":
        bucket = request.getfixturevalue("bucket")
        settings = settings.replace(archive_url=f"s3://{bucket}/site-a",
                                    s3_endpoint=request.getfixturevalue("s3_endpoint"))
    pipeline = pipeline_for(settings.replace(catalog_url=url))
    outcomes = _fill(pipeline, tmp_path)
    assert sorted(o.value for o in outcomes.values()) == [
        "already-archived", "archived", "archived", "archived", "quarantined"]
    catalog = Catalog.open(url)
    try:
        written = catalog.find()
        assert [r.state for r in written].count(ARCHIVED) == 3
        (quarantined,) = [r for r in written if r.state == QUARANTINED]
        assert quarantined.reason == "truncated" and quarantined.archived_at is None
        for row in written:
            assert row.receipt_id in outcomes and row.size > 0 and len(row.sha256) == 64
            if row.state == ARCHIVED:
                prefix = "site-a/" if backend == "s3" else ""
                assert row.key == f"{prefix}{STUDY}/{SERIES}/{row.sop_instance_uid}.dcm"
                assert row.calling_aet in ("AE0", "AE1", "AE2")  # the first copy's sender
                assert row.transfer_syntax == "1.2.840.10008.1.2.1" and row.archived_at
        # a catalog that is behind (a row lost), and one that lists what is gone
        catalog.remove([written[0].key])
        catalog.record(a_row(7))
        done = rebuild(pipeline.archive, pipeline.prefix, catalog)
        assert (done.recorded, done.removed, done.skipped) == (4, 1, 0)
        assert catalog.find() == written
    finally:
        catalog.close()
    # a catalog that was lost: rebuilt from nothing, the same rows
    fresh = Catalog.open(f"sqlite:///{tmp_path / 'fresh.sqlite'}")
    try:
        rebuild(pipeline.archive, pipeline.prefix, fresh)
        assert fresh.find() == written
    finally:
        fresh.close()


def test_postgresql_outage_is_transient_and_keeps_the_spool(
        tmp_path: Path, settings: Settings, postgres: str, postgres_server: PostgresServer,
        pipeline_for: Callable[[Settings], Pipeline]) -> None:
    """The catalog's server stops after the object was archived: the task fails
    transiently, the spool keeps the entry; once the server is back the retry finds the
    object archived and writes its row."""
    pipeline = pipeline_for(settings.replace(catalog_url=postgres))
    make_instance(tmp_path / "a.dcm")
    receipt = spool_entry(pipeline.spool, (tmp_path / "a.dcm").read_bytes())
    catalog = Catalog.open(postgres)
    postgres_server.stop()
    try:
        with pytest.raises(TransientError, match=r"catalog postgresql://\*\*\*@127.0.0.1"):
            pipeline.process(receipt.receipt_id)
        with pytest.raises(CatalogError):
            catalog.find()
        with pytest.raises(CatalogError):
            Catalog.open(postgres)
        assert pipeline.spool.read_receipt(receipt.receipt_id) == receipt
        assert len(list(Path(settings.archive_url).rglob("*.dcm"))) == 1  # archived already
    finally:
        postgres_server.start()
    assert pipeline.process(receipt.receipt_id) is Outcome.ALREADY_ARCHIVED
    assert pipeline.spool.read_receipt(receipt.receipt_id) is None
    (row,) = catalog.find()
    assert row.receipt_id == receipt.receipt_id and row.state == ARCHIVED
    catalog.close()


def test_a_lazy_catalog_opens_once_the_database_answers(
        postgres: str, postgres_server: PostgresServer) -> None:
    """What the receiver's committer and stabiliser and each worker hold: made while the
    database is down, it fails at each use until the server is back, then opens once."""
    postgres_server.stop()
    try:
        lazy = LazyCatalog(postgres)  # nothing is opened yet: no error
        with pytest.raises(CatalogError):
            lazy()
        with pytest.raises(CatalogError):
            lazy()
    finally:
        postgres_server.start()
    catalog = lazy()
    try:
        assert lazy() is catalog
        catalog.record(a_row(1))
        assert [row.key for row in lazy().find()] == [a_row(1).key]
    finally:
        lazy.close()
    assert lazy() is not catalog  # closed: the next use opens it again
    lazy.close()


def test_find_and_rebuild_on_the_command_line(
        tmp_path: Path, settings: Settings, url: str,
        pipeline_for: Callable[[Settings], Pipeline]) -> None:
    settings = settings.replace(catalog_url=url)
    pipeline = pipeline_for(settings)
    _fill(pipeline, tmp_path)
    env = dict(os.environ) | environment(settings) | {"PYTHONWARNINGS": "ignore"}

    def find(*args: str) -> list[dict[str, Any]]:
        out = run(cli("find", "--json", *args), env=env).stdout
        return [json.loads(line) for line in out.splitlines()]

    before = find()
    assert len(before) == 4
    (ae1,) = find("--study", STUDY, "--series", SERIES, "--calling-aet", "AE1", "--since", "1h")
    assert ae1["calling_aet"] == "AE1" and ae1["state"] == "archived"
    assert find("--sop", ae1["sop_instance_uid"]) == [ae1]
    assert len(find("--limit", "2", "--since", "2000-01-01T00:00Z")) == 2
    table = run(cli("find"), env=env).stdout
    assert "quarantine/" in table and "(truncated)" in table and "4 found" in table
    assert ae1["key"] in table

    # the catalog lost: a rebuild makes it again, with a progress bar on stderr
    lost = tmp_path / "lost.sqlite"
    env["INGEST_CATALOG_URL"] = f"sqlite:///{lost}"
    rebuilt = run(cli("catalog", "rebuild"), env=env)
    assert "4 rows written, 0 removed" in rebuilt.stdout
    assert "catalog rebuild" in rebuilt.stderr and "key" in rebuilt.stderr
    assert find() == before


def test_catalog_unreachable_on_the_command_line(tmp_path: Path, settings: Settings) -> None:
    from tests.support import free_port

    env = dict(os.environ) | environment(settings) | {
        "PYTHONWARNINGS": "ignore",
        "INGEST_CATALOG_URL": f"postgresql://ingest:secret@127.0.0.1:{free_port()}/catalog"}
    for args in (("find",), ("catalog", "rebuild")):
        result = run(cli(*args), env=env, check=False)
        assert result.returncode == 1, result
        assert "***@127.0.0.1" in result.stderr and "secret" not in result.stderr
