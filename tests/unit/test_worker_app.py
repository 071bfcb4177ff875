"""The worker app factory's process count."""

from __future__ import annotations

import os

from ingest.settings import Settings
from tests.support import need
from workers.app import create_app, default_concurrency


def test_two_processes_per_usable_core_by_default(settings: Settings) -> None:
    # INGEST_WORKER_CONCURRENCY=0: the cores this process may run on, not all the machine's
    cores = len(os.sched_getaffinity(0))
    app = create_app(settings.replace(worker_concurrency=0))
    assert app.conf.worker_concurrency == 2 * cores
    assert default_concurrency() == 2 * cores


def test_an_explicit_process_count_is_kept(settings: Settings) -> None:
    assert create_app(settings.replace(worker_concurrency=3)).conf.worker_concurrency == 3


def test_the_default_follows_the_affinity_mask() -> None:
    need(len(os.sched_getaffinity(0)) >= 2, "two cores (to pin this process to one)")
    # a worker pinned to one core (taskset, a cpuset) starts two processes, not two per core
    # of the whole machine
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        assert default_concurrency() == 2
    finally:
        os.sched_setaffinity(0, before)
