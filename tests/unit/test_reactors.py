"""The sleeps that receiver.reactors gives pynetdicom's DUL module."""

from __future__ import annotations

import threading
import time

import pynetdicom.dul
import pytest
from pynetdicom.dul import DULServiceProvider

from receiver import reactors


class _ReactorThread(DULServiceProvider):
    """A thread that is a DUL reactor, as far as the sleep can tell, and sleeps as the
    reactor's loop does: 0 after a turn with no event, pynetdicom's poll before the
    association is established."""

    def __init__(self) -> None:
        threading.Thread.__init__(self, name="reactor")

    def run(self) -> None:
        pynetdicom.dul.time.sleep(0)
        pynetdicom.dul.time.sleep(0.001)


def test_the_dul_reactor_does_not_sleep_for_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    reactors.install()
    slept: list[tuple[str, float]] = []
    real = time.sleep

    def spy(seconds: float) -> None:
        slept.append((threading.current_thread().name, seconds))
        real(seconds)

    monkeypatch.setattr(reactors.time, "sleep", spy)
    reactor = _ReactorThread()
    reactor.start()
    reactor.join(5)
    # the reactor's zero sleep is no system call; a real delay still sleeps
    assert slept == [("reactor", 0.001)]
    # stop_dul waits in another thread with the same zero delay: that one must still
    # sleep, or it would spin holding the GIL while the reactor tries to finish
    pynetdicom.dul.time.sleep(0)
    assert slept[-1] == (threading.current_thread().name, 0)
