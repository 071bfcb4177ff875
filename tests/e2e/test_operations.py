"""Operating it as a hospital would: metrics, AE security, TLS, Flower, graceful shutdown."""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest.scu import associate
from receiver import statuses
from tests.faults.harness import Stream, instances, key_of
from tests.processes import start_pipeline
from tests.support import (
    cli,
    dataset_bytes,
    dcmtk,
    dcmtk_env,
    free_port,
    objects_under,
    port_open,
    pynetdicom_send,
    raw_part10,
    run,
    task_event_listener,
    wait_for,
)

pytestmark = pytest.mark.e2e


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_was_sent(tmp_path: Path, redis_url: str) -> None:
    rport, wport = free_port(), free_port()
    with start_pipeline(tmp_path, redis_url, metrics_port=rport,
                        worker_metrics_port=wport) as pipeline:
        files = instances(tmp_path / "in", 5)
        bad = tmp_path / "bad.dcm"
        bad.write_bytes(raw_part10("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", b"no dataset"))
        assert pynetdicom_send(pipeline.port, [*files, bad], calling="CT1") == [0] * 6
        wait_for(lambda: len(objects_under(pipeline.archive)) == 7, 60, what="the archive")

        r = scrape(rport)
        assert value(r, "dicom_ingest_cstore_total", status="0x0000", calling_aet="CT1") == 6
        assert value(r, "dicom_ingest_associations_total", result="accepted", reason="") == 1
        assert value(r, "dicom_ingest_ack_seconds_count") == 6
        assert value(r, "dicom_ingest_received_bytes_total") == sum(
            p.stat().st_size for p in objects_under(pipeline.archive).values()
            if p.suffix == ".dcm")
        wait_for(lambda: value(scrape(rport), "dicom_ingest_spool_depth") == 0, 10,
                 what="spool depth 0")

        def worker_counts() -> bool:
            w = scrape(wport)
            return (value(w, "dicom_ingest_archived_total") == 5
                    and value(w, "dicom_ingest_quarantined_total", reason="truncated")
                    + value(w, "dicom_ingest_quarantined_total", reason="unreadable") == 1
                    and value(w, "dicom_ingest_receive_to_archive_seconds_count") == 5)

        wait_for(worker_counts, 30, what="the worker's counts")


