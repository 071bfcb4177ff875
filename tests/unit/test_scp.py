import copy
import logging
import os
import subprocess
import sys

import pytest

from ingest.settings import Settings
from receiver.scp import SharedContexts, StabiliserProcess, build_ae


def test_a_deep_copy_of_the_supported_contexts_shares_them() -> None:
    """pynetdicom deep-copies the server's contexts for every association; ours hands out a
    new list of the same context objects (negotiation only reads them)."""
    contexts = SharedContexts(build_ae(Settings()).supported_contexts)
    copied = copy.deepcopy(contexts)
    assert type(copied) is list and copied == list(contexts)
    assert all(a is b for a, b in zip(copied, contexts, strict=True))
    # every storage SOP class pynetdicom knows, Verification and Storage Commitment
    assert len(copied) == 172


def test_a_shared_socket_server_counts_the_connections_it_holds_open() -> None:
    """What a receiver process weighs before it accepts (the idler process should take a new
    association): the connections it accepted that are still open, from the accept on."""
    import socket

    import pytest

    from receiver.scp import listening_socket, shared_server_class

    listener = listening_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    ae = build_ae(Settings())
    server = ae.make_server(("127.0.0.1", port), evt_handlers=[],
                            server_class=shared_server_class(listener.fileno()))
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        assert server._serving() == 0
        first, _ = server.get_request()
        assert server._serving() == 1  # before any association thread could exist
        second, _ = server.get_request()
        assert server._serving() == 2
        with pytest.raises(BlockingIOError):  # nothing waiting (another process took it)
            server.get_request()
        assert server._serving() == 2
        first.close()  # the association ended
        assert server._serving() == 1
        second.close()
        assert server._serving() == 0
    finally:
        for client in clients:
            client.close()
        server.server_close()
        listener.close()


def test_one_receiver_process_per_usable_core_by_default(settings: Settings) -> None:
    from ingest.settings import DEFAULT_MAX_PROCESSES, receiver_processes

    # INGEST_RECEIVER_PROCESSES=0 (the default): the cores this process may run on, at most 4
    assert Settings().receiver_processes == 0
    cores = len(os.sched_getaffinity(0))
    assert receiver_processes(settings.replace(receiver_processes=0)) == min(
        cores, DEFAULT_MAX_PROCESSES)
    assert receiver_processes(settings.replace(receiver_processes=7)) == 7  # as asked
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})  # pinned to one core (taskset, a cpuset)
    try:
        assert receiver_processes(settings.replace(receiver_processes=0)) == 1
    finally:
        os.sched_setaffinity(0, before)



def _stabiliser(script: str) -> StabiliserProcess:
    stabiliser = StabiliserProcess(Settings())
    stabiliser.proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    return stabiliser


def test_the_receiver_serves_once_the_stabiliser_says_it_is_ready(
        caplog: pytest.LogCaptureFixture) -> None:
    stabiliser = _stabiliser("import os, time; time.sleep(0.5); os.write(1, b'ready\\n');"
                             " time.sleep(60)")
    stabiliser.wait_ready(timeout=30)  # after 30 s it would log that it is not ready
    assert stabiliser.proc is not None and stabiliser.proc.poll() is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    stabiliser.stop()


def test_a_stabiliser_that_ends_at_start_is_logged_and_not_waited_for(
        caplog: pytest.LogCaptureFixture) -> None:
    stabiliser = _stabiliser("import sys; sys.exit(3)")
    with caplog.at_level(logging.INFO, logger="dicom_ingest"):
        stabiliser.wait_ready(timeout=30)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 1 and "ended at start (exit status 3)" in messages[0], messages


def test_a_stop_ends_the_wait_for_the_stabiliser(caplog: pytest.LogCaptureFixture) -> None:
    stabiliser = _stabiliser("import time; time.sleep(60)")
    asked = [0]

    def stopping() -> bool:
        asked[0] += 1
        return asked[0] > 3

    with caplog.at_level(logging.INFO, logger="dicom_ingest"):
        stabiliser.wait_ready(timeout=30, stopping=stopping)
    assert asked[0] == 4  # not the 30 s (and its warning) a stop would otherwise wait
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    stabiliser.stop()
