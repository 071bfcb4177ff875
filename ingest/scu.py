"""pynetdicom as a sender (``dicom-ingest echo``, the bench, the tests), with one repair.

pynetdicom's association thread polls for incoming DIMSE requests whenever the application is
not inside a ``send_*()`` call. Such a call pauses that thread first: it clears a checkpoint
and waits until the thread says it is paused. The thread says so just before it waits on the
checkpoint, so it can have passed the checkpoint already when the call sees it "paused". The
call then sends its request; if the answer comes back before the thread polls (a fast SCP, a
loaded machine), the thread takes the answer, logs "Received unexpected C-STORE service
message" and drops it. The call waits out its DIMSE timeout and reports no status, although
the peer stored the instance and answered Success.

That happened against DCMTK's storescp as well as against our receiver (one C-STORE in 1000,
then one in 2000, with two busy threads in the sending process), so it is the sender's, not the
receiver's. :func:`hold_responses` puts such an answer back on the queue the call reads, as
long as a call is waiting for one; :func:`associate` opens an association with it in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association


def associate(ae: AE, *args: Any, **kwargs: Any) -> Association:
    """``ae.associate(*args, **kwargs)``, its responses held (:func:`hold_responses`): how
    every sender of this project opens an association."""
    return hold_responses(ae.associate(*args, **kwargs))


def hold_responses(assoc: Association) -> Association:
    """Make ``assoc``'s own thread give back the responses its ``send_*()`` calls wait for;
    returns ``assoc``."""
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        # a send_*() call clears the checkpoint for as long as it waits for its response
        if not msg.is_valid_request and not assoc._reactor_checkpoint.is_set():
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_request  # type: ignore[method-assign]
    return assoc