def test_unknown_calling_ae_is_rejected(tmp_path: Path, redis_url: str) -> None:
    rport = free_port()
    with start_pipeline(tmp_path, redis_url, allowed_calling_aets=("CT1", "MR1"),
                        require_called_aet=True, metrics_port=rport) as pipeline:
        port = str(pipeline.port)
        ok = run([dcmtk("echoscu"), "-aet", "CT1", "-aec", "DICOM-INGEST", "127.0.0.1", port],
                 env=dcmtk_env(), check=False)
        assert ok.returncode == 0, ok.stderr
        intruder = run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "DICOM-INGEST",
                        "127.0.0.1", port], env=dcmtk_env(), check=False)
        assert intruder.returncode != 0
        assert "Calling AE Title Not Recognized" in intruder.stdout + intruder.stderr
        wrong = run([dcmtk("echoscu"), "-aet", "CT1", "-aec", "SOMEONE-ELSE", "127.0.0.1",
                     port], env=dcmtk_env(), check=False)
        assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
        r = scrape(rport)
        assert value(r, "dicom_ingest_associations_total", result="rejected",
                     reason="calling-aet-not-allowed") == 1
        assert value(r, "dicom_ingest_associations_total", result="rejected",
                     reason="called-aet-mismatch") == 1
        assert "reason=calling-aet-not-allowed" in pipeline.log("receiver")


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with openssl."""
    folder.mkdir()

    def openssl(*args: str) -> None:
        run(["openssl", *args])

    paths = {name: folder / name for name in ("ca.key", "ca.pem", "server.key", "server.pem",
                                              "client.key", "client.pem", "other.key",
                                              "other.pem")}
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
            "/CN=test-ca", "-keyout", str(paths["ca.key"]), "-out", str(paths["ca.pem"]))
    ext = folder / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for who in ("server", "client"):
        csr = folder / f"{who}.csr"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout",
                str(paths[f"{who}.key"]), "-out", str(csr))
        openssl("x509", "-req", "-in", str(csr), "-CA", str(paths["ca.pem"]), "-CAkey",
                str(paths["ca.key"]), "-CAcreateserial", "-days", "1", "-extfile", str(ext),
                "-out", str(paths[f"{who}.pem"]))
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
            "/CN=self-signed", "-keyout", str(paths["other.key"]), "-out",
            str(paths["other.pem"]))
    return paths


def tls_send(port: int, files: list[Path], pki: dict[str, Path], cert: str) -> list[Any]:
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
    context.load_cert_chain(str(pki[f"{cert}.pem"]), str(pki[f"{cert}.key"]))
    ae = AE(ae_title="TLSCLIENT")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = associate(ae, "127.0.0.1", port, ae_title="DICOM-INGEST",
                      tls_args=(context, "127.0.0.1"))
    if not assoc.is_established:
        return []
    out = [int(assoc.send_c_store(p).Status) for p in files]
    assoc.release()
    return out


def test_dicom_tls_with_client_certificates(tmp_path: Path, redis_url: str) -> None:
    pki = make_pki(tmp_path / "pki")
    with start_pipeline(tmp_path, redis_url, tls_cert=str(pki["server.pem"]),
                        tls_key=str(pki["server.key"]), tls_ca=str(pki["ca.pem"])) as pipeline:
        files = instances(tmp_path / "in", 3)
        # and one of 6 MB: many TLS records per PDU, decrypted data the socket cannot show
        files += instances(tmp_path / "large", 1, size=6 * 2**20)
        assert tls_send(pipeline.port, files, pki, "client") == [statuses.SUCCESS] * 4
        wait_for(lambda: len(objects_under(pipeline.archive)) == 4, 30, what="the archive")
        assert sorted(dataset_bytes(p) for p in objects_under(pipeline.archive).values()) == (
            sorted(dataset_bytes(f) for f in files))
        # a certificate the CA did not sign gets no association
        assert tls_send(pipeline.port, files, pki, "other") == []
        # and a plain TCP client gets nothing either
        plain = run([dcmtk("echoscu"), "-aec", "DICOM-INGEST", "127.0.0.1",
                     str(pipeline.port)], env=dcmtk_env(), check=False)
        assert plain.returncode != 0
        # refused by the receiver, which is still there for a client it trusts
        assert pipeline.processes["receiver"].poll() is None
        again = instances(tmp_path / "again", 1)
        assert tls_send(pipeline.port, again, pki, "client") == [statuses.SUCCESS]
        wait_for(lambda: len(objects_under(pipeline.archive)) == 5, 30, what="the archive")
        assert "Traceback" not in pipeline.log("receiver")


def test_sigterm_lets_the_association_finish(tmp_path: Path, redis_url: str) -> None:
    """SIGTERM mid-stream: no new associations, the running one finishes, every instance
    that got 0x0000 is archived, the receiver exits 0."""
    with start_pipeline(tmp_path, redis_url) as pipeline:
        files = instances(tmp_path / "in", 40)
        stream = Stream(pipeline.port, files, pause=0.03).start()
        wait_for(lambda: len(stream.statuses) >= 5, 30, what="five sent")
        receiver = pipeline.processes["receiver"]
        receiver.send_signal(signal.SIGTERM)
        wait_for(lambda: not port_open(pipeline.port) or receiver.poll() is not None, 10,
                 what="the listening socket closed")
        stream.wait()
        assert receiver.wait(30) == 0
        pipeline.processes.pop("receiver")
        assert len(stream.acked) == len(files)  # the running association was not cut
        keys = set(objects_under(pipeline.archive))
        wait_for(lambda: len(objects_under(pipeline.archive)) == len(files), 60,
                 what="every acked instance archived")
        assert keys <= set(objects_under(pipeline.archive))
        assert sorted(dataset_bytes(p) for p in objects_under(pipeline.archive).values()) == (
            sorted(dataset_bytes(f) for f in files))


def test_sigterm_deadline_aborts_a_stuck_association(tmp_path: Path, redis_url: str) -> None:
    with start_pipeline(tmp_path, redis_url, shutdown_timeout=1.0) as pipeline:
        files = instances(tmp_path / "in", 200)
        stream = Stream(pipeline.port, files, pause=0.05).start()
        wait_for(lambda: len(stream.statuses) >= 5, 30, what="five sent")
        pipeline.stop("receiver", signal.SIGTERM)
        stream.wait()
        assert 5 <= len(stream.acked) < len(files)
        acked = {key_of(p) for p in stream.acked}
        # the instance in flight at the abort may be archived too: stored, never acked
        wait_for(lambda: acked <= set(objects_under(pipeline.archive)), 60,
                 what="every acked instance archived")
        assert "aborting an association" in pipeline.log("receiver")


def test_flower_sees_worker_and_tasks(tmp_path: Path, redis_url: str) -> None:
    fport = free_port()
    with start_pipeline(tmp_path, redis_url, flower_port=fport,
                        flower_basic_auth="ops:s3cret") as pipeline:
        log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115
        flower = subprocess.Popen(cli("flower", "--address", "127.0.0.1"), env=pipeline.env,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: port_open(fport), 60, what="flower")
            files = instances(tmp_path / "in", 4)
            assert pynetdicom_send(pipeline.port, files) == [statuses.SUCCESS] * 4
            wait_for(lambda: len(objects_under(pipeline.archive)) == 4, 30, what="archive")
            auth = base64.b64encode(b"ops:s3cret").decode()

            def get(path: str, authorised: bool = True) -> Any:
                request = urllib.request.Request(f"http://127.0.0.1:{fport}{path}")
                if authorised:
                    request.add_header("Authorization", f"Basic {auth}")
                with urllib.request.urlopen(request, timeout=10) as response:
                    return json.loads(response.read())

            with pytest.raises(urllib.error.HTTPError) as refused:
                get("/api/workers", authorised=False)
            assert refused.value.code == 401
            workers = wait_for(lambda: get("/api/workers?refresh=1"), 30, 0.5,
                               what="a worker in Flower")
            assert any(name.startswith("dicom-ingest-") for name in workers)

            def archived_tasks() -> bool:
                tasks = get("/api/tasks")
                done = [t for t in tasks.values() if t.get("name") == "dicom_ingest.archive"
                        and t.get("state") == "SUCCESS"]
                return len(done) >= 4

            wait_for(archived_tasks, 30, 0.5, what="the archive tasks in Flower")
        finally:
            flower.terminate()
            flower.wait(20)
            log.close()


def _both_listening(pipeline: Any) -> None:
    wait_for(lambda: pipeline.log("receiver").count("listening on") == 2, 30,
             what="both receiver processes listening")


def _over_four_associations(pipeline: Any, port: int, tmp_path: Path, count: int) -> None:
    """``count`` instances sent over four parallel associations: all acked, all archived."""
    files = instances(tmp_path / "in", count)
    streams = [Stream(port, files[i::4]).start() for i in range(4)]
    for stream in streams:
        stream.wait()
    assert sum(len(s.acked) for s in streams) == count
    wait_for(lambda: len(objects_under(pipeline.archive)) == count, 60,
             what=f"{count} archived")


def _extra_receiver(pipeline: Any) -> int:
    """The pid of the one extra receiver process (the first one's publisher is not one)."""
    extra = subprocess.run(["pgrep", "-P", str(pipeline.processes["receiver"].pid),
                            "-f", "--", "-m receiver$"], capture_output=True, text=True)
    [pid] = extra.stdout.split()
    return int(pid)


def _own_cstores(directory: Path, pid: int) -> float:
    """The C-STOREs one receiver process counted, read from its own file in the metrics
    directory (the port serves only their sum)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    families = MultiProcessCollector.merge([str(directory / f"counter_{pid}.db")])
    return sum(s.value for f in families for s in f.samples
               if s.name == "dicom_ingest_cstore_total")


def test_several_receiver_processes_share_the_port(tmp_path: Path, redis_url: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """INGEST_RECEIVER_PROCESSES=2: two processes on one listening socket; parallel
    associations are all served and archived, the first process's metrics port counts the
    C-STOREs of both, and SIGTERM stops both, the metrics directory removed."""
    port, rport = free_port(), free_port()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the metrics directory goes
    with start_pipeline(tmp_path, redis_url, port=port, receiver_processes=2,
                        metrics_port=rport) as pipeline:
        _both_listening(pipeline)
        _over_four_associations(pipeline, port, tmp_path, 24)
        both = scrape(rport)
        ok = {"status": "0x0000", "calling_aet": "FAULTS"}
        assert value(both, "dicom_ingest_receiver_processes") == 2
        assert value(both, "dicom_ingest_cstore_total", **ok) == 24
        assert value(both, "dicom_ingest_ack_seconds_count") == 24
        # the second process took a share, and the port's sum includes it
        [directory] = (tmp_path / "tmp").glob("dicom-ingest-metrics-*")
        assert 0 < _own_cstores(directory, _extra_receiver(pipeline)) < 24
        assert pipeline.stop("receiver") == 0
        assert not port_open(port)
        log = pipeline.log("receiver")  # both processes write to it
        assert log.count("receiver stopped") == 2, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        assert not directory.exists()


def test_an_extra_process_that_dies_leaves_the_count(tmp_path: Path, redis_url: str) -> None:
    """The extra receiver process killed: the first one says so and serves on, the count of
    processes drops to one, and what the dead one counted still counts."""
    port, rport = free_port(), free_port()
    with start_pipeline(tmp_path, redis_url, port=port, receiver_processes=2,
                        metrics_port=rport) as pipeline:
        _both_listening(pipeline)
        _over_four_associations(pipeline, port, tmp_path, 8)
        os.kill(_extra_receiver(pipeline), signal.SIGKILL)
        wait_for(lambda: value(scrape(rport), "dicom_ingest_receiver_processes") == 1, 30,
                 what="one receiver process counted")
        assert "an extra receiver process exited" in pipeline.log("receiver")
        files = instances(tmp_path / "more", 2)
        assert pynetdicom_send(port, files) == [statuses.SUCCESS] * 2
        ok = {"status": "0x0000"}
        assert value(scrape(rport), "dicom_ingest_cstore_total", calling_aet="FAULTS",
                     **ok) == 8
        assert value(scrape(rport), "dicom_ingest_cstore_total", calling_aet="PYNETDICOM",
                     **ok) == 2


def _exited(pid: int) -> bool:
    """Whether a process has exited (gone, or a zombie nobody has reaped yet)."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def test_extra_receiver_processes_stop_when_the_first_one_dies(tmp_path: Path,
                                                               redis_url: str) -> None:
    """The first receiver process killed (SIGKILL, the OOM killer): the extra one it started
    stops too, so that the restarted receiver finds the port free and serves it."""
    port = free_port()
    with start_pipeline(tmp_path, redis_url, port=port, receiver_processes=2) as pipeline:
        _both_listening(pipeline)
        first = pipeline.processes["receiver"].pid
        extra = [int(pid) for pid in subprocess.run(
            ["pgrep", "-P", str(first), "-f", "--", "-m receiver$"],
            capture_output=True, text=True).stdout.split()]
        assert len(extra) == 1
        pipeline.stop("receiver", signal.SIGKILL)
        # no process left on the listening socket: nothing accepts a connection on the port
        wait_for(lambda: not port_open(port), 30, what="the extra receiver process to stop")
        assert "the first receiver process is gone" in pipeline.log("receiver")
        wait_for(lambda: _exited(extra[0]), 30, what="the extra receiver process to exit")
        pipeline.start("receiver", keep_log=True)
        files = instances(tmp_path / "in", 2)
        assert pynetdicom_send(port, files) == [statuses.SUCCESS] * 2
        wait_for(lambda: len(objects_under(pipeline.archive)) == 2, 60, what="2 archived")


