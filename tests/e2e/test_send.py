"""End to end: the real processes, DCMTK and pynetdicom as senders, the archive as the user
would check it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from ingest.keys import instance_key
from receiver import statuses
from tests.processes import Pipeline
from tests.support import (
    CORPUS,
    corpus_source,
    dcmtk,
    dcmtk_env,
    encode_dataset,
    free_port,
    hostile_dataset,
    make_instance,
    make_segmentation,
    objects_under,
    port_open,
    pynetdicom_send,
    raw_part10,
    run,
    split_part10,
    unique_copy,
    wait_for,
)

pytestmark = pytest.mark.e2e
CT = "1.2.840.10008.5.1.4.1.1.2"


def build_corpus(folder: Path) -> dict[str, Path]:
    """SOP Instance UID -> file: pydicom's corpus with unique UIDs, plus a segmentation."""
    folder.mkdir(parents=True)
    rng = random.Random(str(folder))
    out = {unique_copy(corpus_source(name), folder / name, rng): folder / name
           for name in sorted(CORPUS)}
    out[make_segmentation(folder / "seg.dcm")] = folder / "seg.dcm"
    return out


def dcmsend(port: int, folder: Path) -> subprocess.CompletedProcess[str]:
    return run([dcmtk("dcmsend"), "-aet", "DCMSEND", "-aec", "DICOM-INGEST", "127.0.0.1",
                str(port), "-v", "--scan-directories", "--no-halt", str(folder)], env=dcmtk_env())


