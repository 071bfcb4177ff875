"""``python -m bench``: dicom-ingest against DCMTK storescp (and Orthanc when installed), in
one run on this machine. Prints a table, writes bench/results/RESULTS.md and a PNG chart.

DCMTK runs twice: as it is, and made to fsync each received file and its directory before it
answers (bench/fsync_before_answer.c, built with cc, loaded with LD_PRELOAD), which is the
promise our spool keeps before 0x0000: what that durability costs DCMTK, in the same run.

Senders are DCMTK's storescu with TCP_NODELAY=1 for throughput (512 KB instances over 1, 4
and 16 parallel associations, 40 KB over 1 and 4), and pynetdicom (one instance at a time) for
the C-STORE round-trip latency. Ours also takes the 512 KB loads over 1 and 4 associations
with a backlog already waiting in its spool (--backlog). Figures are ratios against DCMTK from
the same run, the throughput targets against the durable DCMTK: absolute numbers drift on a
shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.backlog import BACKLOG_ENV, ENTRY_BYTES, link_backlog, make_backlog
from bench.corpus import make_corpus, make_large
from bench.report import BACKLOG_LOADS, DCMTK, DISK_ALONE, LOADS, OURS, backlog_name
from bench.servers import (
    NODELAY,
    DurableStorescp,
    Orthanc,
    Ours,
    Server,
    Storescp,
    build_fsync_before_answer,
    receiver_pids,
    wait_port,
)
from ingest.embedded import free_port
from ingest.scu import associate
from ingest.settings import Settings, receiver_processes
from workers.app import PROCESSES_PER_CORE, default_concurrency

RESULTS = Path(__file__).parent / "results"
T = TypeVar("T")


@dataclass
class Row:
    test: str
    server: str
    value: float
    unit: str
    ratio: float | None = None  # ours / DCMTK
    note: str = ""
    of_receive: float | None = None  # end to end: archived / received in the same runs
    of_empty: float | None = None  # a backlog run: / the same load on an empty spool


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = f"  ({row.ratio:.2f}x DCMTK)" if row.ratio is not None else ""
        print(f"  {row.test:48} {row.server:26} {row.value:10.1f} {row.unit}{ratio}",
              flush=True)


def storescu(port: int, ae_title: str, files: list[Path]) -> None:
    """One association that sends ``files`` (storescu reads the list from a file argument)."""
    args = [shutil.which("storescu") or "storescu", "-aec", ae_title, "127.0.0.1", str(port),
            *map(str, files)]
    result = subprocess.run(args, env=dict(os.environ, **NODELAY), capture_output=True,
                            text=True)
    if result.returncode != 0 or "E:" in result.stderr:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")


#: a scratch file written and deleted before each timed run (see :func:`settle`)
_RECYCLE_NAME = ".recycle-page-cache"
_MB = 1 << 20


def settle(folder: Path, size: int) -> None:
    """Prepare the machine for a timed run that writes about ``size`` bytes under ``folder``.

    1. Recycle page-cache memory: write a file of ``size`` bytes (plus a tenth), fsync it and
       delete it. On a VM whose host backs guest memory only when the guest first touches it,
       a write into page-cache pages the guest has never used costs several times one into
       recycled pages. DCMTK and Orthanc write every instance through the page cache, so
       without this their rate would depend on what the machine had done before the run.
       On a server that has run for a while every page-cache page is a recycled one: this
       is the state the bench measures, for every receiver alike.
    2. Write every dirty page out. DCMTK and Orthanc leave what they received in the page
       cache; the kernel writes it back seconds later, during whichever run comes next, and
       a receiver that fsyncs then waits behind it. Each run starts from a clean disk and
       pays only for its own writes.
    """
    scratch = folder / _RECYCLE_NAME
    block = b"\xa5" * _MB
    try:
        with open(scratch, "wb") as fh:
            for _ in range(-(-(size + size // 10) // _MB)):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()
    os.sync()


def total_size(files: list[Path]) -> int:
    return sum(path.stat().st_size for path in files)


def cpu_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of the whole machine so far, over every core (/proc/stat);
    (0, 0) where there is no /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


@dataclass
class Run:
    rate: float  # instances per second, wall clock
    cpu_ms: float  # the whole machine's busy CPU time per instance (ms): senders, receiver,
    # the kernel's threads (writeback) and whatever else ran meanwhile
    busy: float  # the fraction of all cores' time that was busy


def throughput(server: Server, files: list[Path], associations: int) -> Run:
    """Instances per second for ``files`` over ``associations`` parallel ones, and what
    the machine spent on them."""
    chunks = [files[i::associations] for i in range(min(associations, len(files)))]
    threads = [threading.Thread(target=storescu, args=(server.port, server.ae_title, c))
               for c in chunks]
    settle(server.workdir, total_size(files))
    busy0, all0 = cpu_ticks()
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    busy1, all1 = cpu_ticks()
    ticks = os.sysconf("SC_CLK_TCK")
    return Run(len(files) / elapsed, 1000 * (busy1 - busy0) / ticks / len(files),
               (busy1 - busy0) / max(1, all1 - all0))


def durable_floor(folder: Path, size: int, count: int, threads: int) -> tuple[float, float]:
    """How fast this disk makes files durable the way a receiver must before it answers
    (write, fsync, rename, fsync the directory), from ``threads`` threads at once, with no
    DICOM and no Python work between the system calls. Returns files per second, and the
    seconds per file spent from the fsync on (what a receiver that fsyncs adds to a cycle
    like DCMTK's, which writes but does not fsync)."""
    (folder / "tmp").mkdir(parents=True)
    (folder / "entries").mkdir()
    data = os.urandom(size)
    syncing: list[float] = []

    def run(k: int) -> None:
        directory = os.open(folder / "entries", os.O_RDONLY | os.O_DIRECTORY)
        spent = 0.0
        try:
            for i in range(k, count, threads):
                tmp = folder / "tmp" / f"{i}.dcm"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                try:
                    os.write(fd, data)
                    started = time.perf_counter()
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, folder / "entries" / f"{i}.dcm")
                os.fsync(directory)
                spent += time.perf_counter() - started
        finally:
            os.close(directory)
        syncing.append(spent)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    settle(folder, size * count)
    started = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return count / (time.perf_counter() - started), sum(syncing) / count


