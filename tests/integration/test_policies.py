"""Duplicate policies, poison detection, back-pressure through a real sender, and the
quarantine and status commands against real Redis, a real worker and a real S3 server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ingest.settings import Settings, environment
from ingest.spool import Spool
from receiver import statuses
from tests.support import (
    cli,
    make_instance,
    pynetdicom_send,
    run,
    split_part10,
    spool_entry,
    wait_for,
)
from workers.errors import TransientError
from workers.pipeline import Outcome, Pipeline

pytestmark = pytest.mark.integration
IDS = {"study": "1.2.826.0.1.3680043.10.9.1", "series": "1.2.826.0.1.3680043.10.9.2",
       "sop_instance": "1.2.826.0.1.3680043.10.9.3"}
KEY = "1.2.826.0.1.3680043.10.9.1/1.2.826.0.1.3680043.10.9.2/1.2.826.0.1.3680043.10.9.3.dcm"


def two_versions(tmp_path: Path, pipeline: Pipeline) -> tuple[Any, Any, bytes, bytes]:
    make_instance(tmp_path / "a.dcm", **IDS)
    make_instance(tmp_path / "b.dcm", **IDS)
    a, b = (tmp_path / "a.dcm").read_bytes(), (tmp_path / "b.dcm").read_bytes()
    return spool_entry(pipeline.spool, a), spool_entry(pipeline.spool, b), a, b


def test_overwrite_policy(tmp_path: Path, settings: Settings) -> None:
    pipeline = Pipeline.from_settings(settings.replace(duplicate_policy="overwrite"))
    pipeline.spool.ensure()
    first, second, _, b = two_versions(tmp_path, pipeline)
    assert pipeline.process(first.receipt_id) is Outcome.ARCHIVED
    assert pipeline.process(second.receipt_id) is Outcome.ARCHIVED
    assert (Path(settings.archive_url) / KEY).read_bytes() == b
    assert not (Path(settings.archive_url) / "quarantine").exists()


def test_version_policy_in_a_directory(tmp_path: Path, settings: Settings) -> None:
    pipeline = Pipeline.from_settings(settings.replace(duplicate_policy="version"))
    pipeline.spool.ensure()
    first, second, a, b = two_versions(tmp_path, pipeline)
    assert pipeline.process(first.receipt_id) is Outcome.ARCHIVED
    assert pipeline.process(second.receipt_id) is Outcome.ARCHIVED
    archive = Path(settings.archive_url)
    assert (archive / KEY).read_bytes() == a
    suffixed = archive / KEY.replace(".dcm", f".{second.receipt_id}.dcm")
    assert suffixed.read_bytes() == b


def test_version_policy_in_s3(tmp_path: Path, settings: Settings, bucket: str,
                              s3_endpoint: str, minio_client: Any) -> None:
    """Without bucket versioning the second object waits in the spool (nothing is lost);
    with it, both versions are kept under the one key."""
    from minio.versioningconfig import ENABLED, VersioningConfig

    s3 = settings.replace(duplicate_policy="version", archive_url=f"s3://{bucket}",
                          s3_endpoint=s3_endpoint)
    pipeline = Pipeline.from_settings(s3)
    pipeline.spool.ensure()
    first, second, a, b = two_versions(tmp_path, pipeline)
    assert pipeline.process(first.receipt_id) is Outcome.ARCHIVED
    with pytest.raises(TransientError, match="versioning"):
        pipeline.process(second.receipt_id)
    assert pipeline.spool.read_receipt(second.receipt_id) is not None
    minio_client.set_bucket_versioning(bucket, VersioningConfig(ENABLED))
    assert pipeline.process(second.receipt_id) is Outcome.ARCHIVED
    versions = list(minio_client.list_objects(bucket, prefix=KEY, include_version=True))
    assert len(versions) == 2
    bodies = {minio_client.get_object(bucket, KEY, version_id=v.version_id).read()
              for v in versions}
    assert bodies == {a, b}


def test_same_bytes_twice_is_one_object(tmp_path: Path, settings: Settings) -> None:
    pipeline = Pipeline.from_settings(settings)
    pipeline.spool.ensure()
    make_instance(tmp_path / "a.dcm", **IDS)
    data = (tmp_path / "a.dcm").read_bytes()
    first, second = spool_entry(pipeline.spool, data), spool_entry(pipeline.spool, data)
    assert pipeline.process(first.receipt_id) is Outcome.ARCHIVED
    assert pipeline.process(second.receipt_id) is Outcome.ALREADY_ARCHIVED
    assert [p.name for p in Path(settings.archive_url).rglob("*.dcm")] == [KEY.split("/")[-1]]


def test_poison_after_unfinished_attempts(tmp_path: Path, settings: Settings) -> None:
    """An object whose handling never finishes (the worker dies each time) is quarantined
    once the attempts run out, instead of killing workers forever."""
    pipeline = Pipeline.from_settings(settings.replace(poison_max_attempts=3))
    pipeline.spool.ensure()
    make_instance(tmp_path / "a.dcm")
    receipt = spool_entry(pipeline.spool, (tmp_path / "a.dcm").read_bytes())
    for _ in range(3):  # three deliveries that died mid-task
        pipeline.spool.begin_attempt(receipt.receipt_id)
    assert pipeline.process(receipt.receipt_id) is Outcome.QUARANTINED
    reason = json.loads((Path(settings.archive_url) / "quarantine" /
                         f"{receipt.receipt_id}.json").read_text())
    assert reason["reason"] == "poison"
    assert not list(pipeline.spool.entries.iterdir())


def test_transient_failures_do_not_count_as_poison(tmp_path: Path, settings: Settings) -> None:
    from tests.support import free_port

    down = settings.replace(archive_url="s3://archive", s3_endpoint=f"127.0.0.1:{free_port()}",
                            s3_secure=False, poison_max_attempts=2)
    pipeline = Pipeline.from_settings(down)
    pipeline.spool.ensure()
    make_instance(tmp_path / "a.dcm")
    receipt = spool_entry(pipeline.spool, (tmp_path / "a.dcm").read_bytes())
    for _ in range(4):
        with pytest.raises(TransientError):
            pipeline.process(receipt.receipt_id)
    assert pipeline.spool.begin_attempt(receipt.receipt_id) == 1


def test_depth_limit_answers_out_of_resources(tmp_path: Path, settings: Settings,
                                              start_receiver: Any) -> None:
    receiver = start_receiver(settings.replace(spool_max_depth=2))
    files = []
    for i in range(4):
        make_instance(tmp_path / f"{i}.dcm")
        files.append(tmp_path / f"{i}.dcm")
    sent = pynetdicom_send(receiver.port, files)
    assert sent == [statuses.SUCCESS, statuses.SUCCESS, statuses.OUT_OF_RESOURCES,
                    statuses.OUT_OF_RESOURCES]
    assert Spool(settings.spool_dir).depth() == 2


def test_quarantine_list_and_replay(tmp_path: Path, settings: Settings, redis_url: str,
                                    start_worker: Any) -> None:
    """A conflict is quarantined under 'reject'; the operator switches to 'overwrite' and
    replays it: the newer object is archived and the quarantine is empty."""
    live = settings.replace(redis_url=redis_url)
    pipeline = Pipeline.from_settings(live)
    pipeline.spool.ensure()
    first, second, _, b = two_versions(tmp_path, pipeline)
    assert pipeline.process(first.receipt_id) is Outcome.ARCHIVED
    assert pipeline.process(second.receipt_id) is Outcome.QUARANTINED

    env = dict(os.environ) | environment(live)
    listing = run(cli("quarantine", "list"), env=env).stdout
    assert second.receipt_id in listing and "duplicate-conflict" in listing
    rows = [json.loads(line) for line in
            run(cli("quarantine", "list", "--json"), env=env).stdout.splitlines()]
    assert [(r["receipt_id"], r["reason"], r["calling_aet"]) for r in rows] == [
        (second.receipt_id, "duplicate-conflict", "TEST")]

    status = json.loads(run(cli("status", "--json"), env=env).stdout)
    assert status["quarantined"] == 1 and status["spool_depth"] == 0

    overwrite = live.replace(duplicate_policy="overwrite")
    start_worker(overwrite)
    out = run(cli("quarantine", "replay", "--all"),
              env=dict(os.environ) | environment(overwrite)).stdout
    assert f"replayed {second.receipt_id}" in out
    archive = Path(live.archive_url)
    wait_for(lambda: (archive / KEY).read_bytes() == b, 30, what="the replayed object")
    wait_for(lambda: pipeline.spool.depth() == 0, 30, what="an empty spool")
    assert "quarantine is empty" in run(cli("quarantine", "list"), env=env).stdout
    status = json.loads(run(cli("status", "--json"), env=env).stdout)
    assert status["quarantined"] == 0 and status["queue_length"] == 0
    assert status["workers"] and len(status["workers"]) == 1


def _s3_settings(settings: Settings, bucket: str, endpoint: str) -> Settings:
    return settings.replace(archive_url=f"s3://{bucket}", s3_endpoint=endpoint,
                            s3_secure=False)


def test_a_store_that_returns_other_bytes_is_caught(tmp_path: Path, settings: Settings,
                                                    bucket: str, s3_endpoint: str) -> None:
    """The S3 check rests on the bytes the service returns: a store (here a proxy) that gives
    back one byte changed fails the verification; the instance stays in the spool and is
    archived once the store is right again."""
    from tests.s3proxy import s3_proxy

    with s3_proxy(s3_endpoint) as (endpoint, faults):
        pipeline = Pipeline.from_settings(_s3_settings(settings, bucket, endpoint))
        pipeline.spool.ensure()
        make_instance(tmp_path / "a.dcm", **IDS)
        receipt = spool_entry(pipeline.spool, (tmp_path / "a.dcm").read_bytes())
        faults.corrupt_reads = True
        for _ in range(2):  # the retry too: the object's metadata does not vouch for it
            with pytest.raises(TransientError, match="does not match the spool"):
                pipeline.process(receipt.receipt_id)
            assert pipeline.spool.read_receipt(receipt.receipt_id) is not None
        assert any(seen.startswith("GET /") for seen in faults.seen)
        faults.corrupt_reads = False
        assert pipeline.process(receipt.receipt_id) is Outcome.ALREADY_ARCHIVED
        assert pipeline.spool.read_receipt(receipt.receipt_id) is None


@pytest.mark.parametrize(("status", "code", "kind"), [
    (403, "AccessDenied", "configuration"), (404, "NoSuchBucket", "configuration"),
    (503, "SlowDown", "transient"), (500, "InternalError", "transient"),
    (400, "EntityTooLarge", "unexpected"),
])
def test_storage_errors_are_classified_by_what_they_are(
        tmp_path: Path, settings: Settings, bucket: str, s3_endpoint: str, status: int,
        code: str, kind: str) -> None:
    """What the S3 service answers decides: a refusal an operator must fix is a
    ConfigurationError, a busy or failing service a TransientError (both retried, the
    instance kept), anything else surfaces as it is (a bug: the poison rule ends it)."""
    from minio.error import S3Error

    from tests.s3proxy import s3_proxy
    from workers.errors import ConfigurationError

    expected: type[Exception] = {"configuration": ConfigurationError,
                                 "transient": TransientError, "unexpected": S3Error}[kind]
    with s3_proxy(s3_endpoint) as (endpoint, faults):
        pipeline = Pipeline.from_settings(_s3_settings(settings, bucket, endpoint))
        pipeline.spool.ensure()
        make_instance(tmp_path / "a.dcm")
        receipt = spool_entry(pipeline.spool, (tmp_path / "a.dcm").read_bytes())
        faults.put_error = (status, code)
        for _ in range(pipeline.max_attempts):
            with pytest.raises(expected) as raised:
                pipeline.process(receipt.receipt_id)
            assert type(raised.value) is expected
            assert pipeline.spool.read_receipt(receipt.receipt_id) is not None
        faults.put_error = None
        if kind == "unexpected":  # each attempt was left open: the poison rule ends the loop
            assert pipeline.process(receipt.receipt_id) is Outcome.QUARANTINED
            reason = json.loads(pipeline.archive.read_bytes(
                f"quarantine/{receipt.receipt_id}.json"))
            assert reason["reason"] == "poison"
        else:  # retried, not counted against the object
            assert pipeline.process(receipt.receipt_id) is Outcome.ARCHIVED


def test_a_missing_bucket_is_a_configuration_error(tmp_path: Path, settings: Settings,
                                                   s3_endpoint: str) -> None:
    from workers.errors import ConfigurationError

    missing = _s3_settings(settings, "no-such-bucket", s3_endpoint)
    pipeline = Pipeline.from_settings(missing)
    pipeline.spool.ensure()
    make_instance(tmp_path / "a.dcm")
    receipt = spool_entry(pipeline.spool, (tmp_path / "a.dcm").read_bytes())
    with pytest.raises(ConfigurationError, match="NoSuchBucket"):
        pipeline.process(receipt.receipt_id)
    assert pipeline.spool.read_receipt(receipt.receipt_id) is not None
    # the operator's status says so too
    shown = run(cli("status", "--json"), env=dict(os.environ) | environment(missing))
    status = json.loads(shown.stdout)
    assert status["archive"].startswith("configuration error") and "NoSuchBucket" in \
        status["archive"]
    assert "fix its settings" in shown.stderr and status["spool_depth"] == 1


@pytest.mark.parametrize("policy", ["reject", "overwrite"])
def test_a_resent_dataset_is_one_object_and_a_different_one_is_a_conflict(
        tmp_path: Path, settings: Settings, start_receiver: Any, policy: str) -> None:
    """Through pynetdicom's path (the File Meta pynetdicom's handler writes): the same
    dataset from a second AE is already archived under either policy; a different dataset
    under the same SOP Instance UID is still the policy's to decide."""
    live = settings.replace(receiver_fast_path=False, duplicate_policy=policy)
    receiver = start_receiver(live)
    pipeline = Pipeline.from_settings(live)
    make_instance(tmp_path / "a.dcm", **IDS)
    make_instance(tmp_path / "b.dcm", **IDS)  # same UIDs, other pixels
    outcomes = []
    for calling, name in (("MODALITY", "a"), ("PACSFWD", "a"), ("OTHER", "b")):
        assert pynetdicom_send(receiver.port, [tmp_path / f"{name}.dcm"],
                               calling=calling) == [statuses.SUCCESS]
        (receipt_id,) = pipeline.spool.receipt_ids()
        outcomes.append(pipeline.process(receipt_id))
    conflict = Outcome.QUARANTINED if policy == "reject" else Outcome.ARCHIVED
    assert outcomes == [Outcome.ARCHIVED, Outcome.ALREADY_ARCHIVED, conflict]
    kept = "a" if policy == "reject" else "b"
    stored = (Path(live.archive_url) / KEY).read_bytes()
    assert split_part10(stored)[1] == split_part10((tmp_path / f"{kept}.dcm").read_bytes())[1]
