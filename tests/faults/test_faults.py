"""Real faults while a real sender streams: the invariant is that every instance that got
0x0000 is archived exactly once under its key with its bytes, the spool ends empty and no
temp file is left behind. Each scenario also shows, from the outside, that its fault
happened where it claims: a C-STORE in flight, a task under way, a status the sender heard,
a worker killed on the same object each time."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.spool import Spool
from receiver import statuses
from tests.faults.harness import (
    Row,
    Stream,
    TcpProxy,
    alive,
    assert_invariant,
    children,
    cmdline,
    count_into,
    frozen_mid_task,
    holders,
    instances,
    key_of,
    signal_all,
    sop_of,
)
from tests.processes import Pipeline
from tests.support import free_port, make_instance, objects_under, pynetdicom_send, wait_for

pytestmark = pytest.mark.faults
MB = 1024 * 1024


def test_worker_killed_mid_task(row: Row, pipeline: Pipeline, tmp_path: Path) -> None:
    """The worker (main process and pool) is killed while tasks are under way: an entry's
    attempt begun and not ended at the kill. The restarted worker finishes those entries."""
    row.scenario = "worker SIGKILL mid-task, restarted"
    files = instances(tmp_path / "in", 40, size=MB)
    sops = {sop_of(p): p for p in files}
    stream = Stream(pipeline.port, files).start()
    row.watch(stream, pipeline)
    wait_for(lambda: len(objects_under(pipeline.archive)) >= 5, 60, what="archiving started")
    worker = pipeline.processes.pop("worker")
    spool = Spool(pipeline.settings.spool_dir)
    with frozen_mid_task(worker.pid, spool.root) as (pids, unfinished):
        under_way = {rid: spool.read_receipt(rid) for rid in unfinished}
        signal_all(pids, signal.SIGKILL)
    row.fault = f"{len(unfinished)} task(s) under way at the kill"
    worker.wait(10)
    assert unfinished, "no task was under way at the kill"
    stream.wait()
    log_before = len(pipeline.log("worker"))
    pipeline.start("worker", keep_log=True)
    assert len(stream.acked) == len(files)
    assert_invariant(pipeline, stream.acked)
    after = pipeline.log("worker")[log_before:]
    for rid, receipt in under_way.items():
        assert receipt is not None and receipt.sop_instance_uid in sops
        assert f"archived receipt={rid}" in after, f"{rid} was not finished after the restart"


def test_receiver_killed_mid_c_store(row: Row, pipeline: Pipeline, tmp_path: Path) -> None:
    """The receiver is killed while a large instance is half-way in: its bytes are in the
    spool's tmp/, no answer went out. The sender hears no status for it; its retry after
    the restart is archived once, and the half-received file is swept away."""
    row.scenario = "receiver SIGKILL mid-C-STORE, restarted"
    first = instances(tmp_path / "first", 10)
    big = tmp_path / "big.dcm"
    make_instance(big, pixel_bytes=32 * MB)
    rest = instances(tmp_path / "rest", 5)
    # the proxy passes the small ones and half of the big one, then holds: the receiver
    # cannot have the whole dataset, so it cannot have answered it
    half = sum(p.stat().st_size for p in first) + big.stat().st_size // 2
    proxy = TcpProxy(free_port(), pipeline.port, hold_after=half).start()
    try:
        stream = Stream(proxy.listen, [*first, big, *rest], pause=0).start()
        row.watch(stream, pipeline)
        assert proxy.holding.wait(60), "the transfer never got half-way"
        tmp = pipeline.settings.spool_dir / "tmp"

        def partial() -> list[Path]:  # the instance arriving: a temp file with its bytes
            return [p for p in tmp.iterdir() if p.stat().st_size >= MB]

        in_flight = wait_for(partial, 30, what="the big instance's bytes in the spool's tmp/")
        assert big not in stream.statuses, "the big instance was answered before the kill"
        receiver = pipeline.processes["receiver"].pid
        pipeline.stop("receiver", signal.SIGKILL)
        assert not alive(receiver)
        received = in_flight[0].stat().st_size
        row.fault = (f"{received / MB:.0f} of {big.stat().st_size / MB:.0f} MB in, no answer; "
                     "sender heard none")
        stream.wait()
    finally:
        proxy.stop()
    assert stream.statuses[big] is None, "the sender heard a status for the instance in flight"
    assert stream.acked == first
    assert in_flight[0].exists(), "the half-received file should wait for the sweeper"
    assert not any(p.name.startswith(in_flight[0].name) for p in
                   (pipeline.settings.spool_dir / "entries").iterdir())
    pipeline.start("receiver")  # its sweeper removes the dead one's temp file
    retry = [big, *rest]  # what the sender still holds: the failed one and the unsent ones
    retried = pynetdicom_send(pipeline.port, retry)
    row.also_sent = dict(zip(retry, retried, strict=True))
    assert retried == [statuses.SUCCESS] * len(retry)
    assert_invariant(pipeline, [*first, *retry])
    assert not in_flight[0].exists()
    big_sop = sop_of(big)
    assert pipeline.log("worker").count(f"sop={big_sop}") == 1, "the retry was not archived once"


def test_redis_killed_and_restarted_empty_mid_stream(row: Row, tmp_path: Path) -> None:
    """Redis dies (SIGKILL) mid-stream and comes back empty. The receiver is not restarted:
    it keeps acking (the publish fails, the entry is durable), and its own sweeper
    re-enqueues everything."""
    from ingest.embedded import EmbeddedRedis
    from tests.processes import start_pipeline

    row.scenario = "Redis SIGKILL mid-stream, restarted empty"
    redis = EmbeddedRedis(tmp_path / "redis", persist=False)
    redis.start()
    try:
        with start_pipeline(tmp_path, redis.url) as pipeline:
            receiver = pipeline.processes["receiver"].pid
            files = instances(tmp_path / "in", 40)
            stream = Stream(pipeline.port, files, pause=0.05).start()
            row.watch(stream, pipeline)
            wait_for(lambda: len(stream.statuses) >= 10, 60, what="ten instances sent")
            assert redis.process is not None
            killed = redis.process.pid
            redis.process.kill()
            redis.process.wait()
            wait_for(lambda: len(stream.statuses) >= 25, 60, what="sends while Redis is down")
            redis.start()  # same port, nothing in it
            assert redis.process is not None and redis.process.pid != killed
            row.fault = "Redis pid changed, receiver pid kept"
            stream.wait()
            assert len(stream.acked) == len(files)
            # Celery 5.7's worker can give up when its broker vanishes ("Unrecoverable error":
            # kombu's Redis transport fails restoring unacked messages on the closed
            # connection); Compose and Kubernetes restart it, and so does this harness: the
            # worker only
            keys = {key_of(p) for p in stream.acked}
            wait_for(lambda: pipeline.restart_dead(roles=("worker",))
                     or keys <= set(objects_under(pipeline.archive)), 120, 0.5,
                     "everything archived, restarting a worker that died")
            if pipeline.restarts:
                row.fault += f"; worker restarted {pipeline.restarts}x"
            assert_invariant(pipeline, stream.acked)
            assert pipeline.processes["receiver"].pid == receiver and alive(receiver), \
                f"the receiver died when Redis did: {pipeline.log('receiver')[-3000:]}"
            assert "requeued=" in pipeline.log("receiver"), "the sweeper re-enqueued nothing"
    finally:
        redis.stop()


def test_publisher_killed_mid_stream(row: Row, pipeline: Pipeline, tmp_path: Path) -> None:
    """The receiver's publisher process (``python -m receiver.publisher``) is killed while
    instances arrive: the receiver starts another; what the dead one had not pushed, the
    sweeper enqueues. The receiver itself keeps running."""
    row.scenario = "publisher SIGKILL mid-stream"
    receiver = pipeline.processes["receiver"].pid

    def publishers() -> list[int]:
        return [p for p in children(receiver) if "receiver.publisher" in cmdline(p)]

    first = wait_for(publishers, 30, what="the publisher process")[0]
    files = instances(tmp_path / "in", 40)
    stream = Stream(pipeline.port, files).start()
    row.watch(stream, pipeline)
    wait_for(lambda: len(stream.statuses) >= 10, 60, what="ten instances sent")
    signal_all([first], signal.SIGKILL)
    wait_for(lambda: not alive(first), 10, what="the publisher gone")
    acked_at_kill = len(stream.statuses)
    stream.wait()
    assert acked_at_kill < len(files), "the kill came after the stream"
    replaced = wait_for(lambda: [p for p in publishers() if p != first], 30,
                        what="another publisher process")
    row.fault = f"publisher pid {first} -> {replaced[0]}; receiver pid kept"
    assert len(stream.acked) == len(files)
    assert_invariant(pipeline, stream.acked)
    assert pipeline.processes["receiver"].pid == receiver and alive(receiver)
    assert "publisher process gone" in pipeline.log("receiver")


def test_worker_warm_shutdown_mid_task(row: Row, pipeline: Pipeline, tmp_path: Path) -> None:
    """SIGTERM reaches the worker while tasks are under way: it stops taking new ones and
    finishes those (their entries archived and gone before it exits 0)."""
    row.scenario = "worker SIGTERM mid-task (warm shutdown)"
    files = instances(tmp_path / "in", 12, size=8 * MB)
    stream = Stream(pipeline.port, files, pause=0).start()
    row.watch(stream, pipeline)
    worker = pipeline.processes.pop("worker")
    spool = Spool(pipeline.settings.spool_dir)
    with frozen_mid_task(worker.pid, spool.root) as (_, unfinished):
        worker.send_signal(signal.SIGTERM)  # delivered as the worker goes on
    row.fault = f"{len(unfinished)} task(s) under way at SIGTERM"
    assert worker.wait(60) == 0, "the worker did not stop cleanly"
    assert unfinished, "no task was under way at SIGTERM"
    stream.wait()
    log = pipeline.log("worker")
    for rid in unfinished:
        assert not spool.dcm_path(rid).exists(), f"{rid} was left unfinished by the shutdown"
        assert f"archived receipt={rid}" in log
    row.fault += ", finished before the worker exited"
    assert "warm shutdown" in log
    pipeline.start("worker", keep_log=True)
    assert len(stream.acked) == len(files)
    assert_invariant(pipeline, stream.acked)


def test_poison_object_kills_its_worker(row: Row, tmp_path: Path, redis_url: str) -> None:
    """The worker process handling one object is killed every time it handles it (as a bug
    that crashes the interpreter would): after ``INGEST_POISON_MAX_ATTEMPTS`` unfinished
    attempts the next delivery quarantines it as ``poison``; the good ones are archived."""
    from tests.processes import start_pipeline

    row.scenario = "poison: a worker killed on one object each time"
    max_attempts = 3
    with start_pipeline(tmp_path, redis_url, poison_max_attempts=max_attempts) as pipeline:
        poison = tmp_path / "poison.dcm"
        make_instance(poison, pixel_bytes=32 * MB)  # long enough to be caught at it
        good = instances(tmp_path / "in", 3)
        worker = pipeline.processes["worker"].pid
        spool = Spool(pipeline.settings.spool_dir)
        heard = pynetdicom_send(pipeline.port, [poison])
        row.sent, row.acked = 1, heard.count(statuses.SUCCESS)
        count_into(row, pipeline, [])
        assert heard == [statuses.SUCCESS]
        (rid,) = wait_for(lambda: [r for r in spool.receipt_ids()], 10, what="the entry")
        kills = []
        for attempt in range(1, max_attempts + 1):
            with frozen_mid_task(worker, spool.root,
                                 wanted=lambda a, n=attempt: a.get(rid) == n) as (pids, _):
                handling = holders(pids[1:], spool.dcm_path(rid))
                assert len(handling) == 1, f"attempt {attempt}: no one process handles it"
                signal_all(handling, signal.SIGKILL)
                kills.append(handling[0])
            row.fault = f"{len(kills)} pool process(es) killed on it"
        heard += pynetdicom_send(pipeline.port, good)
        row.sent, row.acked = len(heard), heard.count(statuses.SUCCESS)
        count_into(row, pipeline, good)
        assert heard == [statuses.SUCCESS] * 4
        (reason_file,) = wait_for(lambda: list((pipeline.archive / "quarantine").glob("*.json")),
                                  60, what="the object quarantined")
        assert_invariant(pipeline, good, quarantined=1)
        reason = json.loads(reason_file.read_text())
        row.fault += f", then quarantined as '{reason['reason']}'"
        assert reason["reason"] == "poison", reason
        assert reason["receipt"]["receipt_id"] == rid
        assert key_of(poison) not in objects_under(pipeline.archive)
        assert pipeline.processes["worker"].pid == worker and alive(worker)
        assert pipeline.log("worker").count("quarantined receipt=") == 1


def test_undecodable_object_is_quarantined_once(row: Row, pipeline: Pipeline,
                                                tmp_path: Path) -> None:
    """An object that can never be decoded is quarantined on its first attempt, and nothing
    brings it back: no retry loop, no sweeper loop."""
    from pydicom.uid import generate_uid

    from tests.support import raw_part10

    row.scenario = "undecodable object among good ones"
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(raw_part10("1.2.840.10008.5.1.4.1.1.2", generate_uid(),
                               b"\x08\x00\x16\x00UI\xff\xff" + b"\xde\xad" * 1000))
    good = instances(tmp_path / "in", 3)
    sent = pynetdicom_send(pipeline.port, [bad, *good])
    row.sent, row.acked = 4, sent.count(statuses.SUCCESS)
    count_into(row, pipeline, good)
    assert sent == [statuses.SUCCESS] * 4
    row.fault = "quarantined at its first attempt"
    # nothing to poll for: what must not happen is a second quarantine, by a later sweep
    time.sleep(pipeline.settings.sweep_age + 2 * pipeline.settings.sweep_interval)
    assert_invariant(pipeline, good, quarantined=1)
    assert pipeline.log("worker").count("quarantined receipt=") == 1


def test_s3_down_then_back(row: Row, tmp_path: Path, redis_url: str, s3_endpoint: str,
                           bucket: str, minio_client: Any) -> None:
    """The S3 service is unreachable while instances arrive: tasks retry with backoff, the
    spool keeps the data; once S3 answers, everything is archived."""
    from tests.processes import start_pipeline

    row.scenario = "S3 down, then back"
    client = minio_client
    proxy_port = free_port()
    proxy = TcpProxy(proxy_port, int(s3_endpoint.rsplit(":", 1)[1]))
    with start_pipeline(tmp_path, redis_url, archive_url=f"s3://{bucket}",
                        s3_endpoint=f"http://127.0.0.1:{proxy_port}",
                        s3_access_key="test", s3_secret_key="test",
                        s3_region="us-east-1") as pipeline:
        files = instances(tmp_path / "in", 10)
        stream = Stream(pipeline.port, files).start().wait()
        row.sent, row.acked = len(stream.statuses), len(stream.acked)
        row.keys = {key_of(p) for p in stream.acked}
        row.listing = lambda: [o.object_name for o in client.list_objects(bucket, recursive=True)]
        assert len(stream.acked) == len(files)
        wait_for(lambda: "transient failure" in pipeline.log("worker"), 60,
                 what="a failed attempt against the closed port")
        row.fault = "tasks failed transiently while it was down"
        assert len(list((pipeline.settings.spool_dir / "entries").glob("*.dcm"))) == 10
        proxy.start()
        try:
            wait_for(lambda: row.keys <= {o.object_name for o in
                                          client.list_objects(bucket, recursive=True)},
                     120, 0.5, "every instance in the bucket")
            wait_for(lambda: not list((pipeline.settings.spool_dir / "entries").iterdir()),
                     30, what="an empty spool")
        finally:
            proxy.stop()


def test_catalog_database_down_then_back(row: Row, tmp_path: Path, redis_url: str,
                                        postgres: str, postgres_server: Any) -> None:
    """The catalog's PostgreSQL stops while instances arrive: archived objects wait in the
    spool for their row (the tasks fail transiently, naming the database); once it is back,
    every acked instance is archived and catalogued, and the spool is empty."""
    from ingest.catalog import Catalog
    from tests.processes import start_pipeline

    row.scenario = "catalog PostgreSQL stopped mid-stream, back"
    with start_pipeline(tmp_path, redis_url, catalog_url=postgres) as pipeline:
        files = instances(tmp_path / "in", 20)
        stream = Stream(pipeline.port, files, pause=0.05).start()
        row.watch(stream, pipeline)
        wait_for(lambda: len(stream.statuses) >= 5, 60, what="five instances sent")
        postgres_server.stop()
        try:
            wait_for(lambda: "transient failure" in pipeline.log("worker")
                     and "catalog postgresql://***@127.0.0.1" in pipeline.log("worker"), 60,
                     what="a task failing on the stopped database")
            stream.wait()
            waiting = len(list((pipeline.settings.spool_dir / "entries").glob("*.dcm")))
            row.fault = (f"tasks failed transiently naming the database; {waiting} entries "
                         "waited in the spool")
        finally:
            postgres_server.start()
        assert waiting, "nothing waited for the catalog: the outage proved nothing"
        assert len(stream.acked) == len(files)
        assert_invariant(pipeline, stream.acked)
        sops = {sop_of(p) for p in stream.acked}
        catalog = Catalog.open(postgres)
        try:
            rows = catalog.by_sop(sops)
        finally:
            catalog.close()
        assert set(rows) == sops, f"not catalogued: {sorted(sops - set(rows))}"
        assert {r.key for found in rows.values() for r in found} == {
            key_of(p) for p in stream.acked}
        row.fault += f"; {len(rows)} catalogued"


@contextlib.contextmanager
def small_filesystem(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` at ``path`` (root only: skips locally, fails under CI)."""
    from tests.support import need

    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                              str(path)], capture_output=True).returncode == 0
    need(mounted, "mounting a small tmpfs (root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("floor_mb", [0, 3])
def test_spool_disk_full(row: Row, tmp_path: Path, redis_url: str, floor_mb: int) -> None:
    """The spool's filesystem fills up (no floor) or reaches its floor: the sender hears a
    refusal (0xA7xx), never 0x0000 for what is not on disk and never a dropped association;
    nothing half-written is archived; once workers drain the spool, everything acked is
    archived and no temp file is left."""
    from tests.processes import start_pipeline

    row.scenario = f"spool disk full (floor {floor_mb} MB)"
    with small_filesystem(tmp_path / "small", 8) as small, start_pipeline(
        tmp_path, redis_url, spool_dir=small / "spool", spool_min_free_mb=floor_mb
    ) as pipeline:
        receiver = pipeline.processes["receiver"].pid
        pipeline.stop("worker")  # nothing drains the spool: it must fill
        files = instances(tmp_path / "in", 30, size=512 * 1024)
        stream = Stream(pipeline.port, files, pause=0).start()
        row.watch(stream, pipeline)
        stream.wait()
        refused = {p: s for p, s in stream.statuses.items() if s != statuses.SUCCESS}
        row.fault = "refusals heard: " + (", ".join(
            sorted({"none" if s is None else f"0x{s:04X}" for s in refused.values()})) or "-")
        assert refused, "the spool never filled"
        assert len(stream.statuses) == len(files), "the association ended before the last"
        assert all(s is not None and 0xA700 <= s <= 0xA7FF for s in refused.values()), \
            f"a refusal the sender did not hear as 0xA7xx: {sorted(set(refused.values()), key=str)}"
        assert pipeline.processes["receiver"].pid == receiver and alive(receiver)
        pipeline.start("worker")
        assert_invariant(pipeline, stream.acked)


def test_task_slower_than_visibility_timeout(row: Row, tmp_path: Path, redis_url: str,
                                             s3_endpoint: str, bucket: str,
                                             minio_client: Any) -> None:
    """Each archive takes longer than the broker's visibility timeout, so Redis hands the task
    to a second worker process while the first still runs it: still one object per instance
    (one version in a versioned bucket), nothing quarantined."""
    from minio.versioningconfig import ENABLED, VersioningConfig

    from tests.processes import start_pipeline

    row.scenario = "task slower than the visibility timeout"
    client = minio_client
    client.set_bucket_versioning(bucket, VersioningConfig(ENABLED))
    proxy_port = free_port()
    proxy = TcpProxy(proxy_port, int(s3_endpoint.rsplit(":", 1)[1]), delay=1.5)
    proxy.start()
    try:
        with start_pipeline(tmp_path, redis_url, archive_url=f"s3://{bucket}",
                            s3_endpoint=f"http://127.0.0.1:{proxy_port}", s3_access_key="test",
                            s3_secret_key="test", s3_region="us-east-1",
                            visibility_timeout=2, sweep_age=600) as pipeline:
            files = instances(tmp_path / "in", 3)
            stream = Stream(pipeline.port, files).start().wait()
            row.sent, row.acked = len(stream.statuses), len(stream.acked)
            row.keys = {key_of(p) for p in stream.acked}
            # every version counts: a second copy of an instance shows as one more
            row.listing = lambda: [v.object_name for v in client.list_objects(
                bucket, recursive=True, include_version=True)]
            assert len(stream.acked) == 3
            wait_for(lambda: not list((pipeline.settings.spool_dir / "entries").iterdir()),
                     120, 0.5, "an empty spool")
            versions = list(row.listing())
            assert sorted(versions) == sorted(row.keys)
            log = pipeline.log("worker")
            assert "'busy'" in log or "'gone'" in log or "'already-archived'" in log, \
                "no duplicate delivery happened: the scenario proved nothing"
            row.fault = "a second delivery while the first ran"
    finally:
        proxy.stop()


def test_same_instance_sent_twice(row: Row, pipeline: Pipeline, tmp_path: Path) -> None:
    """A modality resends a study (same SOP Instance UIDs, same bytes): one object each."""
    row.scenario = "same instances sent twice"
    files = instances(tmp_path / "in", 5)
    first, second = pynetdicom_send(pipeline.port, files), pynetdicom_send(pipeline.port, files)
    row.sent, row.acked = 10, (first + second).count(statuses.SUCCESS)
    count_into(row, pipeline, files)
    assert first == second == [statuses.SUCCESS] * 5
    assert_invariant(pipeline, files)
    assert len(objects_under(pipeline.archive)) == 5
    row.fault = "each instance received twice"


def test_webhook_target_down_for_a_while(row: Row, tmp_path: Path, redis_url: str) -> None:
    """The webhook's target refuses connections while studies arrive and become stable: their
    events wait in the outbox, retried with backoff; once it answers, every study is
    announced, each id with one body, its counts those of what was acked, none dropped."""
    from pydicom.uid import generate_uid

    from ingest.catalog import Catalog
    from ingest.studies import Studies
    from tests.processes import start_pipeline
    from tests.support.consumers import WebhookServer

    row.scenario = "webhook target down, then back"
    hook = WebhookServer()  # not started: its port refuses connections
    studies_sent = {}
    files: list[Path] = []
    for s in range(4):
        study = generate_uid()
        studies_sent[study] = 3
        for n in range(3):
            files.append(tmp_path / "in" / f"{s}-{n}.dcm")
            files[-1].parent.mkdir(exist_ok=True)
            make_instance(files[-1], study=study)
    with start_pipeline(tmp_path, redis_url, study_stable_seconds=1.5,
                        on_study_webhook=hook.url, webhook_secret="k") as pipeline:
        stream = Stream(pipeline.port, files).start()
        row.watch(stream, pipeline)
        row.listing = lambda: objects_under(pipeline.archive)
        stream.wait()
        assert len(stream.acked) == len(files)
        catalog = Catalog.open(pipeline.settings.catalog_url)
        try:
            studies = Studies(catalog)
            wait_for(lambda: studies.pending_count() == 4 and pipeline.log("worker").count(
                "webhook failed") >= 8, 90, 0.2, "4 events pending, each refused twice")
            refused = pipeline.log("worker").count("webhook failed")
            row.fault = f"{refused} POSTs refused while down; 4 events waited in the outbox"
            hook.start()
            try:
                wait_for(lambda: studies.pending_count() == 0, 120, 0.2, "every event delivered")
            finally:
                hook.stop()
        finally:
            catalog.close()
        assert_invariant(pipeline, stream.acked)
    delivered: dict[str, set[bytes]] = {}
    for post in hook.posts:
        assert post.status == 200 and post.signed_with("k")
        delivered.setdefault(post.json["event_id"], set()).add(post.body)
    assert sorted(delivered) == sorted(f"{study}:1" for study in studies_sent)
    for event_id, bodies in delivered.items():
        [body] = bodies
        assert json.loads(body)["instances"] == studies_sent[event_id.split(":")[0]]
