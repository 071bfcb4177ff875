"""The receiver's entry: AE setup, handlers wired with their context, publisher and sweeper."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import select
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynetdicom
from pydicom import config as pydicom_config
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from ingest import metrics as summed_metrics
from ingest.broker import make_celery, publish, queue_length
from ingest.catalog import LazyCatalog, catalog_url
from ingest.messages import queue_for
from ingest.settings import Settings, environment, receiver_processes, redact_url
from ingest.spool import Spool, TempFilePool
from ingest.stopsignals import StopSignals
from receiver import commitment, fastpath, internals, limits, reactors, streams
from receiver.associations import AssociationContext, on_accepted, on_ended, on_rejected
from receiver.handlers import StoreContext, handle_echo, handle_store
from receiver.metrics import ReceiverMetrics
from receiver.monitor import SpoolMonitor
from receiver.publisher import Publisher
from receiver.sweeper import PeriodicSweeper

log = logging.getLogger("dicom_ingest.receiver")


# Which transfer syntax we pick when a sender offers several for one SOP class: the encoded
# ones first, deflate included (a sender offers them when it holds the instance that way, so
# it sends its original bytes instead of decoding them for us), then explicit VR little
# endian (VRs as written), implicit VR little endian, big endian.
_UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED] + _UNCOMPRESSED


class SharedContexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts. pynetdicom deep-copies them for every
    association it accepts, though negotiation only reads them, and copying every storage
    SOP class in every transfer syntax is slow. A deep copy of this list is a new list of
    the same (unchanged) context objects."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


#: the environment variable that gives the extra receiver processes the listening socket
LISTEN_FD_ENV = "DICOM_INGEST_LISTEN_FD"
#: and the one that gives them the pipe on which they say they are ready
READY_FD_ENV = "DICOM_INGEST_READY_FD"
_START_TIMEOUT = 120.0  # seconds the first process waits for the others to start
# A process holding connections open already waits this long per connection (at most
# _MAX_DEFER) before it accepts a new one, so that an idler process takes it first.
_DEFER_PER_CONNECTION = 0.001
_MAX_DEFER = 0.01
def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that child processes can inherit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=socket.SOMAXCONN)
    sock.set_inheritable(True)
    return sock


class SharedSocketServer(ThreadedAssociationServer):
    """An association server on a listening socket that several receiver processes share
    (``INGEST_RECEIVER_PROCESSES``). Every process waits for connections on it; the first
    to accept one serves it. A process that holds connections open already accepts a little
    later (1 ms per connection, at most 10 ms), so new associations go to the least busy
    process (SO_REUSEPORT would let the kernel pick one by a hash of the addresses, however
    busy). ``listen_fd`` is set by :func:`shared_server_class`."""

    listen_fd = -1
    _accepted: list[socket.socket]  # by this process, open or closed since (acceptor thread)

    def server_bind(self) -> None:
        self._accepted = []
        assert self.socket is not None
        self.socket.close()  # the unbound one socketserver made
        self.socket = socket.socket(fileno=os.dup(self.listen_fd))
        # non-blocking: another process may take a connection this one was woken for
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # listening already

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        busy = self._serving()
        if busy:
            time.sleep(min(busy * _DEFER_PER_CONNECTION, _MAX_DEFER))
        request, address = super().get_request()  # BlockingIOError if another process took it
        self._accepted.append(request)
        return request, address

    def _serving(self) -> int:
        """Connections this process accepted that are still open. Counted from the accept
        on: an association's own thread starts a little later, and in a burst of
        connections a count of those threads still said 0 when this process took the next
        one (four associations over two processes split 3 to 1 about as often as 2 to 2)."""
        self._accepted = [s for s in self._accepted if s.fileno() != -1]  # closed: -1
        return len(self._accepted)

    def server_close(self) -> None:
        # no shutdown(): that would stop the other processes listening too
        assert self.socket is not None
        self.socket.close()

    def shutdown(self) -> None:
        # not registered with the AE (we start it ourselves): stop and close, nothing more
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def shared_server_class(listen_fd: int) -> type[SharedSocketServer]:
    return type("SharedSocketServer", (SharedSocketServer,), {"listen_fd": listen_fd})


def build_ae(settings: Settings) -> AE:
    """An AE that accepts C-ECHO and the storage SOP classes in every transfer syntax: the
    standard ones pynetdicom lists, and with ``INGEST_UNKNOWN_SOP_CLASSES=accept`` any other
    (vendor-private ones, standard ones newer than pynetdicom), in the transfer syntax the
    sender proposes first."""
    # pynetdicom's documented switch, one of its module-wide settings
    internals.configure(unrestricted_storage=settings.unknown_sop_classes == "accept")
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.require_called_aet = settings.require_called_aet
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, TRANSFER_SYNTAXES)
    # Storage Commitment: we are its SCP; a requester proposing role selection gets what
    # it proposes
    ae.add_supported_context(commitment.STORAGE_COMMITMENT, _UNCOMPRESSED, scu_role=True,
                             scp_role=True)
    return ae


class StabiliserProcess:
    """The study stabiliser (:mod:`receiver.stabiliser`) in a process of its own: its catalog
    work takes no CPU time or GIL from the associations."""

    def __init__(self, settings: Settings) -> None:
        self.env = dict(os.environ) | environment(settings)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "receiver.stabiliser"],
                                     env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE)

    def wait_ready(self, timeout: float = 10.0,
                   stopping: Callable[[], bool] = lambda: False) -> None:
        """Wait (up to ``timeout``, or until ``stopping()``) until the stabiliser has made its
        first pass, which opens the catalog (imports, migrations: seconds of CPU): start-up
        work that then does not land on the first associations. It says so with a line on
        its standard output. A catalog that is down fails that pass within its connect
        timeout; the receiver serves all the same."""
        if self.proc is None or self.proc.stdout is None:
            return
        out = self.proc.stdout
        deadline = time.monotonic() + timeout
        try:
            while not stopping():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("study stabiliser not ready after %.0f s; serving meanwhile",
                                timeout)
                    return
                if select.select([out], [], [], min(left, 0.25))[0]:
                    if out.readline() != b"ready\n":  # the pipe closed: it ended
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self.proc.wait(2)
                        log.error("study stabiliser ended at start (exit status %s); "
                                  "serving without it", self.proc.returncode)
                    return
        finally:
            out.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def private_handlers(settings: Settings, context: StoreContext,
                     metrics: ReceiverMetrics) -> list[Any]:
    """The handlers that reach into pynetdicom's internals (:mod:`receiver.internals`): the
    PDU bounds, the waiting reactors and the fast path. None where the installed pynetdicom
    lacks one of them: the receiver then runs on plain pynetdicom, and says so once."""
    if not internals.tested_release():
        log.warning("receiver: pynetdicom %s is not a release the tests exercise (%s)",
                    pynetdicom.__version__, ", ".join(internals.TESTED))
    if not internals.available():
        log.warning("receiver: pynetdicom %s lacks what the fast path, the reactors and the "
                    "PDU bounds use (%s); running on plain pynetdicom without them",
                    pynetdicom.__version__, "; ".join(internals.missing()))
        return []
    reactors.install()
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, limits.on_connection, [metrics]),
        (evt.EVT_CONN_OPEN, reactors.on_connection),
        (evt.EVT_CONN_CLOSE, reactors.on_closed),
    ]
    if settings.receiver_fast_path:
        handlers += [(evt.EVT_CONN_OPEN, fastpath.on_connection, [context]),
                     (evt.EVT_CONN_CLOSE, fastpath.on_closed)]
    return handlers


def _daemon_dul(event: Any) -> None:
    """pynetdicom's DUL thread is not a daemon: one still waiting for a peer to close its end
    after a release would hold the process open at exit for a minute. By then everything
    acked is durable, so the process may end without it."""
    event.assoc.dul.daemon = True


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """DICOM TLS from the settings; with a CA, clients must present a certificate it signed."""
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca:
        context.load_verify_locations(cafile=settings.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class Receiver:
    """A running receiver; :meth:`stop` shuts it down in order."""

    settings: Settings
    server: Any
    publisher: Publisher
    sweeper: PeriodicSweeper
    monitor: SpoolMonitor
    metrics: ReceiverMetrics
    spool: Spool
    committer: commitment.Committer
    stabiliser: StabiliserProcess

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking associations, give the running ones ``timeout`` seconds to finish
        (then abort them: their in-flight instance was never acked), publish what is queued."""
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        self.server.shutdown()  # closes the listening socket
        deadline = time.monotonic() + timeout
        running = self._established()
        if running:
            log.info("receiver: waiting up to %.0f s for %d association(s) to finish",
                     timeout, len(running))
        while running and time.monotonic() < deadline:
            time.sleep(0.05)
            running = self._established()
        for assoc in running:
            log.warning("receiver: aborting an association from %s at the deadline",
                        str(assoc.requestor.ae_title).strip())
            assoc.abort()
        self.sweeper.stop()
        self.stabiliser.stop()
        self.committer.stop()
        self.monitor.stop()
        self.publisher.stop()
        if self.spool.temp_files is not None:
            self.spool.temp_files.stop()

    def _established(self) -> list[Any]:
        # a rejected or released association's thread can linger a while: not ours to wait on
        return [a for a in self.server.active_associations if a.is_established]


