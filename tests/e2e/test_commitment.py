"""Storage Commitment end to end: a modality-like pynetdicom SCU stores a study, asks for
commitment, and gets its N-EVENT-REPORT on the same association or, once it has released
it, on a new association to its own SCP; with the failure cases a modality meets."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ingest.scu import associate
from receiver import statuses
from tests.processes import start_pipeline
from tests.support import (
    commitment_request,
    free_port,
    hostile_dataset,
    make_instance,
    raw_part10,
    wait_for,
)
from tests.support.dicom import encode_dataset

pytestmark = pytest.mark.e2e
COMMITMENT = "1.2.840.10008.1.20.1"
WELL_KNOWN = "1.2.840.10008.1.20.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


@dataclass
class Report:
    event_type: int
    transaction_uid: str
    committed: set[str]
    failed: dict[str, int]
    archived_then: set[str]  # SOP Instance UIDs in the archive when the report arrived
    on_requesting_association: bool


@dataclass
class Modality:
    """A modality: stores instances, asks for commitment, records the reports it gets on
    its own association and on its SCP (for the INGEST_COMMITMENT_PEERS case)."""

    archive: Path
    port: int = field(default_factory=free_port)
    reports: list[Report] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_report(self, event: Any, on_requesting: bool) -> tuple[int, None]:
        info = event.event_information
        archived = {p.stem for p in self.archive.rglob("*.dcm") if "quarantine" not in p.parts}
        report = Report(
            event_type=int(event.event_type),
            transaction_uid=str(info.TransactionUID),
            committed={str(i.ReferencedSOPInstanceUID)
                       for i in info.get("ReferencedSOPSequence", [])},
            failed={str(i.ReferencedSOPInstanceUID): int(i.FailureReason)
                    for i in info.get("FailedSOPSequence", [])},
            archived_then=archived, on_requesting_association=on_requesting)
        with self.lock:
            self.reports.append(report)
        return 0x0000, None

    def ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CT, ExplicitVRLittleEndian)
        ae.add_requested_context(MR, ExplicitVRLittleEndian)
        ae.add_requested_context(COMMITMENT, ExplicitVRLittleEndian)
        return ae

    def associate(self, receiver_port: int) -> Any:
        from pynetdicom import evt

        handlers = [(evt.EVT_N_EVENT_REPORT, lambda e: self.on_report(e, True))]
        assoc = associate(self.ae(), "127.0.0.1", receiver_port, ae_title="DICOM-INGEST",
                          evt_handlers=handlers)
        assert assoc.is_established
        return assoc

    @staticmethod
    def store(assoc: Any, files: list[Path]) -> None:
        from pynetdicom import _config

        _config.STORE_SEND_CHUNKED_DATASET = True
        for path in files:
            assert int(assoc.send_c_store(path).Status) == statuses.SUCCESS

    @staticmethod
    def request(assoc: Any, references: list[tuple[str, str]],
                transaction_uid: str | None = None, action_type: int = 1) -> tuple[str, int]:
        txn = generate_uid() if transaction_uid is None else transaction_uid
        info = commitment_request(txn, references)
        status, _ = assoc.send_n_action(info, action_type, COMMITMENT, WELL_KNOWN)
        return txn, int(status.Status)

    def report(self, txn: str, timeout: float = 60) -> Report:
        def found() -> Report | None:
            with self.lock:
                return next((r for r in self.reports if r.transaction_uid == txn), None)

        return wait_for(found, timeout, 0.05, f"the report of {txn}")

    @contextlib.contextmanager
    def scp(self) -> Iterator[None]:
        """The modality's own SCP, where reports come on a new association."""
        from pynetdicom import AE, evt

        ae = AE(ae_title="MODALITY")
        ae.add_supported_context(COMMITMENT, ExplicitVRLittleEndian, scu_role=True,
                                 scp_role=True)
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_N_EVENT_REPORT, lambda e: self.on_report(e, False))])
        try:
            yield
        finally:
            server.shutdown()


def study(folder: Path, count: int) -> tuple[list[Path], list[tuple[str, str]]]:
    folder.mkdir(parents=True)
    study_uid, series = generate_uid(), generate_uid()
    files, refs = [], []
    for n in range(count):
        path = folder / f"{n}.dcm"
        uid = make_instance(path, pixel_bytes=4000, study=study_uid, series=series)
        files.append(path)
        refs.append((CT, uid))
    return files, refs


@pytest.fixture
def modality(tmp_path: Path) -> Modality:
    return Modality(tmp_path / "archive")


def pipeline_for(tmp_path: Path, redis_url: str, modality: Modality, **overrides: Any) -> Any:
    return start_pipeline(tmp_path, redis_url,
                          commitment_peers=(("MODALITY", "127.0.0.1", modality.port),),
                          **overrides)


