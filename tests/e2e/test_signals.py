"""A burst of SIGTERM and SIGINT to a whole process group, as systemd (KillMode=control-group),
``kill -- -PGID`` or Ctrl-C in a terminal send them: every process stops cleanly, every time.

A signal handler that takes a lock (``Event.set()``, logging) deadlocks when a second signal
lands while the first one holds it; a handler that only sets a flag cannot. The race is
narrow, so each test repeats its burst over several fresh process groups."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ingest.settings import Settings, environment
from tests.processes import Pipeline
from tests.support import cli, free_port, port_open, wait_for

pytestmark = pytest.mark.e2e

ROUNDS = 10  # fresh process groups per test, each sent one burst
BURST_SECONDS = 0.2  # each burst: SIGTERM and SIGINT alternating, as fast as they go


def burst(pgid: int) -> int:
    """Signal the group without pause for a moment: signals keep landing while the earlier
    ones are being handled, the window in which a handler that takes a lock deadlocks.
    Returns how many were sent."""
    sent, deadline = 0, time.monotonic() + BURST_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGTERM if sent % 2 == 0 else signal.SIGINT)
        except ProcessLookupError:  # every process has exited already
            break
        sent += 1
    return sent


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def stopped(proc: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
    """Wait for ``proc`` and for every other process of its group; on a timeout kill the
    group (nothing is left behind) and fail."""
    try:
        code = proc.wait(timeout)
        wait_for(lambda: group_gone(proc.pid), 30, what="the rest of the process group")
    except (subprocess.TimeoutExpired, AssertionError):
        with contextlib.suppress(ProcessLookupError):  # stacks into the log (faulthandler,
            os.killpg(proc.pid, signal.SIGUSR1)  # Celery's cry handler) to show where
        with contextlib.suppress(AssertionError):
            wait_for(lambda: "most recent call first" in log.read_text(errors="replace"), 5,
                     what="the stacks")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        text = log.read_text(errors="replace")
        stuck = text.find("Current thread")  # the main thread's stack, if there is one
        pytest.fail(f"not stopped, its whole group, within {timeout:.0f} s of a burst of signals:\n"
                    + (text[stuck:stuck + 3000] if stuck >= 0 else text[-6000:]))
    return code


def _pipeline(log_dir: Path, redis_url: str, **overrides: object) -> Pipeline:
    values: dict[str, object] = dict(
        host="127.0.0.1", port=free_port(), spool_dir=log_dir / "spool",
        archive_url=str(log_dir / "archive"), redis_url=redis_url, spool_min_free_mb=0,
        sweep_interval=1, sweep_age=3, worker_concurrency=2, shutdown_timeout=10.0,
        catalog_url=f"sqlite:///{log_dir / 'catalog.sqlite'}",
    )
    settings = Settings(**(values | overrides))  # type: ignore[arg-type]
    env = dict(os.environ) | environment(settings) | {"PYTHONWARNINGS": "ignore"}
    log_dir.mkdir(parents=True)
    return Pipeline(settings, env, log_dir, {})


def receiver_round(log_dir: Path, redis_url: str) -> None:
    pipeline = _pipeline(log_dir, redis_url, receiver_processes=3)
    pipeline.start("receiver", new_session=True)
    # the port opens as the first process starts the others: wait until all three serve
    wait_for(lambda: pipeline.log("receiver").count(" listening on ") == 3, 60,
             what="three receiver processes")
    proc = pipeline.processes.pop("receiver")
    burst(proc.pid)
    code = stopped(proc, pipeline.settings.shutdown_timeout + 30, log_dir / "receiver.log")
    text = pipeline.log("receiver")
    assert code == 0, text
    assert text.count("receiver stopped") == 3, text  # the first process and the two others
    assert not port_open(pipeline.port)


def worker_round(log_dir: Path, redis_url: str) -> None:
    pipeline = _pipeline(log_dir, redis_url)
    pipeline.start("worker", new_session=True)  # returns once it is ready
    proc = pipeline.processes.pop("worker")
    burst(proc.pid)
    code = stopped(proc, 60, log_dir / "worker.log")
    text = pipeline.log("worker")
    assert code == 0, text
    assert "warm shutdown" in text and "Cold shutdown" not in text, text  # one, and warm


def up_round(cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    port = free_port()
    env |= {"INGEST_PORT": str(port), "INGEST_SPOOL_MIN_FREE_MB": "0",
            "INGEST_RECEIVER_PROCESSES": "2", "INGEST_SHUTDOWN_TIMEOUT": "10",
            "PYTHONWARNINGS": "ignore"}
    cwd.mkdir()
    log_path = cwd / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cli("up", "--workers", "1"), cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_for(lambda: (port_open(port)
                          and log_path.read_text(errors="replace").count(" listening on ") == 2
                          and " ready." in log_path.read_text(errors="replace"))
                 or proc.poll() is not None, 90, what="the receivers and the worker")
        assert proc.poll() is None, log_path.read_text(errors="replace")
        burst(proc.pid)
    finally:
        code = stopped(proc, 90, log_path)
    text = log_path.read_text(errors="replace")
    assert code == 0, text
    assert "pipeline stopped" in text
    assert not port_open(port)


def test_burst_stops_a_receiver_of_several_processes(tmp_path: Path, redis_url: str) -> None:
    for round_ in range(ROUNDS):
        receiver_round(tmp_path / str(round_), redis_url)


def test_burst_stops_a_worker(tmp_path: Path, redis_url: str) -> None:
    for round_ in range(ROUNDS):
        worker_round(tmp_path / str(round_), redis_url)


def test_burst_stops_up(tmp_path: Path) -> None:
    for round_ in range(ROUNDS):
        up_round(tmp_path / str(round_))
