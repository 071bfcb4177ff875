"""Enqueue archive tasks by name, off the C-STORE path, in a process of their own.

The C-STORE path hands a receipt id to :class:`Publisher` and goes on at once. A thread
writes the ids, a line each, to a child process (``python -m receiver.publisher``) that
enqueues them as Celery tasks and writes back a line for each id it could not enqueue.

Why a process: publishing costs CPU, and on a thread of the receiver it holds the GIL just
when the next instance arrives. In the child it runs on another core.

Why not Celery's ``send_task`` in the child: it builds each message through Celery's and
kombu's layers with one Redis round trip each, CPU that busy cores take from the
associations (``docs/performance.md``). The child writes the very message Celery would
write (task protocol 2 in kombu's Redis envelope: one JSON document per task, LPUSHed onto the
queue's list) itself, for all the ids it has read at once, in one LPUSH.
``tests/integration/test_pipeline.py`` compares it with what Celery writes, field by field,
and a real Celery worker consumes it in every end-to-end test.

Nothing here can lose data: an entry whose task was never published (Redis down, the child
crashed with ids in its pipe) stays in the spool, and the sweeper enqueues it later.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import IO, Any

from ingest import logs
from ingest.messages import ARCHIVE_TASK, MessageError, check_receipt_id
from ingest.settings import Settings, environment

log = logging.getLogger("dicom_ingest.receiver")

_STOP = ""
_BATCH = 256  # ids written to the child in one go
#: how long the child waits, once an id arrives, for more to push with it
GATHER_SECONDS = 0.01
_GATHER_MOST = 256  # ids after which the child stops waiting for more


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
        self._ready = threading.Event()  # the current child reads its pipe (or has ended)
        self.failures = 0  # ids the child could not publish
        self.restarts = 0  # times the child had to be started again

    def start(self, ready_timeout: float = 30.0) -> None:
        """Start the publisher process and wait until it reads its pipe (up to
        ``ready_timeout``): its start-up then does not take CPU from the first associations.
        Receipts handed over before it is ready wait in the pipe."""
        with self._lock:
            self._spawn()
            ready = self._ready
        self._thread.start()
        if not ready.wait(ready_timeout):
            log.warning("publisher process not ready after %.0f s; receipts wait in its pipe",
                        ready_timeout)

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
        self._ready = threading.Event()
        reader = threading.Thread(target=self._read_failures, args=(child.stdout, self._ready),
                                  name="publisher-failures", daemon=True)
        reader.start()
        self._readers[child.pid] = reader

    def _read_failures(self, stdout: IO[bytes], ready: threading.Event) -> None:
        try:
            with contextlib.suppress(OSError, ValueError):  # closed under it: the child is gone
                self._count_failures(stdout, ready)
        finally:
            ready.set()  # an ended child will not say it is ready: nobody waits for it

    def _count_failures(self, stdout: IO[bytes], ready: threading.Event) -> None:
        for line in stdout:
            receipt_id = line.decode(errors="replace").strip()
            if not receipt_id:  # the empty line the child writes once it reads its pipe
                ready.set()
                continue
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


#: what Celery 5 puts in the third element of a task's body (no callbacks, chain or chord)
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_message(receipt_id: str, origin: str, reply_to: str, queue: str) -> str:
    """The archive task for one receipt id, as Celery's ``send_task`` would put it on the
    Redis list: task protocol 2 (headers, and a body of args, kwargs and embed) in kombu's
    envelope (the body base64-encoded JSON, a fresh delivery tag). ``receipt_id`` has been
    checked (:func:`main` drops the lines that are not receipt ids)."""
    task_id = str(uuid.uuid4())
    body = json.dumps([[receipt_id], {}, _EMBED]).encode()
    return json.dumps({
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": ARCHIVE_TASK, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": repr([receipt_id]), "kwargsrepr": "{}", "origin": origin,
            "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id, "reply_to": reply_to, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    })


class QueueWriter:
    """Pushes archive tasks onto the queue's Redis list, many in one LPUSH."""

    def __init__(self, settings: Settings) -> None:
        import redis

        from ingest.broker import archive_queue

        self.queue = archive_queue(settings)
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10,
                                           socket_connect_timeout=5)
        self._origin = f"{os.getpid()}@{socket.gethostname()}"
        self._reply_to = str(uuid.uuid4())

    def push(self, receipt_ids: list[str]) -> None:
        """Enqueue one task per id, oldest first; raises when Redis cannot take them after
        two more tries (0.2 and 0.7 s later)."""
        messages = [task_message(rid, self._origin, self._reply_to, self.queue)
                    for rid in receipt_ids]
        delays = [0.2, 0.5]
        while True:
            try:
                # the list is the queue (kombu's binding records serve exchanges, which this
                # does not go through). LPUSH a b leaves b leftmost; workers pop from the
                # right, a first
                self._redis.lpush(self.queue, *messages)
                return
            except self._errors:
                if not delays:
                    raise
                time.sleep(delays.pop(0))

    def close(self) -> None:
        self._redis.close()


def _lines(fd: int, gather: float = 0.0, most: int = _GATHER_MOST) -> Any:
    """Receipt ids from ``fd`` in batches, until the end of input. A batch is what has
    arrived, and once something has, what else arrives within ``gather`` seconds (up to
    ``most`` lines): one LPUSH of a few tasks costs about what one of a single task does."""
    pending = b""
    ended = False
    while not ended:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        deadline = time.monotonic() + gather
        while pending.count(b"\n") < most:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            more = os.read(fd, 65536)
            if not more:
                ended = True
                break
            pending += more
        *complete, pending = pending.split(b"\n")
        ids = [line.decode(errors="replace").strip() for line in complete]
        if ids := [rid for rid in ids if rid]:
            yield ids
    if pending.strip():
        yield [pending.decode(errors="replace").strip()]


def main() -> int:
    """The publisher process: receipt ids on stdin, one per line; on stdout an empty line
    once it reads them, then each one it could not publish. It ends at the end of its input
    (the receiver closed it or died), after publishing what it read; the signals a terminal
    sends to the whole process group leave it to the receiver to end it that way."""
    from ingest.settings import from_env

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = from_env()
    logs.configure(settings.log_format, settings.log_level)
    writer = QueueWriter(settings)
    sys.stdout.write("\n")  # ready
    sys.stdout.flush()
    try:
        for batch in _lines(sys.stdin.fileno(), GATHER_SECONDS):
            good = []
            for receipt_id in batch:
                try:
                    good.append(check_receipt_id(receipt_id))
                except MessageError:
                    log.error("publisher: not a receipt id: %.80r", receipt_id)
            if not good:
                continue
            try:
                writer.push(good)
            except Exception as exc:  # broker down: the sweeper re-enqueues from the spool
                log.warning("enqueue failed for %d receipts (%s); the sweeper will retry them",
                            len(good), exc)
                sys.stdout.write("".join(f"{rid}\n" for rid in good))
                sys.stdout.flush()
    finally:
        writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
