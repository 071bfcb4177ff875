"""Storage Commitment (Push Model) SCP: the modality asks, the catalog answers.

A request (N-ACTION, action type 1) is written to the spool's ``commitments/`` and fsynced
before the N-ACTION-RSP says Success, so it survives a restart of the receiver. A thread of
each receiver process (:class:`Committer`) then looks up each referenced SOP Instance in the
catalog: archived and verified under the same SOP Class is committed; quarantined fails with
``0x0110``; archived under another SOP Class fails with ``0x0119``; not there within
``INGEST_COMMITMENT_TIMEOUT`` fails with ``0x0112``; anything else is waited for. Once every
instance is decided the result goes out as N-EVENT-REPORT: on the requesting association
while it is open (only the process that holds it may send there), else on a new association
to the requester's address in ``INGEST_COMMITMENT_PEERS``. A report that cannot be delivered
is retried with backoff until ``INGEST_COMMITMENT_EXPIRY``, then logged, counted and set
aside in ``commitments/expired/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset

from ingest.catalog import ARCHIVED, QUARANTINED
from ingest.keys import is_safe_uid
from ingest.spool import fsync_dir, write_durable

log = logging.getLogger("dicom_ingest.receiver")

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
#: the well-known SOP Instance of the Storage Commitment Push Model
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
ALL_COMMITTED, SOME_FAILED = 1, 2  # N-EVENT-REPORT event types

# N-ACTION statuses (PS3.4 J.3.2.1.1.2, PS3.7 C)
SUCCESS = 0x0000
INVALID_ARGUMENT_VALUE = 0x0115
INVALID_OBJECT_INSTANCE = 0x0117
NO_SUCH_ACTION = 0x0123
PROCESSING_FAILURE_ACTION = 0x0110
RESOURCE_LIMITATION = 0x0213
MISTYPED_ARGUMENT = 0x0212
# Failure Reasons of the Failed SOP Sequence (PS3.4 J.3.2.1.1.2)
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119

MAX_REFERENCES = 100_000  # more in one request is not a modality's
POLL = 0.5  # seconds between the committer's looks at the catalog
_BACKOFF_MOST = 300.0


class Lookup(Protocol):
    """What the committer needs of the catalog (:class:`ingest.catalog.Catalog`)."""

    def by_sop(self, sop_instance_uids: Iterable[str]) -> dict[str, list[Any]]: ...


@dataclass(frozen=True)
class Request:
    """One storage commitment request, as it is kept in the spool."""

    transaction_uid: str
    calling_aet: str
    called_aet: str
    peer: str  # host:port the request came from (the report may not go there: peers do)
    received_at: float
    references: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID)
    attempts: int = 0  # report deliveries that failed
    next_attempt_at: float = 0.0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Request:
        raw = json.loads(data)
        raw["references"] = tuple(tuple(ref) for ref in raw["references"])
        return cls(**raw)


@dataclass
class Outcome:
    """What the catalog says of a request's instances; ``pending`` ones are waited for."""

    committed: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # class, instance, reason
    pending: list[tuple[str, str]] = field(default_factory=list)


def decide(request: Request, lookup: Lookup, now: float, timeout: float) -> Outcome:
    """Each referenced instance committed, failed (with its reason) or still pending."""
    rows = lookup.by_sop({instance for _, instance in request.references})
    outcome = Outcome()
    for sop_class, instance in request.references:
        found = rows.get(instance, [])
        archived = [row for row in found if row.state == ARCHIVED]
        if any(row.sop_class_uid == sop_class for row in archived):
            outcome.committed.append((sop_class, instance))
        elif archived:
            outcome.failed.append((sop_class, instance, CLASS_INSTANCE_CONFLICT))
        elif any(row.state == QUARANTINED for row in found):
            outcome.failed.append((sop_class, instance, PROCESSING_FAILURE))
        elif now - request.received_at >= timeout:
            outcome.failed.append((sop_class, instance, NO_SUCH_OBJECT_INSTANCE))
        else:
            outcome.pending.append((sop_class, instance))
    return outcome


