"""The bench's spool backlog: real entries, as the receiver and the sweeper see them."""

from __future__ import annotations

from pathlib import Path

import pydicom

from bench.backlog import link_backlog, make_backlog
from ingest.spool import Spool


def test_the_backlog_is_entries_of_their_own(tmp_path: Path) -> None:
    spool = make_backlog(tmp_path / "backlog", 5)
    ids = spool.receipt_ids()
    assert spool.depth() == 5
    uids = set()
    for receipt_id in ids:
        receipt = spool.read_receipt(receipt_id)
        assert receipt is not None
        rebuilt = spool.rebuild_receipt(receipt_id)  # what the file itself says
        assert (receipt.size, receipt.crc32, receipt.dataset_offset) == (
            rebuilt.size, rebuilt.crc32, rebuilt.dataset_offset)
        assert receipt.sop_instance_uid == rebuilt.sop_instance_uid
        dataset = pydicom.dcmread(spool.dcm_path(receipt_id))
        assert dataset.SOPInstanceUID == receipt.sop_instance_uid
        uids.add(receipt.sop_instance_uid)
    assert len(uids) == 5
    assert not list(spool.tmp.iterdir())


def test_a_run_gets_the_backlog_in_a_spool_of_its_own(tmp_path: Path) -> None:
    backlog = make_backlog(tmp_path / "backlog", 3)
    link_backlog(backlog, tmp_path / "run" / "spool")
    run = Spool(tmp_path / "run" / "spool")
    assert run.receipt_ids() == backlog.receipt_ids()
    run.remove(run.receipt_ids()[0])  # what the receiver adds or removes stays its own
    assert backlog.depth() == 3
