"""Every private part of pynetdicom the receiver uses, named here and checked once at start.

The fast path (:mod:`receiver.fastpath`), the waiting reactors (:mod:`receiver.reactors`),
the PDU bounds (:mod:`receiver.limits`) and the spool streams (:mod:`receiver.streams`) reach
below pynetdicom's public API: for speed (the fast path, the reactors), for safety (the PDU
bounds) and so that a received dataset lands on the spool's filesystem (the streams). They
reach it only through this module. :func:`missing` looks for every name listed in
:data:`REQUIRED` in the pynetdicom that is installed; where one is gone (a release changed
it), :func:`available` is False and the receiver runs on plain pynetdicom: C-STOREs through
its own handler, its own reactors, no PDU bounds, with one warning at start.
"""

from __future__ import annotations

import functools
import importlib
import queue
import types
from collections.abc import Callable
from typing import Any

import pynetdicom
import pynetdicom.association
import pynetdicom.dimse
import pynetdicom.dimse_messages
import pynetdicom.dul
from pynetdicom import _config

#: the pynetdicom releases whose internals the tests exercise (pyproject.toml pins them)
TESTED = ("3.0",)

#: (module, class or None, name): the private names used, and why
REQUIRED: tuple[tuple[str, str | None, str, str], ...] = (
    ("pynetdicom.dul", "DULServiceProvider", "_read_pdu_data", "the PDU reader we replace"),
    ("pynetdicom.dul", "DULServiceProvider", "_decode_pdu", "decodes a PDU we read"),
    ("pynetdicom.dul", "DULServiceProvider", "_is_transport_event", "the reactor's poll"),
    ("pynetdicom.dul", "DULServiceProvider", "_recv_pdu", "where a decoded PDU goes"),
    ("pynetdicom.dul", "DULServiceProvider", "event_queue", "the state machine's events"),
    ("pynetdicom.dul", "DULServiceProvider", "to_provider_queue", "primitives to send"),
    ("pynetdicom.dul", "DULServiceProvider", "to_user_queue", "primitives for the ACSE"),
    ("pynetdicom.dul", "DULServiceProvider", "_run_loop_delay", "the reactor's sleep"),
    ("pynetdicom.dul", "DULServiceProvider", "_kill_thread", "the reactor told to stop"),
    ("pynetdicom.dul", "DULServiceProvider", "_idle_timer", "the network idle timer"),
    ("pynetdicom.dul", "DULServiceProvider", "state_machine", "the DUL's state"),
    ("pynetdicom.dul", "DULServiceProvider", "artim_timer", "the ACSE timeout"),
    ("pynetdicom.dul", "DULServiceProvider", "socket", "the association's socket"),
    ("pynetdicom.association", "Association", "_accepted_cx", "accepted contexts by id"),
    ("pynetdicom.dimse", "DIMSEServiceProvider", "msg_queue", "completed DIMSE messages"),
    ("pynetdicom.association", None, "time", "the reactor's sleep, a module global"),
    ("pynetdicom.dul", None, "time", "the DUL reactor's sleep, a module global"),
    ("pynetdicom.dimse_messages", None, "NamedTemporaryFile", "where datasets stream to"),
    ("pynetdicom._config", None, "STORE_RECV_CHUNKED_DATASET", "datasets streamed to disk"),
    ("pynetdicom._config", None, "UNRESTRICTED_STORAGE_SERVICE", "any storage SOP class"),
)


def _has(module: str, owner: str | None, name: str) -> bool:
    target: Any = importlib.import_module(module)
    if owner is None:
        return hasattr(target, name)
    cls = getattr(target, owner, None)
    if cls is None:
        return False
    if hasattr(cls, name):
        return True
    # an attribute set on the instance: __init__ stores it by this name
    init = getattr(cls, "__init__", None)
    code = getattr(init, "__code__", None)
    return code is not None and name in code.co_names


@functools.cache
def missing() -> tuple[str, ...]:
    """The required names the installed pynetdicom lacks (empty: all there)."""
    return tuple(f"{module}.{owner + '.' if owner else ''}{name} ({why})"
                 for module, owner, name, why in REQUIRED if not _has(module, owner, name))


def available() -> bool:
    return not missing()


def tested_release() -> bool:
    """Whether the installed pynetdicom is a release the tests exercise."""
    return ".".join(pynetdicom.__version__.split(".")[:2]) in TESTED


# -- module-wide settings (once, at the receiver's entry) ----------------------------------


