"""``dicom-ingest receiver`` and ``dicom-ingest worker`` as processes, for e2e and fault tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ingest.settings import Settings, environment
from tests.support import cli, free_port, port_open, wait_for


@dataclass
class Pipeline:
    settings: Settings
    env: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]]
    restarts: int = 0

    def restart_dead(self, roles: tuple[str, ...] = ("receiver", "worker")) -> None:
        """What a restart policy (Compose's, Kubernetes') does: start again what died, of
        ``roles``."""
        for role, proc in list(self.processes.items()):
            if role in roles and proc.poll() is not None:
                self.restarts += 1
                with open(self.log_dir / f"{role}.log", "ab") as log:
                    log.write(f"\n--- restarted after exit {proc.returncode} ---\n".encode())
                self.start(role, keep_log=True)

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def archive(self) -> Path:
        return Path(self.settings.archive_url)

    def log(self, role: str) -> str:
        return (self.log_dir / f"{role}.log").read_text(errors="replace")

    def start(self, role: str, keep_log: bool = False, new_session: bool = False) -> None:
        """Start ``role``; with ``new_session``, as the leader of its own process group, which
        a test can then signal as a whole (``os.killpg``), as systemd or a terminal would."""
        if not keep_log:
            (self.log_dir / f"{role}.log").unlink(missing_ok=True)
        ready = self.log(role).count(" ready.") + 1 if keep_log else 1
        out = open(self.log_dir / f"{role}.log", "ab")  # noqa: SIM115 - closed with the process
        self.processes[role] = subprocess.Popen(cli(role), env=self.env, stdout=out,
                                                stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL,
                                                start_new_session=new_session)
        out.close()
        if role == "worker":
            wait_for(lambda: self.log("worker").count(" ready.") >= ready
                     or self.processes[role].poll() is not None, 60, what="the worker")
            assert self.processes[role].poll() is None, self.log("worker")
        if role == "receiver":
            wait_for(lambda: port_open(self.port) or self.processes[role].poll() is not None,
                     30, what="the receiver's port")
            assert self.processes[role].poll() is None, self.log("receiver")

    def stop(self, role: str, sig: int = signal.SIGTERM) -> int:
        proc = self.processes.pop(role)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


@contextlib.contextmanager
def start_pipeline(tmp_path: Path, redis_url: str, **overrides: Any) -> Iterator[Pipeline]:
    """Receiver and worker processes on a free port, spool and archive under ``tmp_path``;
    a short sweep age so that recovery does not wait five minutes."""
    values: dict[str, Any] = dict(
        host="127.0.0.1", port=free_port(), spool_dir=tmp_path / "spool",
        archive_url=str(tmp_path / "archive"), redis_url=redis_url, spool_min_free_mb=0,
        sweep_interval=1, sweep_age=3, worker_concurrency=2,
        # one receiver process, whatever the machine's cores: the fault tests kill "the"
        # receiver; tests of several processes ask for them
        receiver_processes=1,
        # the default catalog would be ./data/catalog.sqlite, beside the tests
        catalog_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}",
    )
    settings = Settings(**(values | overrides))
    env = dict(os.environ) | environment(settings)
    env["PYTHONWARNINGS"] = "ignore"
    running = Pipeline(settings, env, tmp_path, {})
    try:
        running.start("worker")
        running.start("receiver")
        yield running
    finally:
        for role in list(running.processes):
            running.stop(role)


@pytest.fixture
def pipeline(tmp_path: Path, redis_url: str) -> Iterator[Pipeline]:
    with start_pipeline(tmp_path, redis_url) as running:
        yield running


def stop_traced(proc: subprocess.Popen[bytes]) -> None:
    """Stop the process that ``proc``, an strace, traces, then strace, which ends with it
    (strace itself would detach on SIGTERM and leave its tracee running)."""
    from bench.servers import children

    for pid in children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