def no_report_for(modality: Modality, seconds: float) -> None:
    """Nothing reported for ``seconds`` (the committer looks every half second)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert modality.reports == [], "a report came before its instances were archived"
        time.sleep(0.1)


def test_a_study_is_committed_on_the_requesting_association(
        tmp_path: Path, redis_url: str, modality: Modality) -> None:
    """Store five instances while the workers are down and ask for commitment: nothing is
    reported while they wait in the spool; once a worker archives them the report comes on
    the requesting association, commits all five, and every one was archived before it."""
    files, refs = study(tmp_path / "study", 5)
    with pipeline_for(tmp_path, redis_url, modality) as running:
        running.stop("worker")
        assoc = modality.associate(running.port)
        try:
            modality.store(assoc, files)
            txn, status = modality.request(assoc, refs)
            assert status == 0x0000
            no_report_for(modality, 3)
            running.start("worker")
            report = modality.report(txn)
        finally:
            assoc.release()
        log = running.log("receiver")
    assert report.on_requesting_association
    assert report.event_type == 1 and not report.failed
    assert report.committed == {uid for _, uid in refs}
    assert report.committed <= report.archived_then
    assert f"storage commitment txn={txn} reported on the requesting association" in log


def test_the_report_goes_to_the_modality_s_scp_once_it_released(
        tmp_path: Path, redis_url: str, modality: Modality) -> None:
    """The modality releases right after the N-ACTION: the report comes on a new
    association to the address INGEST_COMMITMENT_PEERS gives for its AE title, with
    SCP/SCU role selection, and the failures carry their reasons: a quarantined instance
    0x0110, one never sent 0x0112, one referenced under another SOP class 0x0119."""
    files, refs = study(tmp_path / "study", 3)
    bad = hostile_dataset(StudyInstanceUID="1.2.3..4")  # quarantined: invalid-uid
    bad_path = tmp_path / "bad.dcm"
    bad_path.write_bytes(raw_part10(CT, str(bad.SOPInstanceUID), encode_dataset(bad)))
    never_sent = (CT, generate_uid())
    wrong_class = (MR, refs[0][1])
    with modality.scp(), pipeline_for(tmp_path, redis_url, modality,
                                      commitment_timeout=4.0) as running:
        assoc = modality.associate(running.port)
        try:
            modality.store(assoc, [*files, bad_path])
            txn, status = modality.request(
                assoc, [*refs, (CT, str(bad.SOPInstanceUID)), never_sent, wrong_class])
            assert status == 0x0000
        finally:
            assoc.release()
        report = modality.report(txn, 90)
    assert not report.on_requesting_association
    assert report.event_type == 2
    assert report.committed == {uid for _, uid in refs}
    assert report.failed == {str(bad.SOPInstanceUID): 0x0110, never_sent[1]: 0x0112,
                             wrong_class[1]: 0x0119}
    assert report.committed <= report.archived_then


@pytest.mark.parametrize(("change", "status"), [
    ("action type 2", 0x0123), ("no transaction UID", 0x0115),
    ("a reference that is not a UID", 0x0115),
])
def test_a_malformed_request_gets_a_failure_status(
        tmp_path: Path, redis_url: str, modality: Modality, change: str, status: int) -> None:
    with pipeline_for(tmp_path, redis_url, modality) as running:
        assoc = modality.associate(running.port)
        try:
            if change == "action type 2":
                _, got = modality.request(assoc, [(CT, generate_uid())], action_type=2)
            elif change == "no transaction UID":
                _, got = modality.request(assoc, [(CT, generate_uid())], transaction_uid="")
            else:
                _, got = modality.request(assoc, [(CT, "1.2.x")])
            assert got == status
            # the association is still there for the next request
            _, ok = modality.request(assoc, [(CT, generate_uid())])
            assert ok == 0x0000
        finally:
            assoc.release()
        assert "Traceback" not in running.log("receiver")


def test_a_receiver_killed_between_the_request_and_the_report(
        tmp_path: Path, redis_url: str, modality: Modality) -> None:
    """The workers are down, so the instances wait in the spool; the receiver is killed
    after it answered the N-ACTION. Restarted with the workers, it picks the transaction up
    again and reports on a new association: all committed."""
    files, refs = study(tmp_path / "study", 4)
    with modality.scp(), pipeline_for(tmp_path, redis_url, modality) as running:
        running.stop("worker")
        assoc = modality.associate(running.port)
        modality.store(assoc, files)
        txn, status = modality.request(assoc, refs)
        assert status == 0x0000
        assert (running.settings.spool_dir / "commitments" / f"{txn}.json").exists()
        running.stop("receiver", signal.SIGKILL)
        wait_for(lambda: not assoc.is_established, 30, what="the association gone")
        running.start("receiver")
        no_report_for(modality, 3)
        running.start("worker")
        report = modality.report(txn, 90)
    assert not report.on_requesting_association
    assert report.event_type == 1 and report.committed == {uid for _, uid in refs}
    assert report.committed <= report.archived_then