def latencies(server: Server, files: list[Path]) -> list[float]:
    """Each C-STORE round trip in ms, one instance at a time (pynetdicom)."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = associate(ae, "127.0.0.1", server.port, ae_title=server.ae_title)
    assert assoc.is_established
    # pynetdicom leaves Nagle's algorithm on: against a receiver that announces 16 KB PDUs
    # (DCMTK, Orthanc) each C-STORE then stalled about 40 ms on the delayed ACK of a
    # sub-segment PDU, which timed the sender, not the receiver. The storescu senders run
    # with TCP_NODELAY=1 for the same reason.
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    settle(server.workdir, total_size(files))
    for path in files:
        started = time.perf_counter()
        status = assoc.send_c_store(path)
        times.append((time.perf_counter() - started) * 1000)
        if int(getattr(status, "Status", -1)) != 0:
            if isinstance(server, Ours):  # its threads' stacks, into its log
                for pid in receiver_pids(server.pid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGUSR1)
                time.sleep(1)
            raise RuntimeError(f"{server.name}: C-STORE {len(times)} of {len(files)} answered "
                               f"{status or 'nothing'} after {times[-1]:.0f} ms; see "
                               f"{server.log.name}")
    assoc.release()
    return times


def association_setup(server: Server, rounds: int = 30) -> list[float]:
    """Each time in ms to associate (proposing every storage SOP class, as a modality's storescu
    does), C-ECHO and release: what a sender that opens an association per study pays."""
    from pynetdicom import AE, AllStoragePresentationContexts

    ae = AE(ae_title="BENCH")
    for context in AllStoragePresentationContexts[:127]:  # 128 contexts at most
        assert context.abstract_syntax is not None
        ae.add_requested_context(context.abstract_syntax)
    ae.add_requested_context("1.2.840.10008.1.1")
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        assoc = associate(ae, "127.0.0.1", server.port, ae_title=server.ae_title)
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        times.append((time.perf_counter() - started) * 1000)
    return times


def archived(archive_url: str, moto_port: int) -> int:
    """Objects in a directory archive or an s3:// bucket on the moto server."""
    if archive_url.startswith("s3://"):
        from minio import Minio

        client = Minio(f"127.0.0.1:{moto_port}", access_key="bench", secret_key="bench",
                       secure=False, region="us-east-1")
        return sum(1 for _ in client.list_objects(archive_url[5:], recursive=True))
    # os.walk (scandir) rather than Path.rglob: polled ten times a second on the cores the
    # workers use, the count must cost next to nothing
    return sum(1 for _, _, names in os.walk(archive_url) for name in names
               if name.endswith(".dcm") and not name.startswith("."))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500, help="512 KB instances (500)")
    parser.add_argument("--small", type=int, default=1000, help="40 KB instances (1000)")
    parser.add_argument("--large-mb", type=int, default=1024, help="the large instance (1024)")
    parser.add_argument("--workers", type=int, default=default_concurrency(),
                        help="worker processes for the N-worker end-to-end run (default: "
                        f"the workers' own, {PROCESSES_PER_CORE} per core)")
    parser.add_argument("--receiver-processes", type=int,
                        default=receiver_processes(Settings()),
                        help="INGEST_RECEIVER_PROCESSES for ours (default: the receiver's own, "
                        "one per core, at most 4)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds of the receive runs (the receivers taking turns in an "
                        "order that changes each round: with 4 receivers (DCMTK as it is and "
                        "fsyncing before it answers, Orthanc, ours) each runs once in each "
                        "place and once right after each of the others) and of the end-to-end "
                        "runs; each figure is the median (4)")
    parser.add_argument("--fast-path-off", action="store_true",
                        help="also run ours with its fast path off (pynetdicom's own C-STORE "
                        "handling), as a fifth receiver")
    parser.add_argument("--backlog", type=int, default=20000,
                        help="entries waiting in ours' spool for its backlog runs (the "
                        f"{' and '.join(repr(load.label) for load in BACKLOG_LOADS)} loads, "
                        "each next to the same load on an empty spool, in every round); 0: "
                        "no backlog runs (20000)")
    parser.add_argument("--only", choices=("receive", "e2e", "memory"), action="append",
                        help="run only this part (repeatable); default: all three")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = set(args.only or ("receive", "e2e", "memory"))
    if not shutil.which("storescu") or not shutil.which("storescp"):
        print("bench: DCMTK is needed (apt-get install dcmtk)", file=sys.stderr)
        return 2

    from ingest.embedded import EmbeddedRedis

    need = space_needed(args.count, args.small, args.large_mb, args.rounds, parts,
                        receivers=(3 + Orthanc.available() + args.fast_path_off),
                        backlog=args.backlog)
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < need:
        print(f"bench: needs about {need / 1e9:.1f} GB free in {tempfile.gettempdir()}, "
              f"where it works, and {free / 1e9:.1f} GB are (it keeps every run's files until "
              "the end: deleting them between runs slowed the runs that followed). Free some "
              "space, point TMPDIR at a larger disk, or pass a smaller --count or --rounds.",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="dicom-ingest-bench-"))
    report = Report()
    print(f"bench: corpus in {work}", flush=True)
    ct = make_corpus(work / "ct", args.count, 512 * 1024)
    small = make_corpus(work / "small", args.small, 40 * 1024)
    redis = EmbeddedRedis(work / "redis", persist=False)
    redis.start()
    processes = {"INGEST_RECEIVER_PROCESSES": str(max(1, args.receiver_processes))}
    try:
        if "receive" in parts:
            receive(report, work, redis, ct, small, processes, args.rounds,
                    args.fast_path_off, max(0, args.backlog))
        if "e2e" in parts:
            end_to_end(report, work, redis, ct, args.workers, processes, args.rounds)
        if "memory" in parts:
            peak_memory(report, work, redis, args.large_mb, processes)
    except BaseException:
        redis.stop()
        print(f"bench: failed; the receivers' logs are kept in {work}", file=sys.stderr)
        raise
    redis.stop()
    shutil.rmtree(work, ignore_errors=True)

    from bench.report import TARGETS_TITLE, targets, verdict, write

    machine = (f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"{platform.platform()}; ours with {processes['INGEST_RECEIVER_PROCESSES']} "
               f"receiver process(es)")
    paths = write(report.rows, args.out, machine)
    print(f"{TARGETS_TITLE}:")
    for target, value, met in targets(report.rows):
        print(f"  {target:56} {value:30} {verdict(met)}")
    print(f"bench: wrote {', '.join(str(p) for p in paths)}")
    return 0


