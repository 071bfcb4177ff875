"""The receiver's promise, seen through strace: for every instance, its bytes are written,
the file is fsynced, renamed into ``entries/`` and that directory fsynced, and only then is
the C-STORE response written to the association's socket (DESIGN.md, "The receiver's
promise"), on the fast path and on pynetdicom's.

The clock is the trace's line order, not its timestamps: strace writes a thread's return from
a call before any other thread can act on it, so "A returned on an earlier line than B began"
holds across threads (pynetdicom's path commits on one and answers on another)."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from ingest.settings import Settings, environment
from tests.processes import stop_traced
from tests.support import (
    cli,
    dataset_bytes,
    free_port,
    make_instance,
    need,
    port_open,
    pynetdicom_send,
    wait_for,
)

pytestmark = pytest.mark.e2e

# what changes a spool file; the receipt is an attribute of it, which its fsync makes durable
_WRITES = ("write", "pwrite64", "writev", "pwritev", "pwritev2", "fsetxattr")
_SENDS = ("write", "writev", "sendto", "sendmsg")
_RENAMES = ("rename", "renameat", "renameat2")
_TRACED = sorted({*_WRITES, *_SENDS, *_RENAMES, "fsync", "fdatasync"})

_LINE = re.compile(r"^(\d+)\s+\S+\s+(.*)$")  # tid, time (-tt), the rest
_CALL = re.compile(r"^(\w+)\((.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_RESULT = re.compile(r"\)\s+=\s+(-?\d+)(?: .*)?$")
_FD = re.compile(r"^(\d+)<(.*?)>[,)]")  # -y / -yy: the descriptor and what it is
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Call:
    """One system call of the trace: the lines where it started and where it returned."""

    start: int
    end: int
    name: str
    args: str
    result: int

    @property
    def target(self) -> str:
        """What its first argument, a descriptor, is (-y): a path, or TCP:[a->b]."""
        fd = _FD.match(self.args)
        return fd.group(2) if fd else ""


def parse(trace: str) -> list[Call]:
    """The completed calls of an ``strace -f -tt -y`` trace, a call that another thread
    interrupted (``<unfinished ...>`` ... ``<... resumed>``) joined again."""
    calls: list[Call] = []
    pending: dict[str, tuple[int, str, str]] = {}  # tid: the call it has not returned from
    for index, line in enumerate(trace.splitlines()):
        tid_rest = _LINE.match(line)
        if tid_rest is None:
            continue
        tid, rest = tid_rest.groups()
        if rest.endswith("<unfinished ...>"):
            call = _CALL.match(rest)
            if call:
                pending[tid] = (index, call.group(1),
                                call.group(2)[: -len("<unfinished ...>")].rstrip())
            continue
        resumed = _RESUMED.match(rest)
        if resumed and tid in pending:
            start, name, head = pending.pop(tid)
            rest, args = resumed.group(2), head + resumed.group(2)
        elif (call := _CALL.match(rest)) is not None:
            start, name, args = index, call.group(1), call.group(2)
        else:
            continue  # a signal, an exit
        result = _RESULT.search(rest)
        if result is not None:
            calls.append(Call(start, index, name, args, int(result.group(1))))
    return calls


def steps(calls: list[Call], entry: str, entries: str, socket_: str,
          sop_instance: str) -> dict[str, Call]:
    """The calls that made one instance durable and answered it, checked one by one."""
    renames = [c for c in calls if c.name in _RENAMES and c.result == 0
               and _QUOTED.findall(c.args)[-1:] == [entry]]
    assert len(renames) == 1, f"{entry}: not renamed into place once: {renames}"
    rename = renames[0]
    tmp = _QUOTED.findall(rename.args)[-2]
    fsyncs = [c for c in calls if c.name in ("fsync", "fdatasync") and c.target in (tmp, entry)
              and c.result == 0]
    assert fsyncs, f"{entry}: the file was never fsynced"
    fsync = fsyncs[0]
    writes = [c for c in calls if c.name in _WRITES and c.target in (tmp, entry)]
    assert writes, f"{entry}: no data written"
    directory = next((c for c in calls if c.name in ("fsync", "fdatasync")
                      and c.target == entries and c.start > rename.end and c.result == 0), None)
    assert directory is not None, f"{entry}: entries/ was not fsynced after its rename"
    uid = re.compile(re.escape(sop_instance) + r"(?![0-9.])")
    answers = [c for c in calls if c.name in _SENDS and c.target == socket_
               and uid.search(c.args)]
    assert len(answers) == 1, f"{entry}: not one C-STORE response on {socket_}: {answers}"
    late = [c for c in writes if c.end > fsync.start]
    assert not late, f"{entry}: written after (or while) it was fsynced: {late}"
    written = sum(c.result for c in writes if c.name != "fsetxattr")
    assert written == os.path.getsize(entry), f"{entry}: {written} bytes written"
    return {"data": writes[-1], "fsync": fsync, "rename": rename, "directory": directory,
            "answer": answers[0]}


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "pynetdicom"])
def test_each_instance_is_answered_only_once_it_is_durable(tmp_path: Path, redis_url: str,
                                                           fast_path: bool) -> None:
    strace = shutil.which("strace")
    need(strace is not None, "strace (apt-get install strace)")
    assert strace is not None
    root = tmp_path.resolve()
    settings = Settings(host="127.0.0.1", port=free_port(), spool_dir=root / "spool",
                        archive_url=str(root / "archive"), redis_url=redis_url,
                        spool_min_free_mb=0, receiver_processes=1,
                        receiver_fast_path=fast_path)
    env = dict(os.environ) | environment(settings) | {"PYTHONWARNINGS": "ignore"}
    sent = {}
    for n in range(5):  # distinct sizes, the largest past a writeback step (256 KB)
        path = root / f"sent-{n}.dcm"
        sent[make_instance(path, pixel_bytes=20_000 + 90_000 * n)] = path
    trace, log = root / "trace.txt", root / "receiver.log"
    with open(log, "wb") as out:  # -f: every thread; -yy: what each descriptor is; -s: the
        # start of each write, enough to show the SOP Instance UID of a C-STORE response
        proc = subprocess.Popen(
            [strace, "-f", "-tt", "-yy", "-s", "512", "-o", str(trace),
             "-e", "trace=" + ",".join(_TRACED), *cli("receiver")],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(settings.port) or proc.poll() is not None, 60,
                 what="the traced receiver's port")
        # strace that may not trace here (ptrace refused) exits at once
        need(proc.poll() is None or "ptrace" not in log.read_text().lower(),
             f"strace tracing the receiver: {log.read_text()}")
        assert proc.poll() is None, log.read_text()
        assert pynetdicom_send(settings.port, sent.values()) == [0] * len(sent)
    finally:
        stop_traced(proc)

    calls = parse(trace.read_text(errors="replace"))
    entries = settings.spool_dir / "entries"
    stored = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
              for p in entries.glob("*.dcm")}
    assert stored.keys() == sent.keys()
    sockets = {c.target for c in calls if c.target.startswith("TCP:[")
               and f":{settings.port}->" in c.target}
    assert len(sockets) == 1, sockets  # the one association
    (association,) = sockets
    order = ["data", "fsync", "rename", "directory", "answer"]
    for sop_instance, entry in stored.items():
        assert dataset_bytes(entry) == dataset_bytes(sent[sop_instance])
        seen = steps(calls, str(entry), str(entries), association, sop_instance)
        for before, after in itertools.pairwise(order):
            assert seen[before].end < seen[after].start, (
                f"{entry.name}: {after} began before {before} returned:\n"
                f"{seen[before]}\n{seen[after]}")
