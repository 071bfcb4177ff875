"""Study events with real parts: SQLite and a PostgreSQL server under concurrent stabilisers,
the real pipeline opening and re-opening studies, and the whole delivery through a real
Redis, the project's Celery worker, a real HTTP server that fails its first answers and a
real Celery worker of another application consuming the hook task."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from ingest.broker import make_celery, publish_event
from ingest.catalog import Catalog
from ingest.settings import Settings
from ingest.spool import Spool
from ingest.studies import Studies
from receiver.stabiliser import Stabiliser
from tests.support import make_instance, spool_entry, wait_for
from tests.support.catalog import T0, row
from tests.support.consumers import hook_consumer, webhook
from workers.pipeline import Outcome, Pipeline

pytestmark = pytest.mark.integration


def test_concurrent_stabilisers_make_one_event_per_study(url: str) -> None:
    setup = Catalog.open(url)
    uids = [f"1.2.826.0.1.3680043.10.98.{n}" for n in range(12)]
    for n, uid in enumerate(uids):
        setup.record_archived(dataclasses.replace(
            row(n), study_uid=uid, key=f"{uid}/1.2.3/1.2.3.{n}.dcm"), now=T0)
    catalogs = [Catalog.open(url) for _ in range(4)]
    start = threading.Barrier(len(catalogs))
    won: list[str] = []

    def stabiliser(catalog: Catalog) -> None:
        studies = Studies(catalog)
        start.wait()
        for uid in studies.quiet(T0 + 1):
            event = studies.stabilise(uid, T0 + 1, T0 + 100, "")
            if event is not None:
                won.append(event.event_id)

    threads = [threading.Thread(target=stabiliser, args=(c,)) for c in catalogs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(won) == sorted(f"{uid}:1" for uid in uids)
        assert Studies(setup).pending_count() == len(uids)
    finally:
        for c in [setup, *catalogs]:
            c.close()


def test_archiving_opens_a_study_and_an_identical_resend_does_not(
        settings: Settings, tmp_path: Path) -> None:
    pipeline = Pipeline.from_settings(settings)
    pipeline.spool.ensure()
    study = generate_uid()
    first = tmp_path / "a.dcm"
    make_instance(first, study=study)
    catalog = Catalog.open(settings.catalog_url)
    studies = Studies(catalog)
    try:
        receipt = spool_entry(pipeline.spool, first.read_bytes())
        assert pipeline.process(receipt.receipt_id) is Outcome.ARCHIVED
        [status] = studies.recent()
        assert (status.study_uid, status.state, status.instances) == (study, "open", 1)
        assert studies.stabilise(study, 1e12, 1e12, "") is not None
        again = spool_entry(pipeline.spool, first.read_bytes(), calling="OTHER")
        assert pipeline.process(again.receipt_id) is Outcome.ALREADY_ARCHIVED
        assert studies.recent()[0].state == "stable"  # not re-opened
        late = tmp_path / "b.dcm"
        make_instance(late, study=study)
        receipt = spool_entry(pipeline.spool, late.read_bytes())
        assert pipeline.process(receipt.receipt_id) is Outcome.ARCHIVED
        assert studies.recent()[0].state == "open"
    finally:
        catalog.close()
        pipeline.close()


@pytest.fixture
def catalog(settings: Settings) -> Iterator[Catalog]:
    opened = Catalog.open(settings.catalog_url)
    yield opened
    opened.close()


def test_delivery_through_real_redis_http_and_celery(
        settings: Settings, redis_url: str, start_worker: object, catalog: Catalog,
        tmp_path: Path) -> None:
    secret = "s3cret"
    with webhook(fail_first=2) as hook:
        settings = settings.replace(redis_url=redis_url, on_study_webhook=hook.url,
                                    webhook_secret=secret, study_stable_seconds=1,
                                    on_study_task="myapp.tasks.study_ready",
                                    on_study_queue="dicom-ingest-events-it")
        spool = Spool(settings.spool_dir)
        spool.ensure()
        queue = f"dicom-ingest.{spool.identity()}"
        with hook_consumer(redis_url, settings.on_study_queue, tmp_path) as hooks:
            start_worker(settings)  # type: ignore[operator]
            app = make_celery(settings, "test-stabiliser")
            studies = Studies(catalog)
            stabiliser = Stabiliser(spool, spool.identity(), lambda: studies,
                                    lambda eid: publish_event(app, queue, eid), 1, "")
            # an archived instance's row, as the pipeline writes it (the instance itself is
            # not needed to announce it)
            catalog.record_archived(row(1))
            catalog.record_archived(row(2, series="1.2.3.9"))

            def delivered() -> bool:
                stabiliser.once()
                return studies.pending_count() == 0 and bool(studies.events_of(row(1).study_uid))

            wait_for(delivered, 60, 0.2, "the event delivered")
            wait_for(hooks, 30, what="the hook task run")
    [event] = studies.events_of(row(1).study_uid)
    assert event.attempts == 2  # two 503s, then 200
    assert [p.status for p in hook.posts] == [503, 503, 200]
    assert {p.body for p in hook.posts} == {event.payload.encode()}
    assert all(p.signed_with(secret) for p in hook.posts)
    body = hook.posts[-1].json
    assert (body["event_id"], body["series"], body["instances"]) == (event.event_id, 2, 2)
    assert hooks() == [(event.manifest_key, body)]
    manifest = json.loads((Path(settings.archive_url) / event.manifest_key).read_text())
    assert manifest["event_id"] == event.event_id and manifest["counts"]["instances"] == 2


def test_a_catalog_of_revision_0001_is_upgraded_with_its_rows(url: str) -> None:
    """A catalog made before study events (0001) gains their tables when opened, its rows
    kept; its studies are not announced (nothing opened them)."""
    import sqlalchemy as sa
    from alembic import command

    from ingest.catalog import engine_url
    from ingest.migrations import config

    target = engine_url(url)
    if target.get_backend_name() == "sqlite" and target.database:
        Path(target.database).parent.mkdir(parents=True)
    engine = sa.create_engine(target)
    with engine.begin() as connection:
        command.upgrade(config(connection), "0001")
        connection.execute(sa.text(
            "INSERT INTO instances VALUES ('k', 's', 'c', 'st', 'se', 1, 'h', 't', 'AE', 'r', "
            "1.0, 2.0, 'archived', NULL)"))
    engine.dispose()
    catalog = Catalog.open(url)
    try:
        assert catalog.get("k") is not None
        studies = Studies(catalog)
        assert studies.recent() == [] and studies.pending_count() == 0
        catalog.record_archived(row(1))
        assert [s.study_uid for s in studies.recent()] == [row(1).study_uid]
    finally:
        catalog.close()
