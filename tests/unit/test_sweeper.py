"""The sweeper's rules on a real spool directory (the enqueue side is a list here; the
integration and fault tests drive it against a real Redis)."""

import dataclasses
import os
import time
from pathlib import Path

import pytest

from ingest.spool import Spool, new_receipt_id, receipt_time
from receiver.monitor import COUNT_SHARE, SpoolMonitor, next_wait
from receiver.sweeper import sweep_once
from tests.support import make_instance, spool_entry


def entry(spool: Spool, tmp_path: Path, age: float = 0.0) -> str:
    make_instance(tmp_path / "a.dcm")
    receipt = spool_entry(spool, (tmp_path / "a.dcm").read_bytes())
    then = time.time() - age
    os.utime(spool.dcm_path(receipt.receipt_id), (then, then))
    return str(receipt.receipt_id)


def test_old_entries_are_reenqueued_once_per_age(spool: Spool, tmp_path: Path) -> None:
    old, young = entry(spool, tmp_path, age=100), entry(spool, tmp_path, age=1)
    sent: list[str] = []
    result = sweep_once(spool, sent.append, age=50)
    assert sent == [old] and result.requeued == 1 and result.pending == 1
    assert sweep_once(spool, sent.append, age=50).requeued == 0  # its clock was reset
    assert young in spool.receipt_ids()


def test_backlog_in_the_queue_is_not_copied(spool: Spool, tmp_path: Path) -> None:
    entry(spool, tmp_path, age=100)
    sent: list[str] = []
    assert sweep_once(spool, sent.append, age=50, queue_length=lambda: 7).requeued == 0
    assert sweep_once(spool, sent.append, age=50, queue_length=lambda: 0).requeued == 1
    assert sweep_once(spool, sent.append, age=0, queue_length=lambda: None).requeued == 1


def test_broker_down_stops_the_pass_and_keeps_everything(spool: Spool, tmp_path: Path) -> None:
    entry(spool, tmp_path, age=100)
    entry(spool, tmp_path, age=100)

    def down(receipt_id: str) -> None:
        raise ConnectionError("redis is down")

    result = sweep_once(spool, down, age=50)
    assert result.enqueue_failed and result.requeued == 0
    assert len(spool.receipt_ids()) == 2


def test_leftovers_are_removed_only_when_old(spool: Spool, tmp_path: Path) -> None:
    (spool.tmp / "tmpabc.dcm").write_bytes(b"partial")
    # a receipt file and an attempts file whose entry's .dcm never arrived or is removed
    orphans = [spool.entries / "20260101T000000-0123456789abcdef.json",
               spool.entries / "20260101T000000-0123456789abcdef.attempts"]
    for orphan in orphans:
        orphan.write_bytes(b"{}")
    kept = entry(spool, tmp_path)
    result = sweep_once(spool, lambda rid: None, age=3600)
    assert result.removed_temp == 0 and all(orphan.exists() for orphan in orphans)
    sent: list[str] = []
    result = sweep_once(spool, sent.append, age=3600, now=time.time() + 7200)
    assert result.removed_temp == 1 and result.removed_orphans == 2
    assert not any(orphan.exists() for orphan in orphans) and not list(spool.tmp.iterdir())
    assert sent == [kept] and spool.receipt_ids() == [kept]  # an entry is not a leftover


def test_monitor_refuses_past_depth_and_age(spool: Spool, tmp_path: Path) -> None:
    entry(spool, tmp_path)
    entry(spool, tmp_path)
    monitor = SpoolMonitor(spool, max_depth=3)
    monitor.refresh()
    assert monitor.refusal() is None
    entry(spool, tmp_path)
    monitor.refresh()
    assert "depth 3" in (monitor.refusal() or "")
    counts: list[tuple[int, float]] = []  # what the metrics' gauges are set to
    aged = SpoolMonitor(spool, max_age=60, report=lambda *count: counts.append(count))
    aged.refresh()
    assert aged.refusal() is None
    assert len(counts) == 1 and counts[0][0] == 3 and 0 <= counts[0][1] < 60
    assert aged.oldest_at is not None and 0 <= aged.oldest_age < 60
    aged.oldest_at -= 120  # as if the backlog's oldest entry had waited two minutes
    assert "oldest spool entry" in (aged.refusal() or "")
    floor = SpoolMonitor(spool, min_free_bytes=2**62)
    assert "MB free" in (floor.refusal() or "")


def test_census_counts_complete_entries_and_finds_the_oldest(spool: Spool,
                                                             tmp_path: Path) -> None:
    assert spool.census() == (0, None) and spool.stats() == (0, 0.0)
    newer = entry(spool, tmp_path)
    # an entry received an hour ago, committed the way the receiver commits one
    part10 = spool.dcm_path(newer).read_bytes()
    older = dataclasses.replace(spool.read_receipt(newer),
                                receipt_id=new_receipt_id(time.time() - 3600))
    (spool.tmp / "older.dcm").write_bytes(part10)
    spool.commit(spool.tmp / "older.dcm", older)
    # neither a temp file nor a receipt file is an entry
    (spool.entries / ".x.dcm.tmp").write_bytes(b"")
    (spool.entries / f"{newer}.json").write_bytes(b"{}")
    count, oldest = spool.census()
    assert count == 2 == len(spool.receipt_ids())
    assert spool.receipt_ids()[0] == older.receipt_id
    assert oldest == receipt_time(older.receipt_id)
    assert 3590 < spool.stats()[1] < 3700
    # a stray file that is no entry, sorting first, is not counted
    (spool.entries / "0-not-an-entry.dcm").write_bytes(b"")
    assert spool.census() == (2, receipt_time(older.receipt_id))


def test_monitor_counts_less_often_when_counting_is_slow() -> None:
    assert next_wait(1.0, 0.001) == 1.0  # a small spool: every interval
    assert next_wait(1.0, 0.5) == pytest.approx(0.5 / COUNT_SHARE)  # a backlog of a million
    assert next_wait(30.0, 0.5) == 30.0


def test_a_stray_file_in_entries_is_left_alone_and_the_pass_goes_on(spool: Spool,
                                                                     tmp_path: Path) -> None:
    """A *.dcm that is no spool entry (an operator copied a study into entries/): neither
    enqueued nor deleted, and the rest of the pass (old entries, stale temp files) runs."""
    old = entry(spool, tmp_path, age=100)
    stray = spool.entries / "study.dcm"
    stray.write_bytes(b"not ours")
    stale = spool.tmp / "recv-0123456789abcdef.dcm"
    stale.write_bytes(b"")
    then = time.time() - 100
    for path in (stray, stale):
        os.utime(path, (then, then))
    sent: list[str] = []
    result = sweep_once(spool, sent.append, age=50)
    assert sent == [old] and result.requeued == 1 and result.strays == 1
    assert stray.read_bytes() == b"not ours"
    assert result.removed_temp == 1 and not stale.exists()
    assert spool.receipt_ids() == [old] and spool.census()[0] == 1