def report(request: Request, outcome: Outcome) -> tuple[int, Dataset]:
    """The N-EVENT-REPORT's event type and Event Information."""
    ds = Dataset()
    ds.TransactionUID = request.transaction_uid
    if outcome.committed:
        ds.ReferencedSOPSequence = [_item(c, i) for c, i in outcome.committed]
    if outcome.failed:
        items = []
        for sop_class, instance, reason in outcome.failed:
            item = _item(sop_class, instance)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    return (SOME_FAILED if outcome.failed else ALL_COMMITTED), ds


def _item(sop_class: str, instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = instance
    return item


class RequestError(ValueError):
    """An N-ACTION that is not a storage commitment request we can take: its status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse(action_type: object, instance_uid: object, information: Any) -> tuple[
        str, tuple[tuple[str, str], ...]]:
    """The transaction UID and references of a request; RequestError otherwise."""
    if action_type != 1:
        raise RequestError(NO_SUCH_ACTION, f"action type {action_type!r}, not 1")
    if instance_uid is not None and str(instance_uid) != WELL_KNOWN_INSTANCE:
        raise RequestError(INVALID_OBJECT_INSTANCE,
                           f"requested SOP Instance {str(instance_uid)!r:.80}")
    if not isinstance(information, Dataset):
        raise RequestError(MISTYPED_ARGUMENT, "no Action Information dataset")
    txn = str(information.get("TransactionUID", "")).strip("\0 ")
    if not is_safe_uid(txn):
        raise RequestError(INVALID_ARGUMENT_VALUE, f"Transaction UID {txn!r:.80}")
    sequence = information.get("ReferencedSOPSequence")
    if not sequence or len(sequence) > MAX_REFERENCES:
        raise RequestError(INVALID_ARGUMENT_VALUE, "no Referenced SOP Sequence, or too long")
    references = []
    for item in sequence:
        sop_class = str(item.get("ReferencedSOPClassUID", "")).strip("\0 ")
        instance = str(item.get("ReferencedSOPInstanceUID", "")).strip("\0 ")
        if not is_safe_uid(sop_class) or not is_safe_uid(instance):
            raise RequestError(INVALID_ARGUMENT_VALUE,
                               f"a reference to {sop_class!r:.70} / {instance!r:.70}")
        references.append((sop_class, instance))
    return txn, tuple(references)


class Requests:
    """The pending requests under ``{spool}/commitments/``: one JSON file per transaction,
    written durably. A process that holds a requesting association open holds an ``flock``
    on ``{txn}.owner`` meanwhile: only it reports on that association, and the others leave
    the transaction alone until it is released."""

    def __init__(self, spool_root: Path) -> None:
        self.dir = spool_root / "commitments"
        self.tmp = spool_root / "tmp"
        self.expired = self.dir / "expired"

    def ensure(self) -> None:
        self.expired.mkdir(parents=True, exist_ok=True)

    def path(self, txn: str) -> Path:
        if not is_safe_uid(txn):
            raise ValueError(f"not a UID: {txn!r:.80}")
        return self.dir / f"{txn}.json"

    def save(self, request: Request) -> None:
        write_durable(self.path(request.transaction_uid), request.encode(), self.tmp)
        fsync_dir(self.dir)

    def load(self, txn: str) -> Request | None:
        try:
            return Request.decode(self.path(txn).read_bytes())
        except FileNotFoundError:
            return None

    def pending(self) -> list[str]:
        return sorted(name[: -len(".json")] for name in os.listdir(self.dir)
                      if name.endswith(".json") and is_safe_uid(name[: -len(".json")]))

    def expired_ids(self) -> list[str]:
        return sorted(name[: -len(".json")] for name in os.listdir(self.expired)
                      if name.endswith(".json"))

    def remove(self, txn: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(txn).unlink()
        fsync_dir(self.dir)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / f"{txn}.owner").unlink()

    def expire(self, txn: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path(txn), self.expired / f"{txn}.json")
        fsync_dir(self.dir)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / f"{txn}.owner").unlink()

    def own(self, txn: str) -> int:
        """Take ``{txn}.owner`` (an open file descriptor whose lock says: this process holds
        the requesting association); -1 when another process has it."""
        fd = os.open(self.dir / f"{txn}.owner", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return -1
        return fd

    @contextlib.contextmanager
    def claim(self, txn: str) -> Iterator[bool]:
        """Yield True while this process may handle ``txn``: no process holds its requesting
        association open, and no other committer handles it right now."""
        owner = self.own(txn)
        try:
            yield owner >= 0
        finally:
            if owner >= 0:
                os.close(owner)


class CommitmentMetrics(Protocol):
    def requested(self) -> None: ...

    def decided(self, result: str, count: int) -> None: ...

    def delivery_failed(self) -> None: ...

    def expired(self) -> None: ...


@dataclass
class CommitmentContext:
    """The N-ACTION handler's and the committer's dependencies."""

    requests: Requests
    metrics: CommitmentMetrics
    #: requesting associations this process holds open, by transaction UID, with the fd of
    #: their owner lock
    open: dict[str, tuple[Any, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def handle_action(event: Any, ctx: CommitmentContext) -> tuple[int, Dataset | None]:
    """EVT_N_ACTION: a storage commitment request, made durable before Success is answered.
    No exception leaves this function."""
    try:
        request = event.request
        assoc = event.assoc
        try:
            information = event.action_information
        except Exception:  # untrusted bytes that do not decode
            information = None
        txn, references = parse(getattr(request, "ActionTypeID", None),
                                getattr(request, "RequestedSOPInstanceUID", None), information)
        calling = str(assoc.requestor.ae_title).strip()
        commitment = Request(
            transaction_uid=txn, calling_aet=calling,
            called_aet=str(assoc.acceptor.ae_title).strip(),
            peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
            received_at=time.time(), references=references)
        owner = ctx.requests.own(txn)
        try:
            ctx.requests.save(commitment)
        except BaseException:  # not saved: nobody may hold its lock (the sender retries it)
            if owner >= 0:
                os.close(owner)
            raise
        if owner >= 0:
            with ctx.lock:
                ctx.open[txn] = (assoc, owner)
        ctx.metrics.requested()
        log.info("storage commitment requested txn=%s calling=%s instances=%d", txn, calling,
                 len(references))
        return SUCCESS, None
    except RequestError as exc:
        log.warning("storage commitment refused status=0x%04X: %s", exc.status, exc)
        return exc.status, None
    except OSError as exc:
        log.error("storage commitment status=0x0213: the request cannot be made durable: %s",
                  exc)
        return RESOURCE_LIMITATION, None
    except Exception:
        log.exception("storage commitment status=0x0110: unexpected error")
        return PROCESSING_FAILURE_ACTION, None


def on_ended(event: Any, ctx: CommitmentContext) -> None:
    """EVT_RELEASED, EVT_ABORTED, EVT_CONN_CLOSE: this association's pending transactions
    are now anyone's, to report on a new association. No exception leaves it."""
    try:
        with ctx.lock:
            gone = [txn for txn, (assoc, _) in ctx.open.items() if assoc is event.assoc]
        for txn in gone:
            release(ctx, txn)
    except Exception:
        log.exception("storage commitment: releasing an ended association failed")


def release(ctx: CommitmentContext, txn: str) -> None:
    """This process no longer holds ``txn``'s requesting association."""
    with ctx.lock:
        held = ctx.open.pop(txn, None)
    if held is not None:
        with contextlib.suppress(OSError):
            os.close(held[1])


Deliver = Callable[[Request, int, Dataset], bool]


class Committer:
    """Decides pending requests from the catalog and sends their reports; one thread per
    receiver process."""

    def __init__(self, ctx: CommitmentContext, lookup: Callable[[], Lookup], ae_title: str,
                 peers: tuple[tuple[str, str, int], ...], timeout: float, expiry: float,
                 send_new: Callable[[str, str, int, str, int, Dataset], bool]) -> None:
        self.ctx = ctx
        self._lookup = lookup
        self.ae_title = ae_title
        self.peers = {ae: (host, port) for ae, host, port in peers}
        self.timeout, self.expiry = timeout, expiry
        self._send_new = send_new
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commitment", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            try:
                self.once()
            except Exception:  # the catalog is down, say: the requests wait in the spool
                log.exception("storage commitment: a pass failed; the requests wait")

    def once(self, now: float | None = None) -> None:
        """One pass over the pending requests."""
        requests = self.ctx.requests
        for txn in requests.pending():
            request = requests.load(txn)
            if request is None:
                continue
            at = time.time() if now is None else now
            with self.ctx.lock:
                mine = self.ctx.open.get(txn)
            if mine is not None and not mine[0].is_established:
                release(self.ctx, txn)  # ended: the report goes out on a new association
                mine = None
            if mine is None and request.next_attempt_at > at:
                continue
            if mine is not None:
                outcome = decide(request, self._lookup(), at, self.timeout)
                if not outcome.pending:
                    self._report_on(request, outcome, mine[0])
                continue
            # claimed first: the catalog is asked only by the process that may report
            with requests.claim(txn) as claimed:
                if claimed:
                    outcome = decide(request, self._lookup(), at, self.timeout)
                    if not outcome.pending:
                        self._report_new(request, outcome, at)

    def _report_on(self, request: Request, outcome: Outcome, assoc: Any) -> None:
        """On the requesting association, which this process holds."""
        event_type, ds = report(request, outcome)
        try:
            status, _ = assoc.send_n_event_report(ds, event_type, STORAGE_COMMITMENT,
                                                  WELL_KNOWN_INSTANCE)
            code = int(status.Status) if "Status" in status else None
        except Exception:
            log.exception("storage commitment txn=%s: the report on the requesting "
                          "association failed", request.transaction_uid)
            code = None
        if code != SUCCESS:  # it goes out on a new association once this one is over
            self.ctx.metrics.delivery_failed()
            log.warning("storage commitment txn=%s: the requester answered the report on its "
                        "association with %r", request.transaction_uid, code)
            return
        release(self.ctx, request.transaction_uid)
        self._done(request, outcome, "the requesting association")

    def _report_new(self, request: Request, outcome: Outcome, now: float) -> None:
        """On a new association to the requester's address in INGEST_COMMITMENT_PEERS."""
        event_type, ds = report(request, outcome)
        peer = self.peers.get(request.calling_aet)
        delivered = False
        if peer is None:
            log.warning("storage commitment txn=%s: %s is not in INGEST_COMMITMENT_PEERS; "
                        "the report waits", request.transaction_uid, request.calling_aet)
        else:
            try:
                delivered = self._send_new(request.calling_aet, peer[0], peer[1],
                                           self.ae_title, event_type, ds)
            except Exception:
                log.exception("storage commitment txn=%s: sending the report failed",
                              request.transaction_uid)
        if delivered:
            self._done(request, outcome, f"a new association to {peer[0]}:{peer[1]}"
                       if peer else "?")
            return
        self.ctx.metrics.delivery_failed()
        if now - request.received_at >= self.expiry:
            log.error("storage commitment txn=%s for %s: report undeliverable for %.0f s; "
                      "given up (kept in commitments/expired/)", request.transaction_uid,
                      request.calling_aet, now - request.received_at)
            self.ctx.metrics.expired()
            self.ctx.requests.expire(request.transaction_uid)
            return
        attempts = request.attempts + 1
        delay = min(_BACKOFF_MOST, 2.0 ** attempts)
        self.ctx.requests.save(replace(request, attempts=attempts, next_attempt_at=now + delay))

    def _done(self, request: Request, outcome: Outcome, where: str) -> None:
        self.ctx.requests.remove(request.transaction_uid)
        self.ctx.metrics.decided("committed", len(outcome.committed))
        for reason in {r for _, _, r in outcome.failed}:
            self.ctx.metrics.decided(f"0x{reason:04X}",
                                     sum(r == reason for _, _, r in outcome.failed))
        log.info("storage commitment txn=%s reported on %s: %d committed, %d failed",
                 request.transaction_uid, where, len(outcome.committed), len(outcome.failed))


def send_on_new_association(calling: str, host: str, port: int, ae_title: str,
                            event_type: int, ds: Dataset) -> bool:
    """Open an association to the requester (we propose Storage Commitment with the SCP
    role, SCP/SCU role selection) and send the report; True when it answered Success."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, build_role

    from ingest.scu import associate

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian,
                                                  ImplicitVRLittleEndian])
    role = build_role(STORAGE_COMMITMENT, scp_role=True)
    assoc = associate(ae, host, port, ae_title=calling, ext_neg=[role])
    if not assoc.is_established:
        return False
    try:
        status, _ = assoc.send_n_event_report(ds, event_type, STORAGE_COMMITMENT,
                                              WELL_KNOWN_INSTANCE)
    finally:
        assoc.release()
    return "Status" in status and int(status.Status) == SUCCESS
