"""``dicom-ingest up``: the whole pipeline on one machine (embedded Redis, receiver, workers)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from ingest.embedded import EmbeddedRedis
from ingest.settings import Settings, environment

log = logging.getLogger("dicom_ingest.up")


def _child(role: str, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ingest.cli", role, *args], env=env, stdin=subprocess.DEVNULL
    )


def run(settings: Settings, data_dir: Path, flower: bool = False) -> int:
    """Start everything, wait for Ctrl-C or SIGTERM (or a child's death), stop in order."""
    redis: EmbeddedRedis | None = None
    if not settings.redis_url_explicit:
        redis = EmbeddedRedis(data_dir / "redis")
        redis.start()
        settings = settings.replace(redis_url=redis.url)
        log.info("embedded redis-server on %s (data in %s)", redis.url, data_dir / "redis")
    env = dict(os.environ) | environment(settings)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        children.append(("receiver", _child("receiver", env)))
        children.append(("worker", _child("worker", env)))
        if flower:
            children.append(("flower", _child("flower", env, "--address", "127.0.0.1")))
        log.info(
            "pipeline up: send to %s on port %d; archive %s; Ctrl-C stops it",
            settings.ae_title,
            settings.port,
            settings.archive_url,
        )
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    log.error("%s exited with %s; stopping the pipeline", name, proc.returncode)
                    stopping = True
            time.sleep(0.2)
    finally:
        # receiver first (no new instances), then workers (warm: finish the current task)
        for name, proc in children:
            if proc.poll() is None:
                log.info("stopping %s", name)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within 60 s; killing it", name)
                    proc.kill()
                    proc.wait()
        if redis is not None:
            redis.stop()
        log.info("pipeline stopped")
    failed = [name for name, proc in children if proc.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed else 0
