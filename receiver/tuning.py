"""Latency tuning of pynetdicom's reactors and the listening socket, applied once at the
receiver's entry (like pynetdicom's ``_config`` flags).

pynetdicom's two reactors poll: the DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever it
finds nothing to do, and the association thread sleeps a hard-coded 1 ms every turn. A
C-STORE waits on both, so every instance pays a few milliseconds of sleeping, whatever its
size. We shorten both polls: the DUL's through its attribute, the association's by giving
``pynetdicom.association`` a ``time`` module whose 1 ms sleep is shorter. Idle associations
then wake more often (a few thousand times a second each), which costs little CPU next to
what they do when busy.
"""

from __future__ import annotations

import socket
import socketserver
import time
import types
from typing import Any

import pynetdicom.association
from pynetdicom.transport import ThreadedAssociationServer

_REACTOR_TURN = 0.001  # the association reactor's hard-coded sleep
POLL = 0.0002  # what we poll at instead, in both reactors


def short_sleeps(poll: float) -> types.ModuleType:
    """A stand-in for the ``time`` module whose reactor-turn sleep lasts ``poll`` seconds."""
    module = types.ModuleType("time")
    module.__dict__.update(time.__dict__)

    def sleep(seconds: float) -> None:
        time.sleep(poll if seconds == _REACTOR_TURN else seconds)

    module.sleep = sleep  # type: ignore[attr-defined]
    return module


def install(poll: float) -> None:
    """Shorten the association reactor's poll to ``poll`` seconds (0 < poll <= 1 ms)."""
    if 0 < poll < _REACTOR_TURN:
        setattr(pynetdicom.association, "time", short_sleeps(poll))  # noqa: B010


def on_connection(event: Any, poll: float) -> None:
    """EVT_CONN_OPEN handler: shorten this association's DUL poll."""
    if 0 < poll < _REACTOR_TURN:
        event.assoc.dul._run_loop_delay = poll


class ReusePortServer(ThreadedAssociationServer):
    """An association server whose socket several processes can bind (``SO_REUSEPORT``):
    the kernel spreads new connections across them."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        # not registered with the AE (we start it ourselves): stop and close, nothing more
        socketserver.BaseServer.shutdown(self)
        self.server_close()
