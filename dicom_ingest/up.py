"""``dicom-ingest up``: the whole pipeline on one machine (embedded Redis, receiver, workers)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from ingest.embedded import EmbeddedRedis
from ingest.settings import Settings, environment
from ingest.stopsignals import StopSignals

log = logging.getLogger("dicom_ingest.up")


def _child(role: str, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dicom_ingest", role, *args], env=env, stdin=subprocess.DEVNULL
    )


def metrics_port_clash(settings: Settings) -> str | None:
    """Why the receiver's and the workers' metrics ports would collide on this one machine,
    or None."""
    if settings.metrics_port and settings.metrics_port == settings.worker_metrics_port:
        return (f"INGEST_WORKER_METRICS_PORT and INGEST_METRICS_PORT are both "
                f"{settings.metrics_port}; give the workers another port")
    return None


def run(settings: Settings, data_dir: Path, flower: bool = False) -> int:
    """Start everything, restart what dies (a restart policy, as Compose and Kubernetes
    have), wait for Ctrl-C or SIGTERM, then stop in order."""
    clash = metrics_port_clash(settings)
    if clash:
        log.error("%s", clash)
        return 2
    redis: EmbeddedRedis | None = None
    if not settings.redis_url_explicit:
        redis = EmbeddedRedis(data_dir / "redis")
        redis.start()
        settings = settings.replace(redis_url=redis.url)
        log.info("embedded redis-server on %s (data in %s)", redis.url, data_dir / "redis")
    if not settings.catalog_url:  # the default catalog lives with the rest of up's data
        settings = settings.replace(
            catalog_url=f"sqlite:///{(data_dir / 'catalog.sqlite').resolve()}")
    env = dict(os.environ) | environment(settings)
    stop = StopSignals().install()  # a handler that only sets a flag: see StopSignals
    roles: list[tuple[str, tuple[str, ...]]] = [("receiver", ()), ("worker", ())]
    if flower:
        roles.append(("flower", ("--address", "127.0.0.1")))
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    restarts = {name: 0 for name, _ in roles}
    try:
        children = [(name, _child(name, env, *args)) for name, args in roles]
        log.info(
            "pipeline up: send to %s on port %d; archive %s; Ctrl-C stops it",
            settings.ae_title,
            settings.port,
            settings.archive_url,
        )
        while not stop.requested:
            for i, (name, proc) in enumerate(children):
                if proc.poll() is None or stop.requested:
                    continue
                # e.g. a worker that Celery gave up on when Redis went away; the spool still
                # holds everything, so a fresh process picks up where this one stopped
                restarts[name] += 1
                delay = min(30.0, 2.0 ** min(restarts[name], 5))
                log.error("%s exited with %s; restarting it in %.0f s", name,
                          proc.returncode, delay)
                if not stop.wait(delay):
                    children[i] = (name, _child(name, env, *dict(roles)[name]))
            stop.wait(0.2)
        log.info("%s: stopping the pipeline", stop.name)
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
        stop.finished()
    # a child may have been ended by the signal itself, before it took it (a Ctrl-C reaches
    # the whole process group): not a failure
    failed = [name for name, proc in children
              if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)]
    return 1 if failed else 0
