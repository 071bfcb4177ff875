"""Study events end to end: the real receiver and worker processes, DCMTK sending, a real HTTP
server taking the webhook's POSTs and a worker of another Celery application taking the hook
task. Every stable study is announced, no id twice with different content, none before all
of its acknowledged instances are archived; a late instance makes revision 2, an identical
resend nothing."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from ingest.catalog import Catalog
from ingest.studies import Studies
from tests.processes import Pipeline, start_pipeline
from tests.support import (
    dcmtk,
    dcmtk_env,
    make_instance,
    objects_under,
    pynetdicom_send,
    run,
    wait_for,
)
from tests.support.consumers import WebhookServer, hook_consumer, webhook

pytestmark = pytest.mark.e2e

SECRET = "e2e-secret"
STABLE = 2.0
HOOK_QUEUE = "dicom-ingest-events-e2e"


def a_series(folder: Path, study: str, count: int) -> list[Path]:
    series = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for n in range(count):
        make_instance(folder / f"{n}.dcm", study=study, series=series)
        files.append(folder / f"{n}.dcm")
    return files


def storescu(port: int, files: list[Path]) -> None:
    run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "DICOM-INGEST", "127.0.0.1",
         str(port), *map(str, files)], env=dcmtk_env())


def sop_keys(study: str, archive: Path) -> set[str]:
    return {k for k in objects_under(archive) if k.startswith(f"{study}/") and k.endswith(".dcm")}


@pytest.fixture
def consumers(tmp_path: Path, redis_url: str) -> Iterator[tuple[WebhookServer, Any]]:
    with webhook(fail_first=1) as hook, hook_consumer(redis_url, HOOK_QUEUE, tmp_path) as calls:
        yield hook, calls


@pytest.fixture
def announced(tmp_path: Path, redis_url: str,
              consumers: tuple[WebhookServer, Any]) -> Iterator[Pipeline]:
    hook, _ = consumers
    with start_pipeline(tmp_path, redis_url, study_stable_seconds=STABLE,
                        on_study_webhook=hook.url, webhook_secret=SECRET,
                        on_study_task="myapp.tasks.study_ready",
                        on_study_queue=HOOK_QUEUE) as running:
        yield running


def delivered_ids(hook: WebhookServer) -> list[str]:
    return [p.json["event_id"] for p in hook.delivered()]


def check_announcements(hook: WebhookServer, calls: Any) -> None:
    """At least once, never twice under one id with different content; every POST signed;
    the hook task got the same body."""
    bodies: dict[str, set[bytes]] = {}
    for post in hook.posts:
        assert post.signed_with(SECRET), post.headers
        assert post.headers["content-type"] == "application/json"
        bodies.setdefault(post.json["event_id"], set()).add(post.body)
    assert all(len(b) == 1 for b in bodies.values()), bodies
    hooked = {event["event_id"]: event for _, event in calls()}
    assert set(hooked) == set(bodies)
    for event_id, body in bodies.items():
        assert hooked[event_id] == json.loads(next(iter(body)))


def test_a_study_sent_with_dcmtk_is_announced_once_and_a_late_instance_makes_revision_2(
        announced: Pipeline, consumers: tuple[WebhookServer, Any], tmp_path: Path) -> None:
    hook, calls = consumers
    study = generate_uid()
    first = a_series(tmp_path / "s1", study, 4)
    second = a_series(tmp_path / "s2", study, 3)
    storescu(announced.port, first)
    time.sleep(STABLE / 2)  # a pause between the series, shorter than the stable time
    storescu(announced.port, second)
    wait_for(lambda: delivered_ids(hook), 60, 0.1, "the study's event")
    [post] = hook.delivered()
    body = post.json
    assert (body["event_id"], body["revision"]) == (f"{study}:1", 1)
    assert (body["series"], body["instances"], body["calling_aets"]) == (2, 7, ["MODALITY"])
    assert [p.status for p in hook.posts] == [503, 200]  # the first answer failed: retried
    manifest_path = announced.archive / study / "study.json"
    manifest = json.loads(manifest_path.read_text())
    listed = {i["key"] for s in manifest["series"] for i in s["instances"]}
    assert listed == sop_keys(study, announced.archive) and len(listed) == 7
    assert body["manifest_key"] == f"{study}/study.json"
    wait_for(calls, 30, what="the hook task")

    late = a_series(tmp_path / "late", study, 1)
    storescu(announced.port, late)
    wait_for(lambda: len(hook.delivered()) == 2, 60, 0.1, "revision 2")
    again = hook.delivered()[1].json
    assert (again["event_id"], again["revision"], again["instances"], again["series"]) == (
        f"{study}:2", 2, 8, 3)
    assert json.loads(manifest_path.read_text())["revision"] == 2
    wait_for(lambda: len(calls()) == 2, 30, what="the second hook task")
    check_announcements(hook, calls)


def test_workers_killed_between_archive_and_event_and_an_identical_resend(
        announced: Pipeline, consumers: tuple[WebhookServer, Any], tmp_path: Path) -> None:
    hook, calls = consumers
    study = generate_uid()
    first = a_series(tmp_path / "s1", study, 3)
    assert pynetdicom_send(announced.port, first) == [0] * 3
    wait_for(lambda: len(sop_keys(study, announced.archive)) == 3, 60, what="series 1 archived")
    # the workers die; the second series is acknowledged into the spool and stays there
    # for longer than the stable time: the study must not be announced meanwhile
    announced.stop("worker", signal.SIGKILL)
    second = a_series(tmp_path / "s2", study, 2)
    assert pynetdicom_send(announced.port, second) == [0] * 2
    acked = time.time()
    catalog = Catalog.open(announced.settings.catalog_url)
    try:
        studies = Studies(catalog)

        def passes_after(moment: float) -> bool:  # the stabiliser has looked since then
            with catalog.transaction("reading") as connection:
                updated = connection.exec_driver_sql("SELECT max(updated_at) FROM spools")
                return float(updated.scalar() or 0) > moment

        wait_for(lambda: passes_after(acked + 2 * STABLE + 1), 30, what="stabiliser passes")
        assert studies.events_of(study) == [] and hook.posts == []
        announced.start("worker")
        wait_for(lambda: delivered_ids(hook), 60, 0.1, "the study's event")
        assert hook.delivered()[0].json["instances"] == 5
        # an identical resend (by another AE) is archived once already: no new revision
        assert pynetdicom_send(announced.port, first[:1], calling="RESENDER") == [0]
        wait_for(lambda: "already archived" in announced.log("worker"), 30,
                 what="the resend handled")
        resent = time.time()
        wait_for(lambda: passes_after(resent + 2 * STABLE + 1), 30, what="stabiliser passes")
        assert [e.revision for e in studies.events_of(study)] == [1]
        assert studies.recent()[0].state == "stable"
    finally:
        catalog.close()
    assert delivered_ids(hook) == [f"{study}:1"]
    wait_for(calls, 30, what="the hook task")
    check_announcements(hook, calls)