def space_needed(count: int, small: int, large_mb: int, rounds: int, parts: set[str],
                 receivers: int, backlog: int = 0) -> int:
    """Bytes of disk a run of the bench writes under its work folder, about: the corpus, and
    every timed run's received files, which stay until the end (with a tenth more for the
    scratch file :func:`settle` writes and the spools' own files)."""
    ct, small_bytes, mb = count * 512 * 1024, small * 40 * 1024, 1 << 20
    need = ct + small_bytes
    if "receive" in parts:  # each load once for the disk alone and once for each receiver,
        # and 200 instances of the round-trip phase for each receiver
        loads = sum(ct if load.kb == 512 else small_bytes for load in LOADS)
        need += rounds * (loads + receivers * (loads + 200 * 512 * 1024))
        if backlog:  # the backlog's entries once (each run links them), and its runs' files
            need += backlog * ENTRY_BYTES + rounds * len(BACKLOG_LOADS) * ct
    if "e2e" in parts:  # the directory archive keeps each run's instances (hard links)
        need += rounds * 2 * ct
    if "memory" in parts:  # the large instance, and the spool entry it becomes
        need += 2 * large_mb * mb
    return need + need // 10


def receivers(work: Path, fast_path_off: bool = False
              ) -> list[tuple[str, type[Server] | None]]:
    """The receivers of the receive runs, by name; None stands for ours."""
    servers: list[tuple[str, type[Server] | None]] = [(DCMTK, Storescp)]
    DurableStorescp.library = build_fsync_before_answer(work)
    if DurableStorescp.library is not None:
        servers.append((DurableStorescp.name, DurableStorescp))
    else:
        print("bench: no C compiler (cc), or fsync_before_answer.c did not build: DCMTK "
              "storescp runs only as it is, without the row that has it fsync before it "
              "answers", flush=True)
    if Orthanc.available():
        servers.append(("Orthanc", Orthanc))
    servers.append((OURS, None))
    if fast_path_off:
        servers.append((f"{OURS}, fast path off", None))
    return servers