def start(settings: Settings, listen_fd: int | None = None,
          before_serving: Callable[[], None] | None = None,
          stopping: Callable[[], bool] = lambda: False) -> Receiver:
    """Start listening (non-blocking) with the publisher and the periodic sweeper. With
    ``listen_fd``, serve that listening socket, which other receiver processes share.
    ``before_serving`` runs once everything is built, just before this process serves."""
    spool = Spool(settings.spool_dir)
    spool.ensure()
    # the publisher process and the sweeper send to this spool's queue
    settings = settings.replace(spool_id=settings.spool_id or spool.identity())
    queue = queue_for(settings.spool_id)
    spool.temp_files = TempFilePool(spool.tmp_dir)
    spool.temp_files.start()
    # Stream every incoming dataset to a temp file on the spool filesystem, so memory does not
    # grow with instance size and the finished file can be renamed into the spool.
    internals.configure(unrestricted_storage=settings.unknown_sop_classes == "accept")
    new_stream = streams.Streams(spool)
    streams.install(new_stream)
    metrics = ReceiverMetrics()
    app = make_celery(settings, "dicom-ingest-receiver")
    publisher = Publisher(settings, on_failure=metrics.enqueue_failures.inc)
    publisher.start()
    sweeper = PeriodicSweeper(
        spool, lambda rid: publish(app, queue, rid), settings.sweep_interval,
        settings.sweep_age, queue_length=lambda: queue_length(settings.redis_url, queue),
    )
    if settings.receiver_index == 0:  # one sweeper per spool is enough
        sweeper.start()
    monitor = SpoolMonitor(spool, settings.spool_min_free_mb * 2**20, settings.spool_max_depth,
                           settings.spool_max_age, report=metrics.spool_counted)
    monitor.start()
    context = StoreContext(spool=spool, enqueuer=publisher, gate=monitor, metrics=metrics,
                           new_stream=new_stream)
    associations = AssociationContext(settings, metrics)
    requests = commitment.Requests(settings.spool_dir)
    requests.ensure()
    commitments = commitment.CommitmentContext(requests, metrics.commitment)
    committer = commitment.Committer(
        commitments, LazyCatalog(catalog_url(settings)), settings.ae_title,
        settings.commitment_peers, settings.commitment_timeout, settings.commitment_expiry,
        commitment.send_on_new_association)
    committer.start()
    stabiliser = StabiliserProcess(settings)
    if settings.receiver_index == 0:  # one per spool is enough; more would only race
        stabiliser.start()
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, _daemon_dul),
        (evt.EVT_C_STORE, handle_store, [context]),  # what the fast path leaves to pynetdicom
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_ACCEPTED, on_accepted, [associations]),
        (evt.EVT_REJECTED, on_rejected, [associations]),
        (evt.EVT_RELEASED, on_ended),
        (evt.EVT_ABORTED, on_ended),
        (evt.EVT_N_ACTION, commitment.handle_action, [commitments]),
        (evt.EVT_RELEASED, commitment.on_ended, [commitments]),
        (evt.EVT_ABORTED, commitment.on_ended, [commitments]),
        (evt.EVT_CONN_CLOSE, commitment.on_ended, [commitments]),
    ]
    handlers += private_handlers(settings, context, metrics)
    ae = build_ae(settings)
    stabiliser.wait_ready(stopping=stopping)
    if before_serving is not None:
        before_serving()
    server: Any
    if listen_fd is not None:
        server = ae.make_server((settings.host, settings.port), evt_handlers=handlers,
                                ssl_context=tls_context(settings),
                                server_class=shared_server_class(listen_fd))
        threading.Thread(target=server.serve_forever, name="acceptor", daemon=True).start()
    else:
        server = ae.start_server((settings.host, settings.port), block=False,
                                 evt_handlers=handlers, ssl_context=tls_context(settings))
    server.contexts = SharedContexts(server.contexts)
    receiver = Receiver(settings, server, publisher, sweeper, monitor, metrics, spool,
                        committer, stabiliser)
    log.info("receiver %s listening on %s:%d%s (process %d of %d), spool %s, broker %s",
             settings.ae_title, settings.host, receiver.port,
             " (TLS)" if settings.tls_cert else "", settings.receiver_index + 1,
             receiver_processes(settings), settings.spool_dir, redact_url(settings.redis_url))
    return receiver


