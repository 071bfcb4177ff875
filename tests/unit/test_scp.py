import copy

from ingest.settings import Settings
from receiver.scp import SharedContexts, build_ae


def test_a_deep_copy_of_the_supported_contexts_shares_them() -> None:
    """pynetdicom deep-copies the server's contexts for every association; ours hands out a
    new list of the same context objects (negotiation only reads them)."""
    contexts = SharedContexts(build_ae(Settings()).supported_contexts)
    copied = copy.deepcopy(contexts)
    assert type(copied) is list and copied == list(contexts)
    assert all(a is b for a, b in zip(copied, contexts, strict=True))
    assert len(copied) == 171  # every storage SOP class pynetdicom knows, and Verification
