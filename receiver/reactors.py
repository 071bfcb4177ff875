"""pynetdicom's two reactors, made to wait for work instead of polling for it.

Each association has two threads. The DUL thread loops: anything queued to send? a PDU on
the socket? and when neither, it sleeps ``_run_loop_delay`` (1 ms). The association thread
loops: a DIMSE message? a release or abort? then sleeps a hard-coded 1 ms. Every C-STORE
waits on both polls, and every idle association wakes both threads a thousand times a
second, each wake-up taking Python's GIL from the threads that have work.

Here, once a connection opens:

- the DUL thread of an established association waits in ``select`` on its socket and on a
  wake-up socket that is written whenever the association thread queues something to send;
- the association thread waits on an event that is set whenever the DUL thread queues a
  primitive for it or the DIMSE layer completes a message.

Both waits time out after :data:`WAIT`, which bounds how late a thread notices that it was
told to stop or that the network idle timer ran out. Outside the established state (during
negotiation, after a release) pynetdicom's own code runs with its own poll.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from receiver import internals

WAIT = 0.05  # seconds a reactor waits for work before it looks around anyway
_REACTOR_TURN = 0.001  # the association reactor's hard-coded sleep
_ESTABLISHED = "Sta6"


def wait_readable(sock: Any, timeout: float, also: tuple[Any, ...] = ()) -> list[Any]:
    """Which of ``sock`` and ``also`` have data to read within ``timeout`` seconds. A TLS
    socket may hold decrypted data that ``select`` cannot see: that counts at once. Raises
    OSError or ValueError when the socket is gone."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return [sock]
    ready, _, _ = select.select([sock, *also], [], [], timeout)
    return ready


def _association_sleep(seconds: float) -> None:
    """``time.sleep`` as pynetdicom's association module sees it: the reactor's turn waits
    for its association's wake-up event instead, where there is one."""
    if seconds == _REACTOR_TURN:
        wake = getattr(threading.current_thread(), "_dicom_ingest_wake", None)
        if isinstance(wake, threading.Event):
            wake.wait(WAIT)
            wake.clear()  # before the reactor looks: a later set() wakes the next turn
            return
    time.sleep(seconds)


def _dul_sleep(seconds: float) -> None:
    """``time.sleep`` as pynetdicom's DUL module sees it. Its reactor sleeps
    ``_run_loop_delay`` after every turn that queued no event for the state machine, such as
    a turn in which the fast path took a whole C-STORE; :class:`DULWaiter` sets that delay
    to 0, its ``select`` doing the waiting. ``time.sleep(0)`` is still a system call that
    gives up the GIL; in the reactor's own thread it now returns at once. Anywhere else (the
    association thread waiting in ``stop_dul`` for the reactor to end) it sleeps as before,
    so that wait still lets the reactor run."""
    if seconds > 0 or not internals.is_dul_thread(threading.current_thread()):
        time.sleep(seconds)


def install() -> None:
    """Give ``pynetdicom.association`` a ``time`` module whose reactor sleep waits for work,
    and ``pynetdicom.dul`` one whose reactor does not sleep for nothing (module attributes,
    set once at the receiver's entry, like pynetdicom's ``_config``)."""
    internals.replace_sleeps(_association_sleep, _dul_sleep)


class DULWaiter:
    """The DUL thread's wait, installed on one association's DUL."""

    def __init__(self, dul: internals.Dul) -> None:
        self.dul = dul
        self._pynetdicom_transport_event: Callable[[], bool] = lambda: False
        self._poll = 0.001
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closed = False

    def install(self) -> None:
        dul = self.dul
        self._pynetdicom_transport_event = dul.replace_transport_check(self.transport_event)
        internals.wake_on_put(dul.outgoing(), self.wake)
        self._poll = dul.set_poll_delay(0)  # transport_event does the waiting

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full: awake already; closed: it is over
            self._wake_w.send(b"\0")

    def close(self) -> None:
        self._closed = True
        self._wake_r.close()
        self._wake_w.close()

    def transport_event(self) -> bool:
        """Replaces ``DULServiceProvider._is_transport_event``: True when a PDU was read."""
        dul = self.dul
        if dul.state != _ESTABLISHED or dul.transport is None or self._closed:
            if self._pynetdicom_transport_event():
                return True
            time.sleep(self._poll)  # pynetdicom's own poll, which its loop no longer sleeps
            return False
        sock: Any = dul.sock
        try:
            ready = wait_readable(sock, WAIT, (self._wake_r,))
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass
        except (OSError, ValueError):  # the socket went away: pynetdicom's check says so
            return self._pynetdicom_transport_event()
        if sock in ready:
            dul.read_pdu()
            return True
        return False


def on_connection(event: Any) -> None:
    """EVT_CONN_OPEN handler: make this association's two reactors wait for work."""
    assoc = event.assoc
    wake = threading.Event()
    assoc._dicom_ingest_wake = wake
    dul = internals.Dul(assoc.dul)
    internals.wake_on_put(dul.incoming(), wake.set)
    internals.wake_on_put(internals.message_queue(assoc), wake.set)
    waiter = DULWaiter(dul)
    waiter.install()
    assoc._dicom_ingest_waiter = waiter


def on_closed(event: Any) -> None:
    """EVT_CONN_CLOSE handler."""
    waiter = getattr(event.assoc, "_dicom_ingest_waiter", None)
    if isinstance(waiter, DULWaiter):
        waiter.close()