def test_no_receiver_process_is_still_starting_once_the_port_answers(
        tmp_path: Path, redis_url: str) -> None:
    """With two receiver processes, once the port answers a C-ECHO both are done starting:
    the first builds itself before it starts the other, and serves once that one serves, so
    the first associations are not all taken by one process while the other still builds."""
    from pynetdicom import AE

    port = free_port()
    with start_pipeline(tmp_path, redis_url, port=port, receiver_processes=2) as pipeline:
        ae = AE(ae_title="OPS")
        ae.add_requested_context("1.2.840.10008.1.1")

        def echoed() -> bool:
            assoc = associate(ae, "127.0.0.1", port, ae_title="DICOM-INGEST")
            if not assoc.is_established:
                return False
            ok = int(assoc.send_c_echo().Status) == statuses.SUCCESS
            assoc.release()
            return ok

        wait_for(echoed, 60, 0.01, what="a C-ECHO answered")
        first = pipeline.processes["receiver"].pid
        extra = [int(pid) for pid in subprocess.run(
            ["pgrep", "-P", str(first), "-f", "--", "-m receiver$"],
            capture_output=True, text=True).stdout.split()]
        assert len(extra) == 1
        # the first process starts the other one once it is built, and serves only once that
        # one is serving too: both announced themselves, the other one first
        log = wait_for(lambda: (text := pipeline.log("receiver")).count("listening on") == 2
                       and text, 30, what="both processes listening")
        assert log.index("(process 2 of 2)") < log.index("(process 1 of 2)"), log[-2000:]


