"""Real faults while a real sender streams: the invariant is that every instance that got
0x0000 is archived exactly once under its key with its bytes, the spool ends empty and no
temp file is left behind."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from ingest.keys import instance_key
from ingest.scu import associate
from ingest.spool import in_use
from receiver import statuses
from tests.processes import Pipeline
from tests.support import make_instance, objects_under, split_part10, wait_for

pytestmark = pytest.mark.faults
#: (scenario, sent, acked, archived, quarantined, lost), printed at the end of the run
RESULTS: list[tuple[str, int, int, int, int, int]] = []


@dataclass
class Stream:
    """A pynetdicom sender on its own thread, one association, recording what it saw."""

    port: int
    files: list[Path]
    pause: float = 0.02
    statuses: dict[Path, int | None] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Stream:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        from pynetdicom import AE, _config

        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            ae = AE(ae_title="FAULTS")
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
            assoc = associate(ae, "127.0.0.1", self.port, ae_title="DICOM-INGEST")
            for path in self.files:
                if not assoc.is_established:
                    break
                try:
                    rsp = assoc.send_c_store(path)
                    self.statuses[path] = int(rsp.Status) if "Status" in rsp else None
                except Exception:
                    self.statuses[path] = None
                    break
                time.sleep(self.pause)
            if assoc.is_established:
                assoc.release()
        finally:
            self.done.set()

    @property
    def acked(self) -> list[Path]:
        return [p for p, s in self.statuses.items() if s == statuses.SUCCESS]

    def wait(self, timeout: float = 120) -> Stream:
        assert self.done.wait(timeout), "the sender did not finish"
        return self


def instances(folder: Path, count: int, size: int = 64 * 1024) -> list[Path]:
    folder.mkdir(exist_ok=True)
    out = []
    for i in range(count):
        make_instance(folder / f"{i:04d}.dcm", pixel_bytes=size)
        out.append(folder / f"{i:04d}.dcm")
    return out


def key_of(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return instance_key("", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def assert_invariant(pipeline: Pipeline, acked: list[Path], timeout: float = 120,
                     scenario: str = "", sent: int = 0, quarantined: int = 0,
                     acked_count: int | None = None) -> None:
    """Every acked instance archived with its bytes; spool and temp dir empty."""
    assert acked, "nothing was acked: the scenario proved nothing"
    keys = {key_of(p): p for p in acked}
    wait_for(lambda: set(keys) <= set(objects_under(pipeline.archive)), timeout, 0.2,
             f"{len(keys)} acked instances archived")
    archived = objects_under(pipeline.archive)
    for key, path in keys.items():
        assert split_part10(archived[key].read_bytes())[1] == split_part10(path.read_bytes())[1]
    in_quarantine = [k for k in archived if k.startswith("quarantine/") and k.endswith(".json")]
    assert len(in_quarantine) == quarantined
    entries = pipeline.settings.spool_dir / "entries"
    wait_for(lambda: not list(entries.iterdir()), timeout, 0.2, "an empty spool")
    tmp = pipeline.settings.spool_dir / "tmp"

    def leftovers() -> list[Path]:
        # what may stay: the running receiver's spare temp files, empty and locked
        return [p for p in tmp.iterdir() if p.stat().st_size or not in_use(p)]

    wait_for(lambda: not leftovers(), timeout, 0.2, "no temp files left")
    good = [k for k in objects_under(pipeline.archive) if not k.startswith("quarantine/")]
    lost = len(set(keys) - set(good))
    acked_count = len(acked) if acked_count is None else acked_count
    RESULTS.append((scenario, sent or acked_count, acked_count, len(good), quarantined, lost))


def test_worker_killed_mid_stream(pipeline: Pipeline, tmp_path: Path) -> None:
    files = instances(tmp_path / "in", 40)
    stream = Stream(pipeline.port, files).start()
    wait_for(lambda: len(objects_under(pipeline.archive)) >= 5, 60, what="archiving started")
    worker = pipeline.processes["worker"]
    subprocess.run(["pkill", "-KILL", "-P", str(worker.pid)], check=False)  # pool children
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    pipeline.processes.pop("worker")
    stream.wait()
    pipeline.start("worker")
    assert len(stream.acked) == len(files)
    assert_invariant(pipeline, stream.acked, scenario="worker SIGKILL mid-stream, restarted",
                     sent=len(files))


def test_receiver_killed_mid_association(pipeline: Pipeline, tmp_path: Path) -> None:
    files = instances(tmp_path / "in", 60)
    stream = Stream(pipeline.port, files).start()
    wait_for(lambda: len(stream.statuses) >= 10, 60, what="ten instances sent")
    pipeline.stop("receiver", signal.SIGKILL)
    stream.wait()
    failed = [p for p, s in stream.statuses.items() if s != statuses.SUCCESS]
    assert len(failed) <= 1  # only the one in flight may fail
    pipeline.start("receiver")  # its sweeper removes the dead one's temp file, if any
    assert_invariant(pipeline, stream.acked, scenario="receiver SIGKILL mid-association",
                     sent=len(stream.statuses))


def test_redis_killed_and_restarted_empty_mid_stream(tmp_path: Path) -> None:
    """Redis dies (SIGKILL) mid-stream and comes back empty: the receiver keeps acking (the
    publish fails, the entry is durable), and its own sweeper re-enqueues everything."""
    from ingest.embedded import EmbeddedRedis
    from tests.processes import start_pipeline

    redis = EmbeddedRedis(tmp_path / "redis", persist=False)
    redis.start()
    try:
        with start_pipeline(tmp_path, redis.url) as pipeline:
            files = instances(tmp_path / "in", 40)
            stream = Stream(pipeline.port, files, pause=0.05).start()
            wait_for(lambda: len(stream.statuses) >= 10, 60, what="ten instances sent")
            assert redis.process is not None
            redis.process.kill()
            redis.process.wait()
            wait_for(lambda: len(stream.statuses) >= 25, 60, what="sends while Redis is down")
            redis.start()  # same port, nothing in it
            stream.wait()
            assert len(stream.acked) == len(files)
            # Celery 5.7's worker can give up when its broker vanishes ("Unrecoverable
            # error"); Compose and Kubernetes restart it, and so does this harness
            keys = {key_of(p) for p in stream.acked}
            wait_for(lambda: pipeline.restart_dead()
                     or keys <= set(objects_under(pipeline.archive)), 120, 0.5,
                     "everything archived, restarting what died")
            assert_invariant(pipeline, stream.acked, scenario="Redis SIGKILL mid-stream, "
                             "restarted empty" + (f" ({pipeline.restarts} worker restart)"
                                                  if pipeline.restarts else ""))
    finally:
        redis.stop()


def test_s3_down_then_back(tmp_path: Path, redis_url: str, s3_endpoint: str,
                           bucket: str) -> None:
    """The S3 service is unreachable while instances arrive: tasks retry with backoff, the
    spool keeps the data; once S3 answers, everything is archived."""
    from tests.processes import start_pipeline
    from tests.support import free_port

    proxy_port = free_port()
    proxy = TcpProxy(proxy_port, int(s3_endpoint.rsplit(":", 1)[1]))
    with start_pipeline(tmp_path, redis_url, archive_url=f"s3://{bucket}",
                        s3_endpoint=f"http://127.0.0.1:{proxy_port}",
                        s3_access_key="test", s3_secret_key="test",
                        s3_region="us-east-1") as pipeline:
        files = instances(tmp_path / "in", 10)
        stream = Stream(pipeline.port, files).start().wait()
        assert len(stream.acked) == len(files)
        time.sleep(1.0)  # let the first attempts fail against the closed port
        assert len(list((pipeline.settings.spool_dir / "entries").glob("*.dcm"))) == 10
        proxy.start()
        try:
            from minio import Minio

            client = Minio(s3_endpoint.split("://")[1], access_key="test", secret_key="test",
                           secure=False, region="us-east-1")
            keys = {key_of(p) for p in files}
            wait_for(lambda: keys <= {o.object_name for o in
                                      client.list_objects(bucket, recursive=True)},
                     120, 0.5, "every instance in the bucket")
            wait_for(lambda: not list((pipeline.settings.spool_dir / "entries").iterdir()),
                     30, what="an empty spool")
            assert "transient failure" in pipeline.log("worker")
            RESULTS.append(("S3 down, then back", len(files), len(stream.acked), len(keys), 0,
                            len(files) - len(stream.acked)))
        finally:
            proxy.stop()


class TcpProxy:
    """A loopback TCP forwarder we can turn on: the S3 service 'comes back'."""

    def __init__(self, listen: int, target: int, delay: float = 0.0) -> None:
        self.listen, self.target, self.delay = listen, target, delay
        self.server: socket.socket | None = None
        self.stopping = threading.Event()

    def start(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.listen))
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.close()

    def _accept(self) -> None:
        assert self.server is not None
        while not self.stopping.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b, delay in ((client, upstream, self.delay), (upstream, client, 0.0)):
                threading.Thread(target=self._pipe, args=(a, b, delay), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(delay)  # a slow service: every request waits
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()



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
def test_spool_disk_full(tmp_path: Path, redis_url: str, floor_mb: int) -> None:
    """The spool's filesystem fills up (no floor) or reaches its floor: the sender hears a
    refusal, never 0x0000 for what is not on disk; nothing half-written is archived; once
    workers drain the spool, everything acked is archived and no temp file is left."""
    from tests.processes import start_pipeline

    with small_filesystem(tmp_path / "small", 8) as small, start_pipeline(
        tmp_path, redis_url, spool_dir=small / "spool", spool_min_free_mb=floor_mb
    ) as pipeline:
        pipeline.stop("worker")  # nothing drains the spool: it must fill
        files = instances(tmp_path / "in", 30, size=512 * 1024)
        stream = Stream(pipeline.port, files, pause=0).start().wait()
        refused = [p for p, s in stream.statuses.items() if s != statuses.SUCCESS]
        assert refused, "the spool never filled"
        acked = stream.acked
        assert all(stream.statuses[p] in (statuses.OUT_OF_RESOURCES, None) for p in refused)
        pipeline.start("worker")
        assert_invariant(pipeline, acked, scenario=f"spool disk full (floor {floor_mb} MB)",
                         sent=len(stream.statuses))


def test_task_slower_than_visibility_timeout(tmp_path: Path, redis_url: str,
                                             s3_endpoint: str, bucket: str) -> None:
    """Each archive takes longer than the broker's visibility timeout, so Redis hands the task
    to a second worker process while the first still runs it: still one object per instance
    (one version in a versioned bucket), nothing quarantined."""
    from minio import Minio
    from minio.versioningconfig import ENABLED, VersioningConfig

    from tests.processes import start_pipeline
    from tests.support import free_port

    client = Minio(s3_endpoint.split("://")[1], access_key="test", secret_key="test",
                   secure=False, region="us-east-1")
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
            assert len(stream.acked) == 3
            keys = {key_of(p) for p in files}
            wait_for(lambda: not list((pipeline.settings.spool_dir / "entries").iterdir()),
                     120, 0.5, "an empty spool")
            versions = [v for v in client.list_objects(bucket, recursive=True,
                                                       include_version=True)]
            assert sorted(v.object_name for v in versions) == sorted(keys)
            log = pipeline.log("worker")
            assert "'busy'" in log or "'gone'" in log or "'already-archived'" in log, \
                "no duplicate delivery happened: the scenario proved nothing"
            RESULTS.append(("task slower than the visibility timeout", 3, 3, len(versions), 0,
                            len(keys) - len(versions)))
    finally:
        proxy.stop()


def test_poison_object_is_quarantined_once(pipeline: Pipeline, tmp_path: Path) -> None:
    """An object that can never be decoded is quarantined on its first attempt, and nothing
    brings it back: no retry loop, no sweeper loop."""
    from pydicom.uid import generate_uid

    from tests.support import pynetdicom_send, raw_part10

    poison = tmp_path / "poison.dcm"
    poison.write_bytes(raw_part10("1.2.840.10008.5.1.4.1.1.2", generate_uid(),
                                  b"\x08\x00\x16\x00UI\xff\xff" + b"\xde\xad" * 1000))
    good = instances(tmp_path / "in", 3)
    assert pynetdicom_send(pipeline.port, [poison, *good]) == [statuses.SUCCESS] * 4
    time.sleep(pipeline.settings.sweep_age + 2 * pipeline.settings.sweep_interval)
    assert_invariant(pipeline, good, scenario="poison object among good ones", sent=4,
                     quarantined=1, acked_count=4)
    assert pipeline.log("worker").count("quarantined receipt=") == 1


def test_same_instance_sent_twice(pipeline: Pipeline, tmp_path: Path) -> None:
    """A modality resends a study (same SOP Instance UIDs, same bytes): one object each."""
    from tests.support import pynetdicom_send

    files = instances(tmp_path / "in", 5)
    assert pynetdicom_send(pipeline.port, files) == [statuses.SUCCESS] * 5
    assert pynetdicom_send(pipeline.port, files) == [statuses.SUCCESS] * 5
    assert_invariant(pipeline, files, scenario="same instances sent twice", sent=10,
                     acked_count=10)
    assert len(objects_under(pipeline.archive)) == 5
