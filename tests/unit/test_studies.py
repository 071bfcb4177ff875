"""Study events without a server: the manifest and body, the signature, the settings, and the
stability rule and outbox on an SQLite catalog file (the stabiliser's pass, the deliverer's
attempts, with a recording HTTP stand-in)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.catalog import QUARANTINED, Catalog
from ingest.messages import MessageError, check_event_id
from ingest.settings import SettingsError, from_env, known_variables
from ingest.spool import Spool, new_receipt_id
from ingest.studies import LEASE, SPOOL_FORGET, Studies, build_manifest, event_id, summary
from receiver.stabiliser import Stabiliser
from tests.support.catalog import STUDY, T0, row
from workers.archive import LocalArchive
from workers.events import SIGNATURE_HEADER, Announcer, sign
from workers.inventory import CatalogLink


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    opened = Catalog.open(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    yield opened
    opened.close()


def test_manifest_and_body() -> None:
    quarantined = row(9, key="quarantine/x.dcm", series_uid="", state=QUARANTINED,
                      reason="uid-mismatch", calling_aet="MR2")
    rows = [row(1), row(2), row(3, series="1.2.3.2"), quarantined]
    manifest = build_manifest(STUDY, 2, rows, T0 + 100)
    assert manifest["event_id"] == f"{STUDY}:2" == event_id(STUDY, 2)
    assert manifest["counts"] == {"series": 2, "instances": 3, "quarantined": 1,
                                  "bytes": 101 + 102 + 103}
    assert [s["series_instance_uid"] for s in manifest["series"]] == ["1.2.3.1", "1.2.3.2"]
    first = manifest["series"][0]["instances"][0]
    assert first == {"sop_instance_uid": "1.2.3.1", "key": row(1).key,
                     "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "size": 101,
                     "sha256": f"{1:064x}"}
    assert manifest["quarantined"][0]["reason"] == "uid-mismatch"
    assert manifest["calling_aets"] == ["CT1", "MR2"]
    assert manifest["first_received_at"] < manifest["last_received_at"]
    body = summary(manifest, f"{STUDY}/study.json")
    assert {k: body[k] for k in ("event_id", "study_instance_uid", "revision", "series",
                                 "instances", "manifest_key", "calling_aets")} == {
        "event_id": f"{STUDY}:2", "study_instance_uid": STUDY, "revision": 2, "series": 2,
        "instances": 3, "manifest_key": f"{STUDY}/study.json", "calling_aets": ["CT1", "MR2"]}


def test_signature_is_the_hmac_of_the_raw_body() -> None:
    body = b'{"event_id": "1.2:1"}'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign(body, "s3cret") == f"sha256={expected}"
    assert sign(body + b" ", "s3cret") != sign(body, "s3cret")


def test_event_ids() -> None:
    assert check_event_id("1.2.3:1") == "1.2.3:1"
    for bad in ("1.2.3", "1.2.3:0", "x:1", "1.2.3:1:2", 5, "../x:1"):
        with pytest.raises(MessageError):
            check_event_id(bad)


def test_settings() -> None:
    names = {"INGEST_STUDY_STABLE_SECONDS", "INGEST_ON_STUDY_WEBHOOK", "INGEST_WEBHOOK_SECRET",
             "INGEST_ON_STUDY_TASK", "INGEST_ON_STUDY_QUEUE"}
    assert names <= known_variables()
    defaults = from_env({})
    assert defaults.study_stable_seconds == 60 and defaults.on_study_queue == "dicom-ingest-events"
    settings = from_env({"INGEST_STUDY_STABLE_SECONDS": "2.5",
                         "INGEST_ON_STUDY_WEBHOOK": "https://ris.example/hook?token=abc",
                         "INGEST_WEBHOOK_SECRET": "s3cret",
                         "INGEST_ON_STUDY_TASK": "myapp.tasks.study_ready"})
    assert settings.study_stable_seconds == 2.5
    assert settings.on_study_task == "myapp.tasks.study_ready"
    assert "s3cret" not in repr(settings) and "token" not in repr(settings)
    for name, bad in (("STUDY_STABLE_SECONDS", "0"), ("ON_STUDY_WEBHOOK", "ftp://x")):
        with pytest.raises(SettingsError, match=name):
            from_env({f"INGEST_{name}": bad})


def test_a_study_is_stable_once_quiet_and_once_only(catalog: Catalog) -> None:
    studies = Studies(catalog)
    catalog.record_archived(row(1), now=T0 + 10)
    catalog.record_archived(row(2), now=T0 + 20)
    assert studies.quiet(studies.cutoff(T0 + 79, 60)) == []  # quiet for 59 s only
    cutoff = studies.cutoff(T0 + 80, 60)
    assert studies.quiet(cutoff) == [STUDY]
    event = studies.stabilise(STUDY, cutoff, T0 + 80, "site")
    assert event is not None and event.event_id == f"{STUDY}:1"
    assert event.manifest_key == f"site/{STUDY}/study.json"
    assert json.loads(event.payload)["instances"] == 2
    assert studies.stabilise(STUDY, cutoff, T0 + 80, "site") is None  # one event only
    assert studies.quiet(studies.cutoff(T0 + 1000, 60)) == []
    # a late instance re-opens it; quiet again, it gets revision 2 with both counted
    catalog.record_archived(row(3), now=T0 + 500)
    assert studies.recent()[0].state == "open"
    assert studies.stabilise(STUDY, studies.cutoff(T0 + 530, 60), T0 + 530, "") is None
    late = studies.stabilise(STUDY, studies.cutoff(T0 + 560, 60), T0 + 560, "")
    assert late is not None and late.revision == 2
    assert json.loads(late.payload)["instances"] == 3
    assert [e.event_id for e in studies.events_of(STUDY)] == [f"{STUDY}:1", f"{STUDY}:2"]
    status = studies.recent()[0]
    assert (status.state, status.revision, status.instances, status.series) == (
        "stable", 2, 3, 1)
    assert status.first_received_at == T0 + 1 and status.last_received_at == T0 + 3


def test_a_spool_that_may_hold_the_study_holds_it_back(catalog: Catalog) -> None:
    studies = Studies(catalog)
    catalog.record_archived(row(1), now=T0)
    # a spool with an entry received at T0 + 30: it could be this study's
    studies.report_spool("a", T0 + 30, T0 + 1000)
    studies.report_spool("b", T0 + 999, T0 + 1000)
    assert studies.quiet(studies.cutoff(T0 + 1000, 60)) == []
    studies.report_spool("a", T0 + 998, T0 + 1001)  # the entry has been archived
    assert studies.quiet(studies.cutoff(T0 + 1001, 60)) == [STUDY]
    # a spool whose receiver stopped reporting long ago no longer holds anything back
    studies.report_spool("a", T0 + 30, T0 + 1001)
    later = T0 + 1001 + SPOOL_FORGET + 1
    studies.report_spool("b", later, later)
    assert studies.quiet(studies.cutoff(later, 60)) == [STUDY]


def test_the_stabilisers_pass(catalog: Catalog, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    sent: list[str] = []
    stabiliser = Stabiliser(spool, "s1", lambda: Studies(catalog), sent.append, 60, "")
    catalog.record_archived(row(1), now=T0)
    # an entry received before T0 + 60 is in the spool: whatever its study, wait
    pending = spool.entries / f"{new_receipt_id(T0 + 50)}.dcm"
    pending.write_bytes(b"x")
    assert stabiliser.once(now=T0 + 100).stabilised == []
    pending.unlink()
    # an entry received after T0 + 60 came after the study was stable: no matter
    (spool.entries / f"{new_receipt_id(T0 + 61)}.dcm").write_bytes(b"x")
    result = stabiliser.once(now=T0 + 101)
    assert result.stabilised == [f"{STUDY}:1"] and sent == [f"{STUDY}:1"]
    assert result.pending == 1
    assert stabiliser.once(now=T0 + 102).sent == 0  # leased: sent once per lease
    assert stabiliser.once(now=T0 + 102 + LEASE).sent == 1  # nothing heard: sent again
    assert sent == [f"{STUDY}:1"] * 2


class Recorder:
    """An HTTP endpoint stand-in: the statuses to answer in turn, what it was sent."""

    def __init__(self, statuses: list[int], archive_root: Path) -> None:
        self.statuses, self.root = statuses, archive_root
        self.posts: list[tuple[bytes, dict[str, str], bool]] = []

    def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        manifest = self.root / STUDY / "study.json"
        self.posts.append((body, headers, manifest.exists()))
        return self.statuses.pop(0) if self.statuses else 200


def test_delivery_retries_until_done_and_repeats_no_step(catalog: Catalog,
                                                         tmp_path: Path) -> None:
    studies = Studies(catalog)
    catalog.record_archived(row(1), now=T0)
    event = studies.stabilise(STUDY, T0, T0 + 60, "")
    assert event is not None
    archive_root = tmp_path / "archive"
    web = Recorder([500, 503], archive_root)
    tasks: list[tuple[str, list[object], str]] = []
    fail_task = [True]

    def send_task(name: str, args: list[object], queue: str) -> None:
        if fail_task.pop() if fail_task else False:
            raise ConnectionError("broker down")
        tasks.append((name, args, queue))

    link = CatalogLink(catalog.url)
    announcer = Announcer(LocalArchive(archive_root), link, webhook="http://h/x",
                          secret="k", task_name="myapp.tasks.study_ready",
                          task_queue="events", send_task=send_task, post=web)
    try:
        assert announcer.deliver(event.event_id, now=T0 + 61) == "retry"  # 500
        assert announcer.deliver(event.event_id, now=T0 + 62) == "retry"  # 503
        assert announcer.deliver(event.event_id, now=T0 + 63) == "retry"  # 200; the task fails
        assert announcer.deliver(event.event_id, now=T0 + 64) == "delivered"
        assert announcer.deliver(event.event_id, now=T0 + 65) == "skipped"
    finally:
        link.close()
    assert len(web.posts) == 3  # not again once it answered 2xx
    assert {body for body, _, _ in web.posts} == {event.payload.encode()}
    assert all(seen for _, _, seen in web.posts), "posted before the manifest was written"
    body, headers, _ = web.posts[0]
    assert headers[SIGNATURE_HEADER] == sign(body, "k")
    assert headers["Content-Type"] == "application/json"
    assert tasks == [("myapp.tasks.study_ready",
                      [event.manifest_key, json.loads(event.payload)], "events")]
    done = studies.load(event.event_id)
    assert done is not None and done.delivered_at is not None and done.attempts == 3
    manifest = json.loads((archive_root / STUDY / "study.json").read_text())
    assert manifest["revision"] == 1 and manifest["counts"]["instances"] == 1


def test_the_studies_command(catalog: Catalog, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_ingest.cli import main

    catalog.record_archived(row(1), now=T0)
    catalog.record_archived(row(2, series="1.2.3.7"), now=T0)
    studies = Studies(catalog)
    assert studies.stabilise(STUDY, T0, T0 + 60, "") is not None
    assert main(["studies", "--json", "--catalog", catalog.url]) == 0
    [line] = capsys.readouterr().out.splitlines()
    shown = json.loads(line)
    assert {k: shown[k] for k in ("study_uid", "state", "revision", "series", "instances",
                                  "event_id", "event")} == {
        "study_uid": STUDY, "state": "stable", "revision": 1, "series": 2, "instances": 2,
        "event_id": f"{STUDY}:1", "event": "pending"}
    assert main(["studies", "--catalog", catalog.url]) == 0
    table = capsys.readouterr().out
    assert STUDY in table and "pending" in table and "1 event(s) not delivered yet" in table