def wire_bytes_by_dcmtk(folder: Path, tmp_path: Path) -> dict[tuple[str, str], bytes]:
    """What dcmsend puts on the wire for each file, as DCMTK's storescp records it with
    --bit-preserving: (SOP Instance UID, transfer syntax) -> dataset bytes. Two runs, one that
    prefers encoded transfer syntaxes and one that prefers explicit little endian, so that
    every choice a receiver can make is on record."""
    result = {}
    for preference in ("+xa", "+xe"):
        out_dir = tmp_path / f"storescp{preference}"
        out_dir.mkdir()
        port = free_port()
        proc = subprocess.Popen([dcmtk("storescp"), "+B", preference, "-od", str(out_dir),
                                 str(port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: port_open(port), 10, what="storescp")  # noqa: B023
            dcmsend(port, folder)
        finally:
            proc.terminate()
            proc.wait(10)
        for path in out_dir.iterdir():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid, ts = str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)
            result[(uid, ts)] = split_part10(path.read_bytes())[1]
    return result


UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def test_dcmsend_corpus_is_archived_bit_for_bit(pipeline: Pipeline, tmp_path: Path) -> None:
    """Every transfer syntax and SOP class of the corpus, sent by DCMTK's dcmsend, lands under
    its UIDs with the dataset bytes that were on the wire, and the spool ends empty."""
    files = build_corpus(tmp_path / "corpus")
    on_wire = wire_bytes_by_dcmtk(tmp_path / "corpus", tmp_path)
    assert {uid for uid, _ in on_wire} == set(files), "storescp did not record every instance"

    result = dcmsend(pipeline.port, tmp_path / "corpus")
    assert f"with status SUCCESS  : {len(files)}\n" in result.stdout + result.stderr, (
        result.stdout + result.stderr)

    expected = {}
    for uid, path in files.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected[instance_key("", ds.StudyInstanceUID, ds.SeriesInstanceUID, uid)] = uid

    wait_for(lambda: set(expected) <= set(objects_under(pipeline.archive)), 90, 0.1,
             "every instance archived")
    for key, uid in expected.items():
        data = (pipeline.archive / key).read_bytes()
        ds = pydicom.dcmread(pipeline.archive / key, stop_before_pixels=True)
        assert str(ds.SOPInstanceUID) == uid
        ts = str(ds.file_meta.TransferSyntaxUID)
        assert split_part10(data)[1] == on_wire[(uid, ts)], f"{key}: dataset bytes differ"
        original = str(pydicom.dcmread(files[uid], stop_before_pixels=True)
                       .file_meta.TransferSyntaxUID)
        # an encoded instance arrives as the sender holds it: we prefer its own encoding
        if original not in UNCOMPRESSED:
            assert ts == original, key
    assert not (pipeline.archive / "quarantine").exists()
    wait_for(lambda: not list((pipeline.settings.spool_dir / "entries").iterdir()), 10,
             what="an empty spool")


def test_hostile_inputs_are_quarantined_with_reasons(pipeline: Pipeline,
                                                     tmp_path: Path) -> None:
    """Sent raw with pynetdicom: each one is acked (it is durable), then quarantined with its
    reason; nothing reaches a key built from a bad UID; good neighbours are archived."""
    cases: dict[str, tuple[str, bytes]] = {}
    ds = hostile_dataset()
    cases["uid-mismatch"] = (generate_uid(), encode_dataset(ds))
    ds = hostile_dataset()
    cases["truncated"] = (ds.SOPInstanceUID, encode_dataset(ds)[:-5000])
    cases["unreadable-or-truncated"] = (generate_uid(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 9)
    ds = hostile_dataset(SeriesInstanceUID="1.2/../../3")
    cases["invalid-uid"] = (ds.SOPInstanceUID, encode_dataset(ds))
    ds = hostile_dataset(StudyInstanceUID=None)
    cases["missing-attribute"] = (ds.SOPInstanceUID, encode_dataset(ds))
    good = hostile_dataset()
    cases["good"] = (good.SOPInstanceUID, encode_dataset(good))

    paths = []
    for name, (request_uid, body) in cases.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(raw_part10(CT, request_uid, body))
        paths.append(path)
    sent = pynetdicom_send(pipeline.port, paths, calling="HOSTILE")
    assert sent == [statuses.SUCCESS] * len(paths)

    quarantine = pipeline.archive / "quarantine"
    good_key = instance_key("", good.StudyInstanceUID, good.SeriesInstanceUID,
                            good.SOPInstanceUID)
    wait_for(lambda: quarantine.exists() and len(list(quarantine.glob("*.json"))) == 5
             and good_key in objects_under(pipeline.archive), 60,
             what="five quarantine records and the good instance")
    import json

    reasons = sorted(json.loads(p.read_text())["reason"] for p in quarantine.glob("*.json"))
    assert reasons.count("uid-mismatch") == 1
    assert reasons.count("invalid-uid") == 1
    assert reasons.count("missing-attribute") == 1
    assert reasons.count("truncated") >= 1
    assert set(reasons) <= {"uid-mismatch", "invalid-uid", "missing-attribute", "truncated",
                            "unreadable"}
    for record in quarantine.glob("*.json"):
        body = json.loads(record.read_text())
        assert body["message"] and body["receipt"]["calling_aet"] == "HOSTILE"
        assert (quarantine / f"{record.stem}.dcm").exists()
    archived = [k for k in objects_under(pipeline.archive) if not k.startswith("quarantine/")]
    assert archived == [instance_key("", good.StudyInstanceUID, good.SeriesInstanceUID,
                                     good.SOPInstanceUID)]
    assert not any(".." in k for k in objects_under(pipeline.archive))
    wait_for(lambda: not list((pipeline.settings.spool_dir / "entries").iterdir()), 10,
             what="an empty spool")
    assert pipeline.processes["receiver"].poll() is None  # nothing crashed
    assert pipeline.processes["worker"].poll() is None


def test_storescu_echo_and_store(pipeline: Pipeline, tmp_path: Path) -> None:
    run([dcmtk("echoscu"), "-aec", "DICOM-INGEST", "127.0.0.1", str(pipeline.port)],
        env=dcmtk_env())
    from tests.support import cli

    assert "Success" in run(cli("echo", "--port", str(pipeline.port)), env=pipeline.env).stdout
    down = run(cli("echo", "--port", str(free_port())), env=pipeline.env, check=False)
    assert down.returncode == 1 and "no association" in down.stderr
    from tests.support import make_instance

    uid = make_instance(tmp_path / "ct.dcm", pixel_bytes=512 * 1024)
    run([dcmtk("storescu"), "-aec", "DICOM-INGEST", "127.0.0.1", str(pipeline.port),
         str(tmp_path / "ct.dcm")], env=dcmtk_env())
    found = wait_for(lambda: list(pipeline.archive.rglob(f"{uid}.dcm")), 30,
                     what="the archived instance")
    data = found[0].read_bytes()
    # the file we wrote has no group lengths or odd encodings, so storescu sends it as is
    assert split_part10(data)[1] == split_part10((tmp_path / "ct.dcm").read_bytes())[1]
    # the sha256 the archive recorded (its metadata) is the one of the bytes it holds
    recorded = os.getxattr(found[0], "user.dicom_ingest.sha256").decode()
    assert recorded == hashlib.sha256(data).hexdigest()
    assert os.getxattr(found[0], "user.dicom_ingest.calling-aet") == b"STORESCU"


def test_instances_acked_while_workers_are_down_are_archived_later(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """Workers stopped: the receiver still acks; the work waits in the spool and the queue;
    a worker started later archives all of it."""
    assert pipeline.stop("worker") == 0  # a warm shutdown
    files = []
    for i in range(5):
        from tests.support import make_instance

        make_instance(tmp_path / f"{i}.dcm")
        files.append(tmp_path / f"{i}.dcm")
    assert pynetdicom_send(pipeline.port, files) == [statuses.SUCCESS] * 5
    assert len(list((pipeline.settings.spool_dir / "entries").glob("*.dcm"))) == 5
    pipeline.start("worker")
    wait_for(lambda: len(objects_under(pipeline.archive)) == 5, 60, what="five objects")
    assert sorted(split_part10(p.read_bytes())[1] for p in objects_under(pipeline.archive)
                  .values()) == sorted(split_part10(f.read_bytes())[1] for f in files)


def test_sweep_command_reenqueues(pipeline: Pipeline, tmp_path: Path) -> None:
    """Entries that no task finished (here: the queue was flushed) are found by
    ``dicom-ingest sweep`` and archived."""
    import redis

    from tests.support import cli, make_instance

    pipeline.stop("worker")
    make_instance(tmp_path / "a.dcm")
    assert pynetdicom_send(pipeline.port, [tmp_path / "a.dcm"]) == [statuses.SUCCESS]
    pipeline.stop("receiver", signal.SIGTERM)  # no periodic sweeper either
    with redis.Redis.from_url(pipeline.settings.redis_url) as client:
        client.flushdb()  # Redis lost everything
    out = run(cli("sweep", "--age", "0.001"), env=pipeline.env).stdout
    assert "requeued 1" in out
    pipeline.start("worker")
    wait_for(lambda: len(objects_under(pipeline.archive)) == 1, 60, what="the object")


def test_a_sender_killed_mid_dataset_leaves_nothing_behind(pipeline: Pipeline,
                                                            tmp_path: Path) -> None:
    """storescu dies while a 256 MB instance is arriving: nothing was acked, so nothing is
    spooled; the half-received bytes are removed and the receiver serves the next sender."""
    from bench.corpus import make_large
    from tests.support import make_instance

    large = make_large(tmp_path / "large", 256)
    tmp = pipeline.settings.spool_dir / "tmp"

    def received_bytes() -> int:
        total = 0
        for path in tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    sender = subprocess.Popen([dcmtk("storescu"), "-aec", "DICOM-INGEST", "127.0.0.1",
                               str(pipeline.port), str(large)], env=dcmtk_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: received_bytes() > 16 * 2**20, 120, 0.005, "the dataset arriving")
    finally:
        sender.send_signal(signal.SIGKILL)
        sender.wait()
    wait_for(lambda: received_bytes() == 0, 30, what="the half-received bytes removed")
    assert list((pipeline.settings.spool_dir / "entries").iterdir()) == []
    assert "before the dataset was complete; nothing acked" in pipeline.log("receiver")
    uid = make_instance(tmp_path / "next.dcm")
    assert pynetdicom_send(pipeline.port, [tmp_path / "next.dcm"]) == [statuses.SUCCESS]
    wait_for(lambda: list(pipeline.archive.rglob(f"{uid}.dcm")), 30, what="the next instance")
    assert len(objects_under(pipeline.archive)) == 1


@pytest.mark.parametrize("store", ["directory", "s3"])
def test_the_same_instance_from_two_senders_is_archived_once(
        tmp_path: Path, redis_url: str, store: str, request: pytest.FixtureRequest) -> None:
    """A modality sends an instance, then a PACS forwards the identical file under its own AE
    title: the receiver's File Meta differs (it names the sender), the dataset does not, so
    the archive keeps one object and quarantines nothing; the log names the second sender."""
    from tests.processes import start_pipeline

    overrides: dict[str, object] = {}
    if store == "s3":
        bucket, endpoint = request.getfixturevalue("bucket"), request.getfixturevalue(
            "s3_endpoint")
        overrides = {"archive_url": f"s3://{bucket}", "s3_endpoint": endpoint,
                     "s3_secure": False, "s3_access_key": "test", "s3_secret_key": "test",
                     "s3_region": "us-east-1"}
    source = tmp_path / "sent" / "ct.dcm"
    source.parent.mkdir()
    uid = make_instance(source, pixel_bytes=20_000)
    meta = pydicom.dcmread(source)
    key = instance_key("", meta.StudyInstanceUID, meta.SeriesInstanceUID, uid)
    with start_pipeline(tmp_path, redis_url, **overrides) as running:
        spool = running.settings.spool_dir / "entries"
        for calling in ("MODALITY", "PACSFWD"):
            run([dcmtk("dcmsend"), "-aet", calling, "-aec", "DICOM-INGEST", "127.0.0.1",
                 str(running.port), str(source)], env=dcmtk_env())
            wait_for(lambda: not list(spool.iterdir()), 60, what="the spool to empty")
        log = running.log("worker")
    assert "now sent by PACSFWD (the archived copy came from MODALITY)" in log, log
    if store == "directory":
        assert sorted(objects_under(running.archive)) == [key]
        stored = (running.archive / key).read_bytes()
    else:
        client = request.getfixturevalue("minio_client")
        names = sorted(o.object_name for o in client.list_objects(bucket, recursive=True))
        assert names == [key]
        stored = client.get_object(bucket, key).read()
    assert split_part10(stored)[1] == split_part10(source.read_bytes())[1]
    first = pydicom.dcmread(io.BytesIO(stored), stop_before_pixels=True).file_meta
    assert first.SourceApplicationEntityTitle.strip() == "MODALITY"
