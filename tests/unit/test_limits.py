"""The bounds on the PDUs a peer may make the receiver read, state by state."""

from __future__ import annotations

import pytest

from receiver.limits import PRE_ASSOCIATION_LIMIT, refusal

A_ASSOCIATE_RQ, P_DATA_TF, A_RELEASE_RQ, A_ABORT = 0x01, 0x04, 0x05, 0x07


@pytest.mark.parametrize(("state", "pdu_type", "length", "max_length", "expected"), [
    # awaiting the A-ASSOCIATE-RQ (Sta1: its connection event not taken off the queue yet)
    ("Sta2", A_ASSOCIATE_RQ, 4000, 0, None),
    ("Sta1", A_ASSOCIATE_RQ, PRE_ASSOCIATION_LIMIT, 0, None),
    ("Sta2", A_ASSOCIATE_RQ, PRE_ASSOCIATION_LIMIT + 1, 0, "pdu-too-large"),
    ("Sta2", A_ABORT, 4, 0, None),
    ("Sta2", P_DATA_TF, 100, 0, "unexpected-pdu"),
    ("Sta1", A_RELEASE_RQ, 4, 0, "unexpected-pdu"),
    ("Sta2", 0x00, 0, 0, "unknown-pdu-type"),
    # negotiating, or after an abort: anything small is pynetdicom's to answer
    ("Sta3", P_DATA_TF, 100, 0, None),
    ("Sta13", P_DATA_TF, 2**31, 0, "pdu-too-large"),
    # established: P-DATA-TF up to what we announced (0: no maximum), the rest small
    ("Sta6", P_DATA_TF, 2**31, 0, None),
    ("Sta6", P_DATA_TF, 16384, 16384, None),
    ("Sta6", P_DATA_TF, 16385, 16384, "pdu-too-large"),
    ("Sta6", A_RELEASE_RQ, 2**31, 0, "pdu-too-large"),
    ("Sta6", 0x09, 4, 0, "unknown-pdu-type"),
    ("Sta8", P_DATA_TF, 2**20, 0, None),
])
def test_refusal(state: str, pdu_type: int, length: int, max_length: int,
                 expected: str | None) -> None:
    assert refusal(state, pdu_type, length, max_length) == expected