def test_task_events_reach_a_listener_in_batches(tmp_path: Path, redis_url: str) -> None:
    """Every task's events (received, started, succeeded, with the task's name) reach an
    events listener such as Flower, in fewer Redis PUBLISHes than there are events: Celery
    alone sent one per event, about 1 ms of the worker's CPU per task."""
    import redis

    with start_pipeline(tmp_path, redis_url) as pipeline, \
            task_event_listener(pipeline.settings) as seen:
        me = f"dicom-ingest-{pipeline.processes['worker'].pid}@"

        def task_events() -> list[dict[str, Any]]:
            return [e for e in list(seen) if e["type"].startswith("task-")
                    and str(e.get("hostname", "")).startswith(me)]

        def publishes() -> int:
            with redis.Redis.from_url(redis_url) as r:
                stats = r.info("commandstats").get("cmdstat_publish", {})
                return int(stats.get("calls", 0))

        before = publishes()
        files = instances(tmp_path / "in", 8)
        assert pynetdicom_send(pipeline.port, files) == [statuses.SUCCESS] * 8
        wait_for(lambda: sum(e["type"] == "task-succeeded" for e in task_events()) == 8,
                 30, 0.2, what="task-succeeded events for all eight")
        sent = publishes() - before
        events = task_events()
        assert {e["name"] for e in events if e["type"] == "task-received"} \
            == {"dicom_ingest.archive"}
        assert sum(e["type"] == "task-received" for e in events) == 8
        assert sum(e["type"] == "task-started" for e in events) == 8
        assert sent <= len(events) // 2, (sent, len(events))
