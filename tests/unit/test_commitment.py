"""Storage commitment's decisions, without a network: what a request must hold, and how each
referenced instance is decided from the catalog's rows."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from ingest.catalog import ARCHIVED, QUARANTINED, Catalog, Row
from receiver import commitment
from receiver.commitment import Request, RequestError, decide, parse, report
from tests.support import commitment_request

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


def information(txn: str = "1.2.3.4", refs: Iterable[tuple[str, str]] = ((CT, "1.2.3.5"),)
                ) -> Dataset:
    return commitment_request(txn, refs)


def test_a_well_formed_request_is_parsed() -> None:
    txn, refs = parse(1, commitment.WELL_KNOWN_INSTANCE,
                      information(refs=[(CT, "1.2.3.5"), (MR, "1.2.3.6")]))
    assert txn == "1.2.3.4" and refs == ((CT, "1.2.3.5"), (MR, "1.2.3.6"))


@pytest.mark.parametrize(("args", "status"), [
    ((2, commitment.WELL_KNOWN_INSTANCE, information()), 0x0123),
    ((1, "1.2.3.99", information()), 0x0117),
    ((1, commitment.WELL_KNOWN_INSTANCE, None), 0x0212),
    ((1, commitment.WELL_KNOWN_INSTANCE, information(txn="")), 0x0115),
    ((1, commitment.WELL_KNOWN_INSTANCE, information(txn="../../etc")), 0x0115),
    ((1, commitment.WELL_KNOWN_INSTANCE, information(refs=[])), 0x0115),
    ((1, commitment.WELL_KNOWN_INSTANCE, information(refs=[(CT, "1.2.x")])), 0x0115),
])
def test_a_malformed_request_has_its_status(args: tuple[object, object, object],
                                            status: int) -> None:
    with pytest.raises(RequestError) as raised:
        parse(*args)
    assert raised.value.status == status


def row(sop: str, sop_class: str, state: str, key: str) -> Row:
    return Row(sop_instance_uid=sop, sop_class_uid=sop_class, study_uid="1.2", series_uid="1.3",
               key=key, size=1, sha256="0" * 64, transfer_syntax="1.2.840.10008.1.2.1",
               calling_aet="CT1", receipt_id="20261204T000000-0000000000000000",
               received_at=0.0, archived_at=1.0 if state == ARCHIVED else None, state=state,
               reason=None if state == ARCHIVED else "invalid-uid")


def test_each_instance_is_decided_from_the_catalog(tmp_path: Path) -> None:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    catalog.record(row("1.1", CT, ARCHIVED, "a/b/1.1.dcm"))
    catalog.record(row("1.2", CT, QUARANTINED, "quarantine/x.dcm"))
    catalog.record(row("1.3", MR, ARCHIVED, "a/b/1.3.dcm"))
    request = Request("9.9", "CT1", "DICOM-INGEST", "127.0.0.1:1", received_at=100.0,
                      references=((CT, "1.1"), (CT, "1.2"), (CT, "1.3"), (CT, "1.4")))
    waiting = decide(request, catalog, now=101.0, timeout=600)
    assert waiting.committed == [(CT, "1.1")]
    assert waiting.failed == [(CT, "1.2", 0x0110), (CT, "1.3", 0x0119)]
    assert waiting.pending == [(CT, "1.4")]
    late = decide(request, catalog, now=700.0, timeout=600)
    assert late.pending == [] and (CT, "1.4", 0x0112) in late.failed
    event_type, ds = report(request, late)
    assert event_type == 2 and ds.TransactionUID == "9.9"
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence] == ["1.1"]
    assert {(i.ReferencedSOPInstanceUID, i.FailureReason) for i in ds.FailedSOPSequence} == {
        ("1.2", 0x0110), ("1.3", 0x0119), ("1.4", 0x0112)}
    catalog.close()


def test_requests_survive_in_the_spool_and_only_one_process_owns_one(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    requests = commitment.Requests(tmp_path)
    requests.ensure()
    request = Request("9.9", "CT1", "DICOM-INGEST", "127.0.0.1:1", 1.0, ((CT, "1.1"),))
    requests.save(request)
    assert requests.pending() == ["9.9"] and requests.load("9.9") == request
    owner = requests.own("9.9")
    assert owner >= 0
    with requests.claim("9.9") as claimed:  # another open file: as another process would
        assert not claimed
    os.close(owner)
    with requests.claim("9.9") as claimed:
        assert claimed
    requests.expire("9.9")
    assert requests.pending() == [] and requests.expired_ids() == ["9.9"]
