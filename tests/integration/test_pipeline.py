"""The pipeline with its real parts: the receiver, a real Redis, a real Celery worker from the
app factory, moto's S3 server over HTTP (or a directory), pynetdicom as the sender."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ingest.broker import archive_queue, publish
from ingest.keys import instance_key
from ingest.messages import ARCHIVE_TASK
from ingest.settings import Settings
from ingest.spool import Spool
from receiver import statuses
from receiver.sweeper import sweep_once
from tests.support import (
    CORPUS,
    IN_CI,
    corpus_source,
    dataset_bytes,
    make_instance,
    pynetdicom_send,
    split_part10,
    unique_copy,
    wait_for,
)
from workers.errors import TransientError
from workers.pipeline import Outcome, Pipeline

pytestmark = pytest.mark.integration


def corpus(tmp_path: Path) -> dict[Path, str]:
    """Copies of pydicom's corpus with unique SOP Instance UIDs: path -> SOP Instance UID."""
    out = {}
    rng = random.Random(len(str(tmp_path)))
    for name in sorted(CORPUS):
        target = tmp_path / "corpus" / name
        target.parent.mkdir(exist_ok=True)
        out[target] = unique_copy(corpus_source(name), target, rng)
    return out


def expected_key(path: Path) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return instance_key("", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def test_corpus_to_s3(tmp_path: Path, settings: Settings, redis_url: str, s3_endpoint: str,
                      bucket: str, minio_client: Any, start_receiver: Any,
                      start_worker: Any) -> None:
    settings = settings.replace(redis_url=redis_url, archive_url=f"s3://{bucket}",
                                s3_endpoint=s3_endpoint)
    files = corpus(tmp_path)
    start_worker(settings)
    receiver = start_receiver(settings)

    sent = pynetdicom_send(receiver.port, files, calling="MODALITY1")
    assert sent == [statuses.SUCCESS] * len(files)

    def archived() -> bool:
        names = {o.object_name for o in minio_client.list_objects(bucket, recursive=True)}
        return {expected_key(p) for p in files} <= names

    wait_for(archived, 60, 0.1, "every instance in the bucket")
    for path in files:
        key = expected_key(path)
        data = minio_client.get_object(bucket, key).read()
        # the dataset bytes are the sender's, byte for byte
        assert split_part10(data)[1] == dataset_bytes(path), key
        stat = minio_client.stat_object(bucket, key)
        meta = {k.lower(): v for k, v in stat.metadata.items()}
        assert meta["x-amz-meta-sha256"] == hashlib.sha256(data).hexdigest()
        assert meta["x-amz-meta-calling-aet"] == "MODALITY1"
        assert meta["x-amz-meta-transfer-syntax"]
    wait_for(lambda: Spool(settings.spool_dir).depth() == 0, 10, what="an empty spool")
    names = [o.object_name for o in minio_client.list_objects(bucket, recursive=True)]
    assert not [n for n in names if n.startswith("quarantine/")]


def test_duplicate_deliveries_make_one_object(tmp_path: Path, settings: Settings,
                                              redis_url: str, start_worker: Any) -> None:
    """The same receipt enqueued three times, and the same bytes sent twice: one object."""
    settings = settings.replace(redis_url=redis_url)
    spool = Spool(settings.spool_dir)
    spool.ensure()
    from tests.support import spool_entry

    make_instance(tmp_path / "a.dcm")
    data = (tmp_path / "a.dcm").read_bytes()
    first = spool_entry(spool, data)
    second = spool_entry(spool, data)  # a resend of the same instance
    app = start_worker(settings)
    for rid in (first.receipt_id, first.receipt_id, second.receipt_id, first.receipt_id):
        app.send_task(ARCHIVE_TASK, args=[rid])
    wait_for(lambda: spool.depth() == 0, 30, what="an empty spool")
    archive = Path(settings.archive_url)
    files = [p for p in archive.rglob("*.dcm")]
    assert len(files) == 1 and files[0].read_bytes() == data
    assert not (archive / "quarantine").exists()


def test_the_publisher_writes_what_celery_writes_and_a_worker_takes_it(
    tmp_path: Path, settings: Settings, redis_url: str, start_worker: Any,
) -> None:
    """The receiver's publisher process builds Celery's task messages itself: field for
    field they are the ones ``send_task`` writes, and a real worker archives from them."""
    import base64
    import json

    import redis

    from ingest.broker import make_celery
    from receiver.publisher import QueueWriter
    from tests.support import spool_entries

    settings = settings.replace(redis_url=redis_url)
    spool = Spool(settings.spool_dir)
    spool.ensure()
    entries = spool_entries(spool, tmp_path, 3)
    app = make_celery(settings, "test-publisher")
    queue = archive_queue(settings)
    publish(app, queue, entries[0].receipt_id)  # Celery's own
    writer = QueueWriter(settings)
    writer.push([entries[1].receipt_id, entries[2].receipt_id])  # ours, in one LPUSH
    writer.close()
    client = redis.Redis.from_url(redis_url)
    queued = [json.loads(m) for m in reversed(client.lrange(queue, 0, -1))]  # oldest first
    client.close()
    assert len(queued) == 3
    celery, ours = queued[0], queued[1:]

    def body(message: dict[str, Any]) -> Any:
        return json.loads(base64.b64decode(message["body"]))

    fresh = {"id", "root_id", "correlation_id", "delivery_tag", "reply_to", "origin",
             "argsrepr"}  # per task or per process
    for message, entry in zip(ours, entries[1:], strict=True):
        assert message.keys() == celery.keys()
        for part in ("headers", "properties"):
            assert message[part].keys() == celery[part].keys()
            assert {k: v for k, v in message[part].items() if k not in fresh} == {
                k: v for k, v in celery[part].items() if k not in fresh}
        assert {k: v for k, v in message.items() if k not in ("body", "headers", "properties")
                } == {k: v for k, v in celery.items() if k not in ("body", "headers",
                                                                  "properties")}
        assert body(message) == [[entry.receipt_id], *body(celery)[1:]]
        headers = message["headers"]
        assert headers["argsrepr"] == repr([entry.receipt_id])
        assert headers["root_id"] == headers["id"] == message["properties"]["correlation_id"]
    assert len({m["properties"]["delivery_tag"] for m in queued}) == 3

    start_worker(settings)
    wait_for(lambda: spool.depth() == 0, 60, what="an empty spool")
    assert len([p for p in Path(settings.archive_url).rglob("*.dcm")]) == 3


def test_the_publisher_process_is_ready_when_start_returns(
    tmp_path: Path, settings: Settings, redis_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Publisher.start() waits until its process reads the pipe (its start-up would
    otherwise take CPU from the first associations); a receipt handed over then is queued."""
    import logging

    import redis

    from receiver.publisher import Publisher

    settings = settings.replace(redis_url=redis_url)
    queue = archive_queue(settings)
    publisher = Publisher(settings)
    with caplog.at_level(logging.WARNING, logger="dicom_ingest"):
        publisher.start(ready_timeout=60)
    try:
        assert "not ready" not in caplog.text
        assert publisher._child is not None and publisher._child.poll() is None
        assert publisher._ready.is_set()
        client = redis.Redis.from_url(redis_url)
        client.delete(queue)
        publisher.submit("20261128T070000-" + "a" * 16)
        wait_for(lambda: client.llen(queue) == 1, 30, what="the task on the queue")
        client.close()
    finally:
        publisher.stop()
    assert publisher.failures == 0


def test_enqueue_failure_still_acks_and_the_sweeper_recovers(
    tmp_path: Path, settings: Settings, redis_url: str, start_receiver: Any,
    start_worker: Any,
) -> None:
    """Redis is unreachable when the receiver enqueues: the sender still gets 0x0000; a sweep
    against the live Redis gets the instance archived."""
    dead = settings  # its redis_url points at a port nobody listens on
    make_instance(tmp_path / "a.dcm")
    receiver = start_receiver(dead)
    assert pynetdicom_send(receiver.port, [tmp_path / "a.dcm"]) == [statuses.SUCCESS]
    spool = Spool(settings.spool_dir)
    assert spool.depth() == 1
    wait_for(lambda: receiver.publisher.failures == 1, 30, what="the failed publish")

    live = settings.replace(redis_url=redis_url)
    start_worker(live)
    from ingest.broker import make_celery

    app = make_celery(live, "test-sweep")
    queue = archive_queue(live)
    result = sweep_once(spool, lambda rid: publish(app, queue, rid), age=0)
    assert result.requeued == 1
    wait_for(lambda: spool.depth() == 0, 30, what="an empty spool")
    assert [dataset_bytes(p) for p in Path(live.archive_url).rglob("*.dcm")] == [
        dataset_bytes(tmp_path / "a.dcm")
    ]


def test_unwritable_spool_answers_out_of_resources(tmp_path: Path, settings: Settings,
                                                   start_receiver: Any) -> None:
    """The spool cannot take the instance: the sender sees 0xA700, not pynetdicom's 0xC211."""
    receiver = start_receiver(settings)
    entries = settings.spool_dir / "entries"
    shutil.rmtree(entries)
    entries.write_text("not a directory")  # rename into it fails, even for root
    make_instance(tmp_path / "a.dcm")
    assert pynetdicom_send(receiver.port, [tmp_path / "a.dcm"]) == [statuses.OUT_OF_RESOURCES]
    # the received bytes are gone; what is left are the receiver's empty spare temp files
    assert [p for p in (settings.spool_dir / "tmp").iterdir() if p.stat().st_size] == []


def test_free_space_floor_answers_out_of_resources(tmp_path: Path, settings: Settings,
                                                   start_receiver: Any) -> None:
    receiver = start_receiver(settings.replace(spool_min_free_mb=10**9))  # a petabyte floor
    make_instance(tmp_path / "a.dcm")
    assert pynetdicom_send(receiver.port, [tmp_path / "a.dcm"]) == [statuses.OUT_OF_RESOURCES]
    assert Spool(settings.spool_dir).depth() == 0


def test_storage_outage_is_transient_and_keeps_the_spool(tmp_path: Path,
                                                         settings: Settings) -> None:
    """S3 unreachable: the pipeline raises TransientError (the task retries) and the spool
    entry stays; nothing is quarantined."""
    from tests.support import free_port, spool_entry

    down = settings.replace(archive_url="s3://archive",
                            s3_endpoint=f"http://127.0.0.1:{free_port()}")
    pipeline = Pipeline.from_settings(down)
    pipeline.spool.ensure()
    make_instance(tmp_path / "a.dcm")
    receipt = spool_entry(pipeline.spool, (tmp_path / "a.dcm").read_bytes())
    with pytest.raises(TransientError):
        pipeline.process(receipt.receipt_id)
    assert pipeline.spool.read_receipt(receipt.receipt_id) == receipt
    assert pipeline.spool.dcm_path(receipt.receipt_id).exists()


def test_duplicate_conflict_is_quarantined(tmp_path: Path, settings: Settings) -> None:
    """Same SOP Instance UID, different bytes, policy reject: the first stays, the second is
    quarantined with reason duplicate-conflict."""
    from tests.support import spool_entry

    pipeline = Pipeline.from_settings(settings)
    pipeline.spool.ensure()
    ids = {"study": "1.2.826.0.1.3680043.10.9.1", "series": "1.2.826.0.1.3680043.10.9.2",
           "sop_instance": "1.2.826.0.1.3680043.10.9.3"}
    make_instance(tmp_path / "a.dcm", **ids)
    make_instance(tmp_path / "b.dcm", **ids)  # other pixel data under the same UIDs
    first = spool_entry(pipeline.spool, (tmp_path / "a.dcm").read_bytes())
    second = spool_entry(pipeline.spool, (tmp_path / "b.dcm").read_bytes())
    assert pipeline.process(first.receipt_id) is Outcome.ARCHIVED
    assert pipeline.process(second.receipt_id) is Outcome.QUARANTINED
    archive = Path(settings.archive_url)
    reason = (archive / "quarantine" / f"{second.receipt_id}.json").read_text()
    assert '"duplicate-conflict"' in reason
    kept = [p for p in archive.rglob("*.dcm") if "quarantine" not in p.parts]
    assert [p.read_bytes() for p in kept] == [(tmp_path / "a.dcm").read_bytes()]


def test_large_instance_goes_up_in_parts(tmp_path: Path, settings: Settings, bucket: str,
                                         s3_endpoint: str, minio_client: Any) -> None:
    """An instance larger than one part (16 MiB) is uploaded as a multipart object, streamed
    from the spool file, and read back identical."""
    from tests.support import spool_entry

    s3 = settings.replace(archive_url=f"s3://{bucket}/site-a", s3_endpoint=s3_endpoint)
    pipeline = Pipeline.from_settings(s3)
    pipeline.spool.ensure()
    make_instance(tmp_path / "big.dcm", pixel_bytes=40 * 2**20)
    data = (tmp_path / "big.dcm").read_bytes()
    receipt = spool_entry(pipeline.spool, data)
    assert pipeline.process(receipt.receipt_id) is Outcome.ARCHIVED
    names = [o.object_name for o in minio_client.list_objects(bucket, recursive=True)]
    assert len(names) == 1 and names[0].startswith("site-a/")
    stat = minio_client.stat_object(bucket, names[0])
    assert "-" in stat.etag  # a multipart upload's ETag
    assert minio_client.get_object(bucket, names[0]).read() == data
    assert pipeline.spool.depth() == 0


@pytest.mark.parametrize("backend", ["directory", "s3"])
def test_a_spool_file_changed_after_receipt_is_quarantined_as_it_is(
        tmp_path: Path, settings: Settings, backend: str, request: pytest.FixtureRequest) -> None:
    """Bytes that no longer match the receipt's CRC-32 (a disk fault in the spool) are
    quarantined with reason checksum-mismatch, under their own sha256; the receipt's CRC is
    in the reason record. (The directory backend used to retry these forever.)"""
    import json

    from tests.support import crc32, sha256, spool_entry

    if backend == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("bucket")
        settings = settings.replace(archive_url=f"s3://{bucket}", s3_endpoint=endpoint,
                                    s3_secure=False)
    pipeline = Pipeline.from_settings(settings)
    pipeline.spool.ensure()
    make_instance(tmp_path / "a.dcm")
    sent = (tmp_path / "a.dcm").read_bytes()
    receipt = spool_entry(pipeline.spool, sent)
    spooled = pipeline.spool.dcm_path(receipt.receipt_id)
    changed = bytearray(spooled.read_bytes())
    changed[-1] ^= 0xFF
    spooled.write_bytes(changed)

    assert pipeline.process(receipt.receipt_id) is Outcome.QUARANTINED
    data_key = f"quarantine/{receipt.receipt_id}.dcm"
    assert pipeline.archive.read_bytes(data_key) == bytes(changed)
    stored = pipeline.archive.head(data_key)
    assert stored is not None and stored.sha256 == sha256(bytes(changed)) != sha256(sent)
    reason = json.loads(pipeline.archive.read_bytes(f"quarantine/{receipt.receipt_id}.json"))
    assert reason["reason"] == "checksum-mismatch" and "CRC-32" in reason["message"]
    assert reason["receipt"]["crc32"] == receipt.crc32 == crc32(sent)
    assert pipeline.spool.receipt_ids() == []


def test_directory_archive_takes_the_spooled_file_as_it_is(tmp_path: Path,
                                                           settings: Settings) -> None:
    """On the spool's filesystem the archived object is the spooled file under a second name
    (nothing copied); on another filesystem it is copied. Either way: the sender's bytes under
    the instance's key, sha256 and sender in its attributes, the mode of a new file, and
    nothing left in the spool."""
    from tests.support import sha256, spool_entry

    shm = Path("/dev/shm")
    spools = [("same filesystem", tmp_path / "spool")]
    if shm.is_dir() and os.access(shm, os.W_OK) and \
            os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        other = Path(tempfile.mkdtemp(dir=shm, prefix="dicom-ingest-test-"))
        spools.append(("another filesystem", other / "spool"))
    elif IN_CI:
        pytest.fail("/dev/shm is needed as a second filesystem")
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        for n, (where, spool_dir) in enumerate(spools):
            pipeline = Pipeline.from_settings(settings.replace(spool_dir=spool_dir))
            pipeline.spool.ensure()
            make_instance(tmp_path / f"{n}.dcm")
            sent = (tmp_path / f"{n}.dcm").read_bytes()
            receipt = spool_entry(pipeline.spool, sent, calling="CT-7")
            spooled = os.stat(pipeline.spool.dcm_path(receipt.receipt_id))
            assert pipeline.process(receipt.receipt_id) is Outcome.ARCHIVED, where
            key = expected_key(tmp_path / f"{n}.dcm")
            path = Path(settings.archive_url) / key
            assert path.read_bytes() == sent, where
            assert os.getxattr(path, "user.dicom_ingest.sha256").decode() == sha256(sent)
            assert os.getxattr(path, "user.dicom_ingest.calling-aet") == b"CT-7"
            # the spool's poison counter is not left on it
            assert "user.dicom_ingest.attempts" not in os.listxattr(path), where
            stat = os.stat(path)
            assert stat.st_mode & 0o777 == 0o666 & ~umask, where
            assert stat.st_nlink == 1, where  # the spool's name for it is gone
            assert (stat.st_ino == spooled.st_ino) == (where == "same filesystem")
            assert pipeline.spool.receipt_ids() == [] and not list(pipeline.spool.entries.iterdir())
            # a second delivery finds the same object and changes nothing
            again = spool_entry(pipeline.spool, sent)
            assert pipeline.process(again.receipt_id) is Outcome.ALREADY_ARCHIVED
            assert path.read_bytes() == sent
    finally:
        if len(spools) > 1:
            shutil.rmtree(spools[1][1].parent, ignore_errors=True)


def test_a_stopping_worker_sends_the_task_events_it_holds(
        tmp_path: Path, settings: Settings, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker holds task events back to send them in batches; when it stops it sends
    what it holds, so that a dashboard sees how its last tasks ended."""
    from celery.contrib.testing.worker import start_worker as celery_start_worker

    from tests.support import spool_entries, task_event_listener
    from workers import consumer
    from workers.app import create_app

    monkeypatch.setattr(consumer, "EVENTS_INTERVAL", 600.0)  # no batch goes out on time
    live = settings.replace(redis_url=redis_url)
    app = create_app(live)
    spool = Spool(live.spool_dir)
    spool.ensure()
    receipts = spool_entries(spool, tmp_path, 3)
    with task_event_listener(live) as seen:

        def ours(kind: str) -> list[dict[str, Any]]:
            received = {e["uuid"] for e in list(seen) if e["type"] == "task-received"
                        and any(r.receipt_id in str(e.get("args")) for r in receipts)}
            return [e for e in list(seen) if e["type"] == kind and e["uuid"] in received]

        with celery_start_worker(app, pool="solo", concurrency=1, perform_ping_check=False,
                                 shutdown_timeout=30, loglevel="WARNING"):
            for receipt in receipts:
                publish(app, archive_queue(live), receipt.receipt_id)
            wait_for(lambda: spool.depth() == 0, 30, what="an empty spool")
            assert ours("task-received") == []  # held back, in a batch not yet due
        wait_for(lambda: len(ours("task-succeeded")) == 3, 30, 0.2,
                 what="the held events, sent as the worker stopped")


def test_workers_upgraded_first_take_the_tasks_of_earlier_receivers(
    tmp_path: Path, settings: Settings, redis_url: str, start_worker: Any,
) -> None:
    """The upgrade order the README gives, workers first: an earlier receiver sends archive
    tasks to the plain ``dicom-ingest`` queue (and a version-1 receipt with the sha256 it
    took itself); a worker of this version takes them from there and archives the
    instances."""
    from ingest.broker import make_celery
    from ingest.messages import QUEUE
    from tests.support import make_instance, spool_entry

    # a database of its own: every worker also takes tasks from the plain queue
    live = settings.replace(redis_url=redis_url.rsplit("/", 1)[0] + "/7")
    spool = Spool(live.spool_dir)
    spool.ensure()
    make_instance(tmp_path / "old.dcm")
    receipt = spool_entry(spool, (tmp_path / "old.dcm").read_bytes(), legacy=True)
    app = make_celery(live, "earlier-receiver")
    publish(app, QUEUE, receipt.receipt_id)
    start_worker(live)
    wait_for(lambda: spool.depth() == 0, 30, what="an empty spool")
    assert [dataset_bytes(p) for p in Path(live.archive_url).rglob("*.dcm")] == [
        dataset_bytes(tmp_path / "old.dcm")]
