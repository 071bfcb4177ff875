"""Downstream consumers of study events, real ones: an HTTP server recording the webhook's
POSTs (that can fail its first answers, or be down for a while), and a worker process of
another Celery application running the hook task (``myapp.tasks.study_ready``) from its
queue."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.services import free_port, wait_for


@dataclass
class Post:
    body: bytes
    headers: dict[str, str]
    status: int
    at: float

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    def signed_with(self, secret: str) -> bool:
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-dicom-ingest-signature", ""), expected)


@dataclass
class WebhookServer:
    """Answers POST /hook with 503 to the first ``fail_first`` requests, then 200; records
    every request (answered or not). :meth:`stop` and :meth:`start` again: down meanwhile
    (connections refused), on the same port."""

    fail_first: int = 0
    port: int = field(default_factory=free_port)
    posts: list[Post] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def delivered(self) -> list[Post]:
        return [p for p in self.posts if p.status == 200]

    def start(self) -> WebhookServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = 503 if len(owner.posts) < owner.fail_first else 200
                owner.posts.append(Post(body, {k.lower(): v for k, v in self.headers.items()},
                                        status, time.time()))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@contextlib.contextmanager
def webhook(fail_first: int = 0) -> Iterator[WebhookServer]:
    server = WebhookServer(fail_first).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class HookCalls:
    """The arguments of every hook task the consumer's worker ran, read from its file."""

    out: Path

    def __call__(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.out.exists():
            return []
        return [tuple(json.loads(line)) for line in self.out.read_text().splitlines()]  # type: ignore[misc]


@contextlib.contextmanager
def hook_consumer(redis_url: str, queue: str, folder: Path,
                  name: str = "myapp.tasks.study_ready") -> Iterator[HookCalls]:
    """A real Celery worker process of another application (:mod:`tests.support.hookapp`)
    consuming ``queue``; yields what its ``name`` task was called with."""
    calls = HookCalls(folder / "hook-calls.jsonl")
    log_path = folder / "hook-worker.log"
    env = dict(os.environ) | {"HOOK_BROKER_URL": redis_url, "HOOK_QUEUE": queue,
                              "HOOK_OUT": str(calls.out), "HOOK_TASK": name,
                              "PYTHONWARNINGS": "ignore"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.support.hookapp", "worker", "-Q",
             queue, "--pool", "solo", "--without-mingle", "--without-gossip", "-l", "INFO"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[2])
    try:
        wait_for(lambda: " ready." in log_path.read_text(errors="replace")
                 or proc.poll() is not None, 60, what="the hook consumer's worker")
        assert proc.poll() is None, log_path.read_text(errors="replace")
        yield calls
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
