"""What the fault scenarios share: a sender that records what it heard, a TCP proxy that can
hold a transfer half-way, the processes of a worker (to stop, inspect and kill them), the
spool's open attempts, and the table of results."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from ingest.keys import instance_key
from ingest.scu import associate
from ingest.spool import ATTEMPTS_XATTR, in_use
from receiver import statuses
from tests.processes import Pipeline
from tests.support import make_instance, objects_under, split_part10, wait_for

# --- the table --------------------------------------------------------------------------------


@dataclass
class Row:
    """One scenario's line in the table. ``keys``: the archive keys of the instances that got
    0x0000; ``listing``: what the archive holds now. Counted at the end of the test, pass or
    fail (the ``row`` fixture), so a failing scenario shows what it lost."""

    scenario: str
    sent: int = 0
    acked: int = 0
    archived: int = 0
    quarantined: int = 0
    lost: int = 0
    fault: str = ""  # what showed, from the outside, that the fault happened
    result: str = "?"
    keys: set[str] = field(default_factory=set)
    listing: Callable[[], Iterable[str]] | None = None
    #: a sender to count from at the end, plus what was sent besides it (retries)
    stream: Stream | None = None
    also_sent: dict[Path, int | None] = field(default_factory=dict)

    def watch(self, stream: Stream, pipeline: Pipeline) -> None:
        """Count what ``stream`` heard (and :attr:`also_sent`) against ``pipeline``'s
        directory archive when the test ends, however it ends."""
        self.stream = stream
        self.listing = lambda: objects_under(pipeline.archive)

    def tally(self) -> None:
        if self.stream is not None:
            heard = [*self.stream.statuses.items(), *self.also_sent.items()]
            acked = [p for p, s in heard if s == statuses.SUCCESS]
            self.sent, self.acked = len(heard), len(acked)
            self.keys = {key_of(p) for p in acked}
        if self.listing is None:
            return
        listed = [k for k in self.listing() if not k.endswith("/study.json")]  # manifests
        good = {k for k in listed if not k.startswith("quarantine/")}
        self.archived = len([k for k in listed if not k.startswith("quarantine/")])
        self.quarantined = len([k for k in listed
                                if k.startswith("quarantine/") and k.endswith(".json")])
        self.lost = len(self.keys - good)


#: every scenario that ran, in order, printed at the end of the run
RESULTS: list[Row] = []


def table() -> list[str]:
    lines = [f"{'scenario':48} {'sent':>5} {'acked':>6} {'archived':>9} {'quarantined':>12} "
             f"{'lost':>5}  {'result':7} fault shown by"]
    for r in RESULTS:
        lines.append(f"{r.scenario:48} {r.sent:5d} {r.acked:6d} {r.archived:9d} "
                     f"{r.quarantined:12d} {r.lost:5d}  {r.result:7} {r.fault}")
    return lines


# --- instances and the archive ------------------------------------------------------------


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


def sop_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def count_into(row: Row, pipeline: Pipeline, acked: Iterable[Path]) -> None:
    """Let ``row`` count a directory archive against the instances that got 0x0000."""
    row.keys = {key_of(p) for p in acked}
    row.listing = lambda: objects_under(pipeline.archive)


def assert_invariant(pipeline: Pipeline, acked: list[Path], timeout: float = 120,
                     quarantined: int = 0) -> None:
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


# --- the sender -----------------------------------------------------------------------------


@dataclass
class Stream:
    """A pynetdicom sender on its own thread, one association, recording what it heard: the
    status of each C-STORE, None where no answer came (the association died under it)."""

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

    @property
    def unanswered(self) -> list[Path]:
        return [p for p, s in self.statuses.items() if s is None]

    def wait(self, timeout: float = 120) -> Stream:
        assert self.done.wait(timeout), "the sender did not finish"
        return self


# --- a TCP proxy ----------------------------------------------------------------------------


class TcpProxy:
    """A loopback TCP forwarder we can turn on (the S3 service 'comes back'), slow down
    (``delay`` before each chunk towards the target), or have hold the client's bytes once
    ``hold_after`` of them went through (:attr:`holding` is then set): a transfer stopped
    half-way, for as long as the test wants."""

    def __init__(self, listen: int, target: int, delay: float = 0.0,
                 hold_after: int | None = None) -> None:
        self.listen, self.target, self.delay = listen, target, delay
        self.hold_after = hold_after
        self.forwarded = 0  # bytes from clients to the target
        self.holding = threading.Event()
        self._release = threading.Event()
        self.server: socket.socket | None = None
        self.stopping = threading.Event()

    def start(self) -> TcpProxy:
        self.server = socket.create_server(("127.0.0.1", self.listen))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._release.set()
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
            for a, b, outward in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, outward), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, outward: bool) -> None:
        try:
            while data := src.recv(65536):
                if outward:
                    time.sleep(self.delay)  # a slow service: every request waits
                    data = self._hold(dst, data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _hold(self, dst: socket.socket, data: bytes) -> bytes:
        """Forward up to ``hold_after`` bytes in all; past it, wait until released."""
        if self.hold_after is None or self._release.is_set():
            self.forwarded += len(data)
            return data
        room = self.hold_after - self.forwarded
        if room >= len(data):
            self.forwarded += len(data)
            return data
        if room > 0:
            dst.sendall(data[:room])
            self.forwarded += room
        self.holding.set()
        self._release.wait()
        return data[max(room, 0):]


# --- processes and the spool ----------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (of any of its threads)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def alive(pid: int) -> bool:
    """Running (not a zombie) ``pid``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def holders(pids: Iterable[int], path: Path) -> list[int]:
    """Those of ``pids`` that hold ``path`` open."""
    target = os.fspath(path)
    found = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        found.append(pid)
                        break
    return found


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t", "Z", "X")


def signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@contextlib.contextmanager
def frozen(root: int) -> Iterator[list[int]]:
    """``root`` and its children stopped (SIGSTOP, and seen stopped); yields their pids;
    SIGCONT at the end (signals sent meanwhile are delivered then)."""
    pids = [root, *children(root)]
    signal_all(pids, signal.SIGSTOP)
    try:
        wait_for(lambda: all(_stopped(p) for p in pids), 10, 0.001, "the processes stopped")
        yield pids
    finally:
        signal_all(reversed(pids), signal.SIGCONT)  # the children first, the parent last


def open_attempts(spool_dir: Path) -> dict[str, int]:
    """Receipt id -> count of the spool entries with an attempt begun and not ended (the
    worker's counter: an extended attribute of the entry's file, else a ``.attempts`` file)."""
    found: dict[str, int] = {}
    for path in (spool_dir / "entries").iterdir():
        try:
            if path.suffix == ".dcm":
                found[path.stem] = int(os.getxattr(path, ATTEMPTS_XATTR))
            elif path.suffix == ".attempts":
                found[path.stem] = int(path.read_text())
        except (OSError, ValueError):
            continue  # no attempt open, or the entry went meanwhile
    return found


@contextlib.contextmanager
def frozen_mid_task(worker: int, spool_dir: Path, timeout: float = 60,
                    wanted: Callable[[dict[str, int]], bool] = bool
                    ) -> Iterator[tuple[list[int], dict[str, int]]]:
    """The worker ``worker`` (main process and pool) stopped at a moment when tasks are under
    way: entries with an attempt begun and not ended (seen while nothing of the worker runs,
    so they are still open at whatever the caller does next: kill it, signal it). Yields the
    worker's pids and those open attempts (``wanted`` of them: at least one by default)."""
    deadline = time.monotonic() + timeout
    while True:
        wait_for(lambda: wanted(open_attempts(spool_dir)), max(0.0, deadline - time.monotonic()),
                 0.002, "a task under way")
        with frozen(worker) as pids:
            attempts = open_attempts(spool_dir)
            if wanted(attempts):
                yield pids, attempts
                return
        assert time.monotonic() < deadline, "no task was under way whenever the worker stopped"