def configure(unrestricted_storage: bool) -> None:
    """pynetdicom's documented switches: datasets stream to a file as they arrive; with
    ``unrestricted_storage`` any private or unknown abstract syntax is a storage context."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = unrestricted_storage


def replace_temporary_files(factory: Callable[..., Any]) -> None:
    """Make pynetdicom stream received datasets into files ``factory`` makes."""
    setattr(pynetdicom.dimse_messages, "NamedTemporaryFile", factory)  # noqa: B010


def temporary_files() -> Any:
    return getattr(pynetdicom.dimse_messages, "NamedTemporaryFile", None)


def _time_with(sleep: Callable[[float], None]) -> types.ModuleType:
    import time

    module = types.ModuleType("time")
    module.__dict__.update(time.__dict__)
    module.sleep = sleep  # type: ignore[attr-defined]
    return module


def replace_sleeps(association: Callable[[float], None], dul: Callable[[float], None]) -> None:
    """Give pynetdicom's association and DUL modules a ``time`` whose ``sleep`` is ours."""
    setattr(pynetdicom.association, "time", _time_with(association))  # noqa: B010
    setattr(pynetdicom.dul, "time", _time_with(dul))  # noqa: B010


def is_dul_thread(thread: Any) -> bool:
    return isinstance(thread, pynetdicom.dul.DULServiceProvider)


# -- one association ------------------------------------------------------------------------


def wake_on_put(target: queue.Queue[Any], wake: Callable[[], None]) -> None:
    """Call ``wake`` after each ``put`` on one of pynetdicom's queues."""
    put = target.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    target.put = put_and_wake  # type: ignore[method-assign]


def accepted_context(assoc: Any, context_id: int) -> Any:
    """The accepted presentation context with this id, or None."""
    return assoc._accepted_cx.get(context_id)


def message_queue(assoc: Any) -> queue.Queue[Any]:
    """The DIMSE provider's queue of completed messages."""
    return assoc.dimse.msg_queue  # type: ignore[no-any-return]


class Dul:
    """One association's DUL service provider, seen through the parts the receiver uses."""

    __slots__ = ("provider",)

    def __init__(self, provider: Any) -> None:
        self.provider = provider

    @property
    def assoc(self) -> Any:
        return self.provider.assoc

    @property
    def state(self) -> str:
        return str(self.provider.state_machine.current_state)

    @property
    def transport(self) -> Any:
        """pynetdicom's socket wrapper (``send``, ``close``), or None once it is gone."""
        return self.provider.socket

    @property
    def sock(self) -> Any:
        """The connection's own socket (TLS-wrapped where TLS is on), or None."""
        transport = self.provider.socket
        return transport.socket if transport is not None else None

    @property
    def artim_timer(self) -> Any:
        return self.provider.artim_timer

    def replace_reader(self, read: Callable[[], None]) -> None:
        """Make ``read`` what the DUL's reactor calls to read one PDU off the socket."""
        self.provider._read_pdu_data = read

    def replace_transport_check(self, check: Callable[[], bool]) -> Callable[[], bool]:
        """Make ``check`` the reactor's "did a PDU arrive?"; returns pynetdicom's own."""
        own: Callable[[], bool] = self.provider._is_transport_event
        self.provider._is_transport_event = check
        return own

    def read_pdu(self) -> None:
        """pynetdicom's reader as it is now (ours, where one was installed)."""
        self.provider._read_pdu_data()

    def set_poll_delay(self, seconds: float) -> float:
        """Set the reactor's sleep after an idle turn; returns the one it had."""
        before = float(self.provider._run_loop_delay)
        self.provider._run_loop_delay = seconds
        return before

    def deliver(self, pdu: bytes | bytearray) -> bool:
        """Hand a whole PDU to pynetdicom, as its own reader would; False (and an A-ABORT
        for an invalid PDU) when it cannot be decoded."""
        try:
            decoded, event = self.provider._decode_pdu(bytearray(pdu))
        except Exception:  # untrusted bytes: pynetdicom's own reader catches the same
            self.event("Evt19")
            return False
        self.event(event)
        self.provider._recv_pdu.put(decoded)
        return True

    def event(self, name: str) -> None:
        """Queue an event for the DUL's state machine (Evt17: transport closed; Evt19:
        invalid PDU, which aborts the association)."""
        self.provider.event_queue.put(name)

    def end_request_wait(self) -> None:
        """End the association thread's wait for an A-ASSOCIATE-RQ now (it takes None as
        that wait timing out)."""
        self.provider.to_user_queue.put(None)

    def has_work(self) -> bool:
        """Whether pynetdicom has something to do: stop, send, or a state machine event."""
        provider = self.provider
        return bool(provider._kill_thread or provider.to_provider_queue.queue
                    or provider.event_queue.queue)

    def restart_idle_timer(self) -> None:
        self.provider._idle_timer.restart()

    def outgoing(self) -> queue.Queue[Any]:
        return self.provider.to_provider_queue  # type: ignore[no-any-return]

    def incoming(self) -> queue.Queue[Any]:
        return self.provider.to_user_queue  # type: ignore[no-any-return]
