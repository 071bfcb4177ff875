"""Stop requests by signal (SIGTERM, SIGINT), taken in a way that is safe in a handler."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM and SIGINT ask this process to stop; its main loop waits in :meth:`wait` and
    then stops (and may log it) outside any handler.

    The handler only assigns an attribute. Python runs a handler between two bytecodes of
    the main thread, also inside another handler: a handler that takes a lock
    (``Event.set()``, logging) deadlocks when a second signal lands while the first one
    holds it, and a whole process group signalled at once (systemd, ``kill -- -PGID``,
    Ctrl-C in a terminal while ``up`` forwards it too) brings exactly that. The byte that
    wakes :meth:`wait` is written by Python's C-level handler (:func:`signal.set_wakeup_fd`),
    also when the kernel delivers the signal to another thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def install(self) -> StopSignals:
        """Take SIGTERM and SIGINT in this process; from the main thread."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # an assignment and nothing else: no lock, no logging, no Event.set() (see above)
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        """The signal that asked to stop, for the log line the caller writes."""
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"

    def wait(self, timeout: float) -> bool:
        """Whether a stop was asked for, waiting up to ``timeout`` seconds for one."""
        deadline = time.monotonic() + timeout
        while self.signum is None and (left := deadline - time.monotonic()) > 0:
            if select.select([self._read], [], [], left)[0]:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._read, 512):
                        pass
        return self.signum is not None

    def finished(self) -> None:
        """The stop is done: ignore SIGTERM and SIGINT until the process exits. Python puts
        their default action back while it finalizes, and one more signal of a burst would
        otherwise end a process that stopped cleanly with -SIGTERM instead of its status."""
        ignore_stop_signals()
        signal.set_wakeup_fd(-1)
        os.close(self._read)
        os.close(self._write)


def ignore_stop_signals() -> None:
    """Ignore SIGTERM and SIGINT from here on (see :meth:`StopSignals.finished`)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
