"""Receivers with spools of their own on one Redis: each spool's tasks reach only the workers
that see that spool."""

from __future__ import annotations

from pathlib import Path

import pytest

from receiver import statuses
from tests.processes import Pipeline, start_pipeline
from tests.support import make_instance, objects_under, pynetdicom_send, wait_for

pytestmark = pytest.mark.e2e


def test_two_receivers_with_node_local_spools_share_one_redis(tmp_path: Path,
                                                              redis_url: str) -> None:
    """Two receiver+worker pairs, each on its own spool, one Redis, the default sweeper
    settings (nothing is re-enqueued for five minutes): every instance is archived within
    seconds, by the worker beside the receiver that took it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sweeper_defaults = {"sweep_interval": 60.0, "sweep_age": 300.0}
    with start_pipeline(tmp_path / "a", redis_url, **sweeper_defaults) as a, \
            start_pipeline(tmp_path / "b", redis_url, **sweeper_defaults) as b:
        assert a.settings.spool_dir != b.settings.spool_dir
        sent: dict[str, set[str]] = {"a": set(), "b": set()}
        for round_ in range(3):
            for name, running in (("a", a), ("b", b)):
                folder = tmp_path / f"sent-{name}-{round_}"
                folder.mkdir()
                files = []
                for n in range(10):
                    sent[name].add(make_instance(folder / f"{n}.dcm", pixel_bytes=4000))
                    files.append(folder / f"{n}.dcm")
                assert pynetdicom_send(running.port, files) == [statuses.SUCCESS] * 10

        def archived(running: Pipeline) -> set[str]:
            return {Path(key).stem for key in objects_under(running.archive)}

        wait_for(lambda: archived(a) == sent["a"] and archived(b) == sent["b"], 30,
                 what="every instance archived beside the receiver that took it")
        for running in (a, b):
            # an entry goes once its row is in the catalog, just after its object is archived
            entries = running.settings.spool_dir / "entries"
            wait_for(lambda e=entries: not list(e.iterdir()), 10, what="an empty spool")
            assert "gone" not in running.log("worker")
