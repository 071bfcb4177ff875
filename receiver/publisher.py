"""Enqueue archive tasks by name, off the C-STORE path, in a process of their own.

The C-STORE path hands a receipt id to :class:`Publisher` and goes on at once. A thread
writes the ids, a line each, to a child process (``python -m receiver.publisher``) that
publishes them with Celery and writes back a line for each id it could not publish.

Why a process: publishing one task costs Celery and kombu about half a millisecond of Python
per instance. On a thread of the receiver it holds the GIL just when the next instance
arrives, and measurably slowed every association. In the child it runs on another core.

Nothing here can lose data: an entry whose task was never published (Redis down, the child
crashed with ids in its pipe) stays in the spool, and the sweeper enqueues it later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

from celery import Celery

from ingest import logs
from ingest.messages import ARCHIVE_TASK, QUEUE, check_receipt_id
from ingest.settings import Settings, environment

log = logging.getLogger("dicom_ingest.receiver")

_STOP = ""
_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}
_BATCH = 256  # ids written to the child in one go


def publish(app: Celery, receipt_id: str, producer: Any = None) -> None:
    """Send one archive task; raises when the broker cannot take it."""
    app.send_task(ARCHIVE_TASK, args=[receipt_id], queue=QUEUE, retry=True,
                  retry_policy=_RETRY_POLICY, producer=producer)


class Publisher:
    """Hands receipt ids to the publisher process: straight into its pipe when there is room
    (one system call on the C-STORE path, no thread switch), else through a bounded queue
    that a thread drains, starting a new process when the old one is gone."""

    def __init__(self, settings: Settings, capacity: int = 10_000,
                 on_failure: Callable[[], None] | None = None) -> None:
        self._env = dict(os.environ) | environment(settings)
        self._on_failure = on_failure
        self._queue: queue.Queue[str] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._child: subprocess.Popen[bytes] | None = None
        self._fd = -1  # the write end of the child's stdin, non-blocking; -1: none
        self._lock = threading.Lock()  # guards _child and _fd
        self._readers: dict[int, threading.Thread] = {}  # failure readers by child pid
        self.failures = 0  # ids the child could not publish
        self.restarts = 0  # times the child had to be started again

    def start(self) -> None:
        with self._lock:
            self._spawn()
        self._thread.start()

    def submit(self, receipt_id: str) -> None:
        line = f"{receipt_id}\n".encode()
        if self._queue.empty():
            with self._lock:
                try:  # at most PIPE_BUF bytes: written whole or not at all
                    if self._fd >= 0 and os.write(self._fd, line) == len(line):
                        return
                except OSError:  # full, or the child is gone: the thread sees to it
                    pass
        try:
            self._queue.put_nowait(receipt_id)
        except queue.Full:
            log.warning("publish queue full; receipt %s left to the sweeper", receipt_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Hand over what is queued, let the child publish it (up to ``timeout``), stop."""
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        with self._lock:
            child, fd, self._child, self._fd = self._child, self._fd, None, -1
            if fd >= 0:
                os.close(fd)  # end of input: the child publishes the rest and exits
        if child is None:
            return
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("publisher process did not finish in %.0f s; the sweeper will enqueue "
                        "what it had not published", timeout)
            child.kill()
            child.wait()
        self._reap(child)

    def _reap(self, child: subprocess.Popen[bytes]) -> None:
        """After the child ended: let its failure reader see the end, close the pipe."""
        reader = self._readers.pop(child.pid, None)
        if reader is not None:
            reader.join(5)
        if child.stdout is not None:
            child.stdout.close()

    def _spawn(self) -> None:
        """Start a publisher process (with the lock held)."""
        child = subprocess.Popen(
            [sys.executable, "-m", "receiver.publisher"], env=self._env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert child.stdin is not None and child.stdout is not None
        self._fd = os.dup(child.stdin.fileno())
        child.stdin.close()
        os.set_blocking(self._fd, False)
        self._child = child
        reader = threading.Thread(target=self._read_failures, args=(child.stdout,),
                                  name="publisher-failures", daemon=True)
        reader.start()
        self._readers[child.pid] = reader

    def _read_failures(self, stdout: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):  # closed under it: the child is gone
            self._count_failures(stdout)

    def _count_failures(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            receipt_id = line.decode(errors="replace").strip()
            with self._lock:
                self.failures += 1
            if self._on_failure is not None:
                self._on_failure()
            log.debug("publish of %s failed in the publisher process", receipt_id)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            ids = [rid for rid in batch if rid != _STOP]
            if ids:
                self._write(ids)
            if _STOP in batch:
                return

    def _write(self, ids: list[str]) -> None:
        """Write ids to the child, waiting for room; a new child if this one is gone."""
        chunks, chunk = [], b""
        for rid in ids:
            line = f"{rid}\n".encode()
            if len(chunk) + len(line) > select.PIPE_BUF:
                chunks.append(chunk)
                chunk = b""
            chunk += line
        chunks.append(chunk)
        for data in chunks:
            for _attempt in (1, 2):
                try:
                    self._write_chunk(data)
                    break
                except OSError as exc:
                    with self._lock:
                        self._replace_child(exc)
            else:
                log.error("receipts not handed to a publisher; the sweeper will enqueue them")

    def _write_chunk(self, data: bytes) -> None:
        while True:
            with self._lock:
                if self._fd < 0:
                    raise BrokenPipeError("no publisher process")
                try:
                    os.write(self._fd, data)  # at most PIPE_BUF: whole or not at all
                    return
                except BlockingIOError:
                    fd = self._fd
            select.select([], [fd], [], 1.0)  # full: wait for room, without the lock

    def _replace_child(self, exc: OSError) -> None:
        """With the lock held: end the current child and start another."""
        child = self._child
        log.error("publisher process gone (%s, exit status %s); starting another", exc,
                  None if child is None else child.poll())
        self.restarts += 1
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if child is not None:
            with contextlib.suppress(OSError):
                child.kill()
            child.wait()
            self._reap(child)
        self._spawn()


def main() -> int:
    """The publisher process: receipt ids on stdin, one per line; each one it could not
    publish goes back on stdout. It ends at the end of its input (the receiver closed it or
    died), after publishing what it read; the signals a terminal sends to the whole process
    group leave it to the receiver to end it that way."""
    from ingest.settings import from_env

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = from_env()
    logs.configure(settings.log_format, settings.log_level)
    from ingest.broker import make_celery

    app = make_celery(settings, "dicom-ingest-publisher")
    # one producer for the process's life (kombu reconnects it when Redis comes back)
    with app.producer_or_acquire() as producer:
        for line in sys.stdin.buffer:
            receipt_id = line.decode(errors="replace").strip()
            try:
                check_receipt_id(receipt_id)
                publish(app, receipt_id, producer)
            except Exception as exc:  # broker down: the sweeper re-enqueues from the spool
                log.warning("enqueue failed for receipt %.40s (%s); the sweeper will retry it",
                            receipt_id, exc)
                sys.stdout.write(f"{receipt_id}\n")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
