import copy
import os

from ingest.settings import Settings
from receiver.scp import SharedContexts, build_ae


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
