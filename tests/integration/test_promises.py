"""Promises the README makes that need a real sender or a real worker to show: the statuses
the receiver answers, quarantine reasons, retries that run out, back-pressure by age, a
duplicate policy in S3."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from ingest.broker import archive_queue, make_celery, publish
from ingest.settings import Settings
from ingest.spool import Receipt, Spool, new_receipt_id
from receiver import statuses
from receiver.sweeper import sweep_once
from tests.support import (
    crc32,
    make_instance,
    pynetdicom_send,
    raw_part10,
    split_part10,
    wait_for,
)
from workers.pipeline import Outcome, Pipeline

pytestmark = pytest.mark.integration
CT = "1.2.840.10008.5.1.4.1.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def commit(spool: Spool, part10: bytes, transfer_syntax: str | None = None,
           received_at: float | None = None) -> Receipt:
    """A spool entry as the receiver makes it, with the receipt saying ``transfer_syntax``
    (default: the File Meta's) and received at ``received_at`` (default: now)."""
    import pydicom

    spool.ensure()
    now = time.time() if received_at is None else received_at
    tmp = spool.tmp / f"received-{time.monotonic_ns()}.dcm"
    tmp.write_bytes(part10)
    meta = pydicom.filereader.read_file_meta_info(tmp)
    receipt = Receipt(
        receipt_id=new_receipt_id(now), calling_aet="TEST", called_aet="DICOM-INGEST",
        peer="127.0.0.1:1", received_at=now, sop_class_uid=str(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax=transfer_syntax or str(meta.TransferSyntaxUID), size=len(part10),
        dataset_offset=len(split_part10(part10)[0]), sha256="", crc32=crc32(part10))
    spool.commit(tmp, receipt)
    return receipt


def reason(settings: Settings, receipt: Receipt) -> str:
    record = Path(settings.archive_url) / "quarantine" / f"{receipt.receipt_id}.json"
    return str(json.loads(record.read_text())["reason"])


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "pynetdicom"])
def test_an_unexpected_error_answers_0xA7FF_and_keeps_nothing(
        tmp_path: Path, settings: Settings, start_receiver: Any, fast_path: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure nobody foresaw inside the C-STORE handling reaches the sender as 0xA7FF,
    never as an exception (pynetdicom would answer 0xC211) or a dropped association; nothing
    is spooled, and the next C-STORE on the same association succeeds."""
    from pynetdicom import AE, _config

    from ingest.scu import associate

    receiver = start_receiver(settings.replace(receiver_fast_path=fast_path))
    files = [tmp_path / f"{n}.dcm" for n in range(3)]
    for path in files:
        make_instance(path)
    broken = {"now": False}
    real = receiver.monitor.refusal

    def refusal() -> str | None:
        if broken["now"]:
            raise RuntimeError("a bug in the back-pressure check")
        return real()

    monkeypatch.setattr(receiver.monitor, "refusal", refusal)
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = associate(ae, "127.0.0.1", receiver.port, ae_title="DICOM-INGEST")
    assert assoc.is_established
    sent = []
    try:
        for n, path in enumerate(files):
            broken["now"] = n == 1
            sent.append(int(assoc.send_c_store(path).Status))
        assert assoc.is_established
    finally:
        assoc.release()
    assert sent == [statuses.SUCCESS, statuses.OUT_OF_RESOURCES_UNEXPECTED, statuses.SUCCESS]
    assert Spool(settings.spool_dir).depth() == 2


def test_a_file_meta_that_is_not_the_negotiated_syntax_is_quarantined(
        tmp_path: Path, settings: Settings) -> None:
    make_instance(tmp_path / "a.dcm")
    pipeline = Pipeline.from_settings(settings)
    receipt = commit(pipeline.spool, (tmp_path / "a.dcm").read_bytes(),
                     transfer_syntax="1.2.840.10008.1.2")  # negotiated implicit VR
    assert pipeline.process(receipt.receipt_id) is Outcome.QUARANTINED
    assert reason(settings, receipt) == "transfer-syntax-mismatch"


def test_a_deflated_dataset_that_inflates_past_1_gib_is_quarantined(
        tmp_path: Path, settings: Settings) -> None:
    """A deflate bomb: about 1 MB that would inflate to more than 1 GiB."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 24)
    body = b"".join(squeeze.compress(zeros) for _ in range(65)) + squeeze.flush()
    assert len(body) < 4 << 20
    pipeline = Pipeline.from_settings(settings)
    receipt = commit(pipeline.spool, raw_part10(CT, "1.2.826.0.1.3680043.10.9.77", body,
                                                DEFLATED))
    assert pipeline.process(receipt.receipt_id) is Outcome.QUARANTINED
    assert reason(settings, receipt) == "too-large"


def test_an_old_entry_turns_senders_away_until_it_is_archived(
        tmp_path: Path, settings: Settings, start_receiver: Any) -> None:
    """INGEST_SPOOL_MAX_AGE through a real sender: while the oldest entry is older than the
    limit, C-STOREs get 0xA700 and nothing is spooled; once it is archived they succeed."""
    make_instance(tmp_path / "old.dcm")
    spool = Spool(settings.spool_dir)
    old = commit(spool, (tmp_path / "old.dcm").read_bytes(), received_at=time.time() - 120)
    receiver = start_receiver(settings.replace(spool_max_age=60.0))
    make_instance(tmp_path / "new.dcm")
    assert pynetdicom_send(receiver.port, [tmp_path / "new.dcm"]) == [
        statuses.OUT_OF_RESOURCES]
    assert spool.receipt_ids() == [old.receipt_id]
    assert Pipeline.from_settings(settings).process(old.receipt_id) is Outcome.ARCHIVED
    wait_for(lambda: receiver.monitor.refusal() is None, 30, what="the limit lifted")
    assert pynetdicom_send(receiver.port, [tmp_path / "new.dcm"]) == [statuses.SUCCESS]


def test_retries_that_run_out_leave_the_instance_to_the_sweeper(
        tmp_path: Path, settings: Settings, redis_url: str, bucket: str, s3_endpoint: str,
        start_worker: Any, caplog: pytest.LogCaptureFixture) -> None:
    """S3 answers 503 for longer than the task's retries last: the task gives up, the
    instance stays in the spool, and once S3 is back a sweep gets it archived."""
    from tests.s3proxy import s3_proxy

    with s3_proxy(s3_endpoint) as (endpoint, faults):
        live = settings.replace(redis_url=redis_url, archive_url=f"s3://{bucket}",
                                s3_endpoint=endpoint, s3_secure=False, task_max_retries=1)
        faults.put_error = (503, "ServiceUnavailable")
        start_worker(live)
        spool = Spool(live.spool_dir)
        make_instance(tmp_path / "a.dcm")
        receipt = commit(spool, (tmp_path / "a.dcm").read_bytes())
        app = make_celery(live, "test-retries")
        queue = archive_queue(live)
        publish(app, queue, receipt.receipt_id)
        def tries() -> int:
            return sum("transient failure (attempt" in r.getMessage() for r in caplog.records)

        wait_for(lambda: tries() >= 2, 60, what="the first try and its one retry")
        # no third try comes: give the retry budget's longest backoff (2.4 s) time to pass
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            assert tries() == 2
            time.sleep(0.2)
        assert spool.receipt_ids() == [receipt.receipt_id]
        faults.put_error = None
        assert sweep_once(spool, lambda rid: publish(app, queue, rid), age=0).requeued == 1
        wait_for(lambda: spool.depth() == 0, 30, what="the swept instance archived")
        assert tries() == 2


def test_the_overwrite_policy_through_a_real_sender_into_s3(
        tmp_path: Path, settings: Settings, redis_url: str, bucket: str, s3_endpoint: str,
        minio_client: Any, start_receiver: Any, start_worker: Any) -> None:
    """Two different datasets under one SOP Instance UID, sent by a DICOM peer, archived by
    a real worker into S3 under INGEST_DUPLICATE_POLICY=overwrite: the second one stays."""
    live = settings.replace(redis_url=redis_url, archive_url=f"s3://{bucket}",
                            s3_endpoint=s3_endpoint, s3_secure=False,
                            duplicate_policy="overwrite")
    ids = {"study": "1.2.826.0.1.3680043.10.9.11", "series": "1.2.826.0.1.3680043.10.9.12",
           "sop_instance": "1.2.826.0.1.3680043.10.9.13"}
    key = f"{ids['study']}/{ids['series']}/{ids['sop_instance']}.dcm"
    make_instance(tmp_path / "a.dcm", **ids)
    make_instance(tmp_path / "b.dcm", **ids)
    receiver = start_receiver(live)
    start_worker(live)
    spool = Spool(live.spool_dir)
    for name in ("a", "b"):
        assert pynetdicom_send(receiver.port, [tmp_path / f"{name}.dcm"]) == [
            statuses.SUCCESS]
        wait_for(lambda: spool.depth() == 0, 30, what="an empty spool")
    stored = minio_client.get_object(bucket, key).read()
    assert split_part10(stored)[1] == split_part10((tmp_path / "b.dcm").read_bytes())[1]
    names = [o.object_name for o in minio_client.list_objects(bucket, recursive=True)]
    assert names == [key]