def run(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then stop cleanly. With more than one receiver process
    (:func:`receiver_processes`), open the listening socket, start the others on it (see
    :class:`SharedSocketServer`) and stop them too. With a metrics port, the first process
    serves there the metrics of all of them, summed (:func:`ingest.metrics.summed`)."""
    # first: nothing here has imported prometheus_client yet (the extra processes are given
    # the directory in their environment)
    port = settings.metrics_port if settings.receiver_index == 0 else 0
    with summed_metrics.summed(port) as metrics_dir:
        return _run(settings, metrics_dir)


def _run(settings: Settings, metrics_dir: Path | None) -> int:
    stop = StopSignals().install()  # a handler that only sets a flag: see StopSignals
    # kill -USR1: every thread's stack on stderr, for a receiver that seems stuck
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # This process never decodes a dataset, and the UIDs it reads (presentation contexts,
    # command sets) become neither paths nor keys: the workers check the instance's own.
    # pydicom's check of each one against its pattern, hundreds per association (every
    # context a sender proposes), is not needed here.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    extra: list[subprocess.Popen[bytes]] = []
    listener = None
    listen_fd = int(os.environ[LISTEN_FD_ENV]) if os.environ.get(LISTEN_FD_ENV) else None
    start_others = None
    processes = receiver_processes(settings)
    if processes > 1 and settings.receiver_index == 0:
        listener = listening_socket(settings.host, settings.port)
        listen_fd = listener.fileno()
        shared_fd = listen_fd

        def start_others() -> None:
            # once this process is built: the others serve as soon as they are ready, and
            # this one must not then still be starting, taking CPU from them and no
            # connections for a while
            extra.extend(_start_others(settings, shared_fd, processes, metrics_dir))

    try:
        receiver = start(settings, listen_fd, before_serving=start_others,
                         stopping=lambda: stop.requested)
    except BaseException:  # none left serving the socket without this process
        for proc in extra:
            proc.kill()
            proc.wait()
        raise
    if ready := os.environ.get(READY_FD_ENV):
        with contextlib.suppress(OSError):
            os.write(int(ready), b"r")
            os.close(int(ready))
    # An extra process serves only while the first one runs: if that one dies (SIGKILL, the
    # OOM killer), a restarted receiver must find the port free, not held by orphans.
    first = os.getppid() if settings.receiver_index > 0 else None
    running = list(extra)
    while not stop.wait(0.5):  # waking now and then to look for the first process
        if first is not None and os.getppid() != first:
            log.warning("receiver %d: the first receiver process is gone; stopping",
                        settings.receiver_index)
            break
        # an extra process that exited on its own (not one a signal to the group stopped)
        for proc in [p for p in running if p.poll() is not None and not stop.requested]:
            running.remove(proc)
            log.error("receiver: an extra receiver process exited (%s); serving without it",
                      proc.returncode)
            if metrics_dir is not None:
                summed_metrics.process_gone(metrics_dir, proc.pid)
    if stop.requested:
        log.info("receiver: %s, stopping", stop.name)
    for proc in extra:
        proc.send_signal(signal.SIGTERM)
    receiver.stop()
    if listener is not None:
        listener.close()
    for proc in extra:
        try:
            proc.wait(settings.shutdown_timeout + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.info("receiver stopped")
    stop.finished()
    return 0


def _start_others(settings: Settings, listen_fd: int, processes: int,
                  metrics_dir: Path | None) -> list[subprocess.Popen[bytes]]:
    """Start the extra receiver processes on ``listen_fd`` and wait until each serves it
    (or has failed): connections wait in the socket's backlog meanwhile, and then the first
    ones are spread over all the processes instead of going to the first process up. With
    ``metrics_dir``, they write their metrics there, for the first process to sum."""
    ready_r, ready_w = os.pipe()
    procs = []
    metrics_env = {} if metrics_dir is None else {summed_metrics.ENV: str(metrics_dir)}
    try:
        for index in range(1, processes):
            env = (dict(os.environ) | environment(settings.replace(receiver_index=index))
                   | metrics_env
                   | {LISTEN_FD_ENV: str(listen_fd), READY_FD_ENV: str(ready_w)})
            procs.append(subprocess.Popen([sys.executable, "-m", "receiver"],
                                          env=env, stdin=subprocess.DEVNULL,
                                          pass_fds=(listen_fd, ready_w)))
        os.close(ready_w)
        ready_w = -1
        waiting, deadline = len(procs), time.monotonic() + _START_TIMEOUT
        while waiting and (left := deadline - time.monotonic()) > 0:
            if not select.select([ready_r], [], [], left)[0]:
                break
            got = os.read(ready_r, waiting)
            if not got:  # every process that could still say so has exited
                break
            waiting -= len(got)
        if waiting:
            log.warning("receiver: %d of %d extra receiver process(es) did not start; "
                        "serving without them", waiting, len(procs))
    except BaseException:  # none left running on the socket without the first process
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    return procs