def turns(servers: list[T], round_index: int) -> list[T]:
    """The order in which the receivers take their turns in round ``round_index`` (from 0):
    the rows of a Williams design, a Latin square balanced for what ran just before. Over as
    many rounds as there are receivers (twice as many when that number is odd) each one runs
    once in each place, and right after each of the others equally often: the run right after
    a receiver that leaves its writes in the page cache (DCMTK) is slowed while the host
    writes them back, and a plain rotation would put the same receiver there every round."""
    n = len(servers)
    if n == 0:
        return []
    base, low, high = [0], 1, n - 1  # 0, 1, n-1, 2, n-2, ...
    while len(base) < n:
        base.append(low)
        low += 1
        if len(base) < n:
            base.append(high)
            high -= 1
    r = round_index % (2 * n if n % 2 else n)
    order = [servers[(i + r) % n] for i in base]
    return order[::-1] if r >= n else order


def receive(report: Report, work: Path, redis: Any, ct: list[Path], small: list[Path],
            processes: dict[str, str], rounds: int, fast_path_off: bool = False,
            backlog: int = 0) -> None:
    """Receive throughput under each of :data:`LOADS` (512 KB and 40 KB instances over 1 to 16
    parallel associations), C-STORE round trip, association set-up: DCMTK storescp as it is
    and made to fsync before it answers (where a C compiler builds its LD_PRELOAD library),
    Orthanc when installed, ours (and, with ``fast_path_off``, ours without its fast path).
    The receivers take turns, ``rounds`` times, in an order that changes each round (the rows
    of a Williams design, :func:`turns`), and each figure is the median of its rounds: on a
    shared machine the speed of the disk and the CPU drifts by half within minutes.

    With ``backlog``, ours also takes each of :data:`BACKLOG_LOADS` with that many entries
    already waiting in its spool, right before or after (in turn, round by round) the same
    load on an empty spool, and each is reported as the median of those pairs' ratios."""
    servers = receivers(work, fast_path_off)
    base: dict[str, float] = {}
    corpus = {512: ct, 40: small}
    tests = [(load.label, corpus[load.kb], load.associations) for load in LOADS]
    paired = {load.label for load in BACKLOG_LOADS} if backlog else set()
    waiting = backlog_name(backlog)
    entries = make_backlog(work / "backlog", backlog) if backlog else None

    def run_server(name: str, cls: type[Server] | None, sub: str,
                   with_backlog: bool = False) -> Server:
        (work / sub).mkdir()
        if cls is None:
            env = dict(processes)
            if "fast path off" in name:
                env["INGEST_RECEIVER_FAST_PATH"] = "false"
            if with_backlog and entries is not None:
                link_backlog(entries, work / sub / "spool")
                env |= BACKLOG_ENV
            return Ours(work / sub, redis.url, str(work / sub / "archive"), extra_env=env,
                        label=name).start()
        return cls(work / sub).start()

    print(f"receive throughput, {rounds} rounds taking turns (no workers running for ours)",
          flush=True)
    rates: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[Run]] = {}  # the same runs' CPU
    sync_ms: dict[str, list[float]] = {}  # from the fsync on, per file, one thread
    round_trips: dict[str, list[float]] = {}  # C-STORE round trips (ms) of all rounds
    setups: dict[str, list[float]] = {}
    floor = DISK_ALONE
    for r in range(rounds):
        for m, (label, files, assocs) in enumerate(tests):
            rate, sync = durable_floor(work / f"floor{r}-{m}", files[0].stat().st_size,
                                       len(files), assocs)
            rates.setdefault((floor, label), []).append(rate)
            if assocs == 1:
                sync_ms.setdefault(label, []).append(sync * 1000)
            print(f"  round {r + 1}: {label:26} {floor:30} {rate:8.1f} files/s", flush=True)
        for n, (name, cls) in turns(list(enumerate(servers)), r):
            # (test, with the backlog): a backlog run next to the same test on an empty spool
            plan: list[tuple[int, bool]] = []
            for m, (label, _, _) in enumerate(tests):
                pair = [(m, False)] + ([(m, True)] if name == OURS and label in paired else [])
                plan += pair[::-1] if r % 2 else pair
            for m, with_backlog in plan:
                label, files, assocs = tests[m]
                sub = f"rx{r}-{n}-{m}" + ("-backlog" if with_backlog else "")
                server = run_server(name, cls, sub, with_backlog)
                try:
                    run = throughput(server, files, assocs)
                finally:
                    server.stop()
                column = waiting if with_backlog else name
                rates.setdefault((column, label), []).append(run.rate)
                cpu.setdefault((column, label), []).append(run)
                print(f"  round {r + 1}: {label:26} {column:30} {run.rate:8.1f} inst/s, "
                      f"machine {run.cpu_ms:.2f} ms CPU/inst, {100 * run.busy:.0f}% busy",
                      flush=True)
            server = run_server(name, cls, f"lat{r}-{n}")
            try:
                round_trips.setdefault(name, []).extend(latencies(server, ct[:200]))
                setups.setdefault(name, []).extend(association_setup(server))
            finally:
                server.stop()

    def spread(runs: list[float], note: str = "") -> str:
        """``note``, and the rounds' median and range where there were several."""
        if len(runs) > 1:
            note += (f"{'; ' if note else ''}median of {len(runs)} rounds "
                     f"({runs[0]:.0f} to {runs[-1]:.0f})")
        return note

    def throughput_rows(name: str, label: str, files: list[Path], note: str = "",
                        of_empty: float | None = None) -> None:
        """The rows of one receiver under one load: instances/s, MB/s, CPU per instance."""
        key = f"{label} (instances/s)"
        runs = sorted(rates[(name, label)])
        rate = statistics.median(runs)
        if name == DCMTK:
            base[key] = rate
        ratio = rate / base[key] if name != DCMTK else None
        report.add(Row(key, name, rate, "inst/s", ratio, spread(runs, note),
                       of_empty=of_empty))
        mb = rate * files[0].stat().st_size / 1e6
        report.add(Row(f"{label} (MB/s)", name, mb, "MB/s", ratio))
        runs_cpu = cpu[(name, label)]
        if any(run.cpu_ms for run in runs_cpu):
            key = f"{label}: machine CPU per instance (ms)"
            spent = statistics.median(run.cpu_ms for run in runs_cpu)
            busy = statistics.median(run.busy for run in runs_cpu)
            if name == DCMTK:
                base[key] = spent
            report.add(Row(key, name, spent, "ms", spent / base[key] if name != DCMTK
                           else None,
                           f"all {os.cpu_count()} cores, senders and kernel included; "
                           f"{100 * busy:.0f}% busy (medians of {len(runs_cpu)} rounds)"))

    for label, _files, assocs in tests:
        runs = sorted(rates[(floor, label)])
        dcmtk = statistics.median(rates[(DCMTK, label)])
        if assocs == 1:
            # the sender waits for each answer: the fsyncs add to DCMTK's cycle
            sync = statistics.median(sync_ms[label])
            estimate = 1 / (1 / dcmtk + sync / 1000)
            note = (f"one thread; {sync:.2f} ms a file from the fsync on. One association "
                    f"waits for each answer, so DCMTK's cycle plus these fsyncs would give "
                    f"1/(1/DCMTK + {sync:.2f} ms) = {estimate:.0f}/s = {estimate / dcmtk:.2f}x "
                    f"DCMTK here (a receiver that writes through the page cache like DCMTK, "
                    f"then fsyncs; ours writes each instance out while it arrives)")
        else:
            note = f"{assocs} threads: write, fsync, rename, fsync dir through the page cache"
        report.add(Row(f"{label} (instances/s)", floor, statistics.median(runs), "files/s",
                       statistics.median(runs) / dcmtk, spread(runs, note)))
    for name, _cls in servers:
        for label, files, _ in tests:
            throughput_rows(name, label, files)
        times = sorted(round_trips[name])
        p50, p99 = statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]
        setup = statistics.median(setups[name])
        trips = f"of {len(times)} C-STOREs over {rounds} rounds"
        for key, v, note in (
                ("C-STORE round trip p50 (ms, pynetdicom sender)", p50, trips),
                ("C-STORE round trip p99 (ms, pynetdicom sender)", p99, trips),
                ("association with 128 contexts, C-ECHO, release (ms)", setup,
                 f"median of {len(setups[name])}")):
            if name == DCMTK:
                base[key] = v
            report.add(Row(key, name, v, "ms", v / base[key] if name != DCMTK
                           else None, note))
    for label, files, _ in tests:
        if label in paired:
            same = sorted(b / e for b, e in zip(rates[(waiting, label)], rates[(OURS, label)],
                                                strict=True))
            note = (f"{statistics.median(same):.2f}x the same load on an empty spool right "
                    "before or after it in the same round, workers stopped")
            if len(same) > 1:
                note += f" (rounds: {same[0]:.2f} to {same[-1]:.2f})"
            throughput_rows(waiting, label, files, note, of_empty=statistics.median(same))


