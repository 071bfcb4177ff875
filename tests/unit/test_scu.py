"""ingest.scu.hold_responses: a response the association's own thread picks up while a
send_*() call waits for it goes back to that call (pynetdicom's pause race; see the module)."""

from __future__ import annotations

import logging

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from ingest.scu import hold_responses


def store_response() -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = "1.2.3.4"
    rsp.Status = 0x0000
    return rsp


def test_a_response_taken_while_a_call_waits_goes_back_to_the_call() -> None:
    assoc = hold_responses(Association(AE(), "requestor"))
    assoc._reactor_checkpoint.clear()  # what send_c_store() does before it sends
    assoc._serve_request(store_response(), 1)
    context_id, msg = assoc.dimse.msg_queue.get_nowait()
    assert context_id == 1 and msg is not None and msg.MessageIDBeingRespondedTo == 7


def test_without_it_pynetdicom_drops_that_response(caplog: pytest.LogCaptureFixture) -> None:
    assoc = Association(AE(), "requestor")
    assoc._reactor_checkpoint.clear()
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        assoc._serve_request(store_response(), 1)
    assert assoc.dimse.msg_queue.empty()
    assert "Received unexpected C-STORE service message" in caplog.text


def test_with_no_call_waiting_it_is_left_to_pynetdicom(caplog: pytest.LogCaptureFixture) -> None:
    assoc = hold_responses(Association(AE(), "requestor"))  # checkpoint set: no call waits
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        assoc._serve_request(store_response(), 1)
    assert assoc.dimse.msg_queue.empty()
    assert "Received unexpected C-STORE service message" in caplog.text
