"""Services and tools the tests need: skipping (failing under CI), polling, ports,
DCMTK, subprocesses, the command line, Celery's event stream."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ingest.embedded import free_port

__all__ = ["IN_CI", "cli", "dcmtk", "dcmtk_env", "free_port", "need", "port_open", "run",
           "task_event_listener", "wait_for"]

IN_CI = os.environ.get("CI", "").lower() == "true"

T = TypeVar("T")


def need(available: bool, what: str) -> None:
    """Skip when a service or tool is missing; under CI=true that is a failure."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true")
    pytest.skip(f"{what} is not available")

def wait_for(check: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)

def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False

def dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    need(path is not None, f"DCMTK {tool} (apt-get install dcmtk)")
    assert path is not None
    return path

def dcmtk_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle on: without this every C-STORE waits ~40 ms
    return dict(os.environ, TCP_NODELAY="1")

def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 120,
        check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} exited {result.returncode}:\n{result.stdout}\n"
                             f"{result.stderr}")
    return result

def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dicom_ingest", *args]

@contextlib.contextmanager
def task_event_listener(settings: Any) -> Iterator[list[dict[str, Any]]]:
    """Listen to Celery's events on the settings' broker, as Flower does; yields the list the
    events arrive in, once the listener is subscribed."""
    import threading

    from ingest.broker import make_celery

    app = make_celery(settings, "events-test")
    seen: list[dict[str, Any]] = []
    ready = threading.Event()
    try:
        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": seen.append})
            receiver.on_consume_ready = lambda *args, **kwargs: ready.set()
            listener = threading.Thread(target=receiver.capture, daemon=True,
                                        kwargs={"limit": None, "timeout": None})
            listener.start()
            try:
                assert ready.wait(30), "the event receiver did not start"
                yield seen
            finally:
                receiver.should_stop = True
                listener.join(10)
    finally:
        app.close()