def end_to_end(report: Report, work: Path, redis: Any, ct: list[Path], n_workers: int,
               processes: dict[str, str], rounds: int) -> None:
    """First send to last object archived, the workers running while the sender sends: with
    the directory backend and with S3 (moto), for 1 and for ``n_workers`` worker processes."""
    print("end to end: first send to last object archived", flush=True)
    moto: subprocess.Popen[bytes] | None = None
    moto_port = free_port()
    try:
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(moto_port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_port(moto_port, moto)  # started, so its start-up is not in what we time
    except (OSError, RuntimeError):
        moto = None
    alone = [r.value for r in report.rows if r.server == OURS
             and r.test == "512 KB, 1 association (instances/s)"]
    configs = [(backend, workers) for backend in ("directory", "s3")
               for workers in sorted({1, n_workers})]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for r in range(rounds):
            for backend, workers in configs:
                if backend == "s3" and moto is None:
                    continue
                rate, received = _end_to_end_run(work / f"e2e{r}-{backend}-{workers}", redis,
                                                 ct, backend, workers, moto_port, processes)
                results.setdefault((backend, workers), []).append((rate, received))
                print(f"  round {r + 1}: {backend:9} {workers} worker process(es): "
                      f"{rate:6.1f} inst/s archived, {received:6.1f} received", flush=True)
        for (backend, workers), runs in results.items():
            rate = statistics.median(rate for rate, _ in runs)
            same = sorted(rate / received for rate, received in runs)
            note = (f"{statistics.median(same):.2f}x the receive rate of the same run, workers "
                    f"busy meanwhile (median of {len(runs)}: {same[0]:.2f} to {same[-1]:.2f})")
            if alone:
                note += f"; {rate / alone[0]:.2f}x the receive rate alone"
            report.add(Row(f"end to end, {backend}, {workers} worker process(es)",
                           OURS, rate, "inst/s", None, note,
                           of_receive=statistics.median(same)))
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait()


def _end_to_end_run(sub: Path, redis: Any, ct: list[Path], backend: str, workers: int,
                    moto_port: int, processes: dict[str, str]) -> tuple[float, float]:
    """One end-to-end run: (instances archived per second, received per second)."""
    sub.mkdir()
    archive = str(sub / "archive")
    extra = dict(processes)
    if backend == "s3":
        bucket = f"bench-{sub.name}"
        from minio import Minio

        Minio(f"127.0.0.1:{moto_port}", access_key="bench", secret_key="bench",
              secure=False, region="us-east-1").make_bucket(bucket)
        archive = f"s3://{bucket}"
        extra["INGEST_S3_ENDPOINT"] = f"http://127.0.0.1:{moto_port}"
    # earlier runs left their tasks in the queue: not for these workers
    import redis as redis_client

    with redis_client.Redis.from_url(redis.url) as r:
        r.flushdb()
    ours = Ours(sub, redis.url, archive, extra_env=extra)
    ours.start()
    ours.start_workers(workers)  # returns once the pool is up
    try:
        settle(sub, total_size(ct))
        started = time.perf_counter()
        storescu(ours.port, ours.ae_title, ct)
        received = len(ct) / (time.perf_counter() - started)
        deadline = time.monotonic() + 600
        # listing the bucket costs moto, a Python server on these same cores, CPU of its
        # own: every half second there (runs take half a minute), every 0.1 s for a directory
        poll = 0.5 if backend == "s3" else 0.1
        while archived(archive, moto_port) < len(ct):
            if time.monotonic() > deadline:
                raise RuntimeError(f"end to end {backend}: not all archived")
            time.sleep(poll)
        return len(ct) / (time.perf_counter() - started), received
    finally:
        ours.stop()


def peak_memory(report: Report, work: Path, redis: Any, large_mb: int,
                processes: dict[str, str]) -> None:
    """The receiver's peak RSS while one instance of ``large_mb`` arrives."""
    print(f"peak receiver memory while a {large_mb} MB instance arrives", flush=True)
    large = make_large(work / "large", large_mb)
    sub = work / "large-rx"
    sub.mkdir()
    ours = Ours(sub, redis.url, str(sub / "archive"), extra_env=processes)
    ours.start()
    try:
        before = ours.peak_rss_mb()
        storescu(ours.port, ours.ae_title, [large])
        peak = ours.peak_rss_mb()
    finally:
        ours.stop()
    report.add(Row(f"receiver peak RSS, {large_mb} MB instance", OURS, peak,
                   "MB", None, f"{before:.0f} MB before it arrived"))


if __name__ == "__main__":
    sys.exit(main())
