"""The receivers under test, as processes: DCMTK storescp, Orthanc (when installed), ours."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.report import DCMTK, DURABLE_DCMTK
from ingest.embedded import free_port

NODELAY = {"TCP_NODELAY": "1"}  # Debian's DCMTK otherwise stalls ~40 ms per C-STORE


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it has not ended within a minute."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Server:
    """A running receiver: name, port, AE title, process; stop() ends it."""

    name = ""
    ae_title = "ANY-SCP"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = open(workdir / f"{self.name}.log", "wb")  # noqa: SIM115

    def start(self) -> Server:
        raise NotImplementedError

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class Storescp(Server):
    name = DCMTK

    def start(self) -> Server:
        out = self.workdir / "storescp-out"
        out.mkdir(exist_ok=True)
        # +xa: accept every transfer syntax it knows; files written, like ours, but no fsync;
        # --fork: a process per association, so parallel senders are served in parallel
        self.proc = subprocess.Popen(
            [shutil.which("storescp") or "storescp", "--fork", "+xa", "-od", str(out),
             str(self.port)],
            env=self.environment(), stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)
        return self

    def environment(self) -> dict[str, str]:
        return dict(os.environ, **NODELAY)


#: the LD_PRELOAD library that makes storescp fsync what it received before it answers
FSYNC_BEFORE_ANSWER = Path(__file__).with_name("fsync_before_answer.c")


def build_fsync_before_answer(folder: Path) -> Path | None:
    """Compile :data:`FSYNC_BEFORE_ANSWER` into ``folder``; None without a C compiler (or
    when it fails to build, with the compiler's message printed)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    library = folder / "fsync_before_answer.so"
    result = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(library),
                             str(FSYNC_BEFORE_ANSWER), "-ldl"], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"bench: could not build {FSYNC_BEFORE_ANSWER.name}: {result.stderr[-500:]}")
        return None
    return library


class DurableStorescp(Storescp):
    """DCMTK's storescp made to keep the spool's promise: each received file, then its
    directory, fsynced before the C-STORE response (``fsync_before_answer.c``, loaded with
    LD_PRELOAD). What DCMTK pays for the durability ours gives, in the same run."""

    name = DURABLE_DCMTK
    library: Path | None = None  # set once the bench has built it

    def environment(self) -> dict[str, str]:
        if self.library is None:
            raise RuntimeError("build_fsync_before_answer() first")
        return super().environment() | {"LD_PRELOAD": str(self.library)}


class Orthanc(Server):
    name = "Orthanc"
    ae_title = "ORTHANC"

    @staticmethod
    def available() -> bool:
        return shutil.which("Orthanc") is not None

    def start(self) -> Server:
        storage = self.workdir / "orthanc-db"
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "DicomAet": self.ae_title, "DicomPort": self.port, "HttpPort": free_port(),
            "RemoteAccessAllowed": False, "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True, "Plugins": [],
        }))
        # Orthanc's DICOM server is DCMTK's: Debian's stalls 40 ms a C-STORE without this
        self.proc = subprocess.Popen([shutil.which("Orthanc") or "Orthanc", str(config)],
                                     env=dict(os.environ, **NODELAY), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)
        return self


class Ours(Server):
    """``dicom-ingest receiver``: durable spool writes and enqueue on, workers optional."""

    name = "dicom-ingest"
    ae_title = "DICOM-INGEST"

    def __init__(self, workdir: Path, redis_url: str, archive_url: str, processes: int = 1,
                 extra_env: dict[str, str] | None = None, label: str = "") -> None:
        self.name = label or "dicom-ingest"
        super().__init__(workdir)
        self.spool = workdir / "spool"
        self.env = dict(os.environ) | {
            "INGEST_HOST": "127.0.0.1", "INGEST_PORT": str(self.port),
            "INGEST_SPOOL_DIR": str(self.spool), "INGEST_REDIS_URL": redis_url,
            "INGEST_ARCHIVE_URL": archive_url, "INGEST_SPOOL_MIN_FREE_MB": "0",
            "INGEST_LOG_LEVEL": "warning", "INGEST_RECEIVER_PROCESSES": str(processes),
            "INGEST_S3_ACCESS_KEY": "bench", "INGEST_S3_SECRET_KEY": "bench",
            "INGEST_S3_REGION": "us-east-1",
            # the catalog in this run's folder, unless the bench was given one to measure
            # (INGEST_CATALOG_URL=postgresql://... ./run.sh bench)
            "INGEST_CATALOG_URL": os.environ.get("INGEST_CATALOG_URL")
            or f"sqlite:///{workdir / 'catalog.sqlite'}",
        } | (extra_env or {})
        self.workers: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_ingest", "receiver"],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)
        # the port listens before every receiver process serves it: a C-ECHO is answered
        # once they all do (the first process serves last)
        subprocess.run([shutil.which("echoscu") or "echoscu", "-aec", self.ae_title,
                        "127.0.0.1", str(self.port)], env=dict(os.environ, **NODELAY),
                       check=True, timeout=180, capture_output=True)
        return self

    def start_workers(self, processes: int) -> None:
        env = self.env | {"INGEST_WORKER_CONCURRENCY": str(processes)}
        self.workers = subprocess.Popen([sys.executable, "-m", "dicom_ingest", "worker"],
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT)
        # the clock starts once a worker answers a ping (its consumer and pool are up)
        from celery import Celery

        app = Celery(broker=self.env["INGEST_REDIS_URL"])
        deadline = time.monotonic() + 120
        while not app.control.ping(timeout=0.5):
            if self.workers.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not start; see {self.workdir}")
        app.close()

    def stop(self) -> None:
        terminate(self.workers)
        super().stop()

    def peak_rss_mb(self) -> float:
        """Peak resident memory (VmHWM) of the receiver process that used the most, in MB:
        with several receiver processes, the one that received the large instance."""
        peaks = []
        for pid in receiver_pids(self.pid):
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                peaks += [int(line.split()[1]) / 1024 for line in status.splitlines()
                          if line.startswith("VmHWM:")]
        if not peaks:
            raise RuntimeError("no VmHWM")
        return max(peaks)


def children(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(entry.name))
    return pids


def receiver_pids(first: int) -> list[int]:
    """The first receiver process and the extra ones it started (not its publishers)."""
    pids = [first]
    for pid in children(first):
        with contextlib.suppress(OSError):
            if b"receiver" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                pids.append(pid)
    return pids
