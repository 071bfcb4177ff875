"""The receiver's entry: AE setup, handlers wired with their context, publisher and sweeper."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any

from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ingest.broker import make_celery, queue_length
from ingest.settings import Settings
from ingest.spool import Spool
from receiver import streams
from receiver.handlers import StoreContext, handle_echo, handle_store
from receiver.monitor import SpoolMonitor
from receiver.publisher import Publisher, publish
from receiver.sweeper import PeriodicSweeper

log = logging.getLogger("dicom_ingest.receiver")


# Which transfer syntax we pick when a sender offers several for one SOP class: the encoded
# ones first, deflate included (a sender offers them when it holds the instance that way, so
# it sends its original bytes instead of decoding them for us), then explicit VR little
# endian (VRs as written), implicit VR little endian, big endian.
_UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED] + _UNCOMPRESSED


def build_ae(settings: Settings) -> AE:
    """An AE that accepts every storage SOP class in every transfer syntax, and C-ECHO."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.require_called_aet = settings.require_called_aet
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, TRANSFER_SYNTAXES)
    return ae


def _log_association(event: Any) -> None:
    requestor = event.assoc.requestor
    log.info(
        "association %s from %s (%s:%s)",
        event.event.name.lower().replace("evt_", ""),
        str(requestor.ae_title).strip(),
        requestor.address,
        requestor.port,
    )


@dataclass
class Receiver:
    """A running receiver; :meth:`stop` shuts it down in order."""

    settings: Settings
    server: Any
    publisher: Publisher
    sweeper: PeriodicSweeper
    monitor: SpoolMonitor

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()  # no new associations; waits for the serving threads
        self.sweeper.stop()
        self.monitor.stop()
        self.publisher.stop()


def start(settings: Settings) -> Receiver:
    """Start listening (non-blocking) with the publisher and the periodic sweeper."""
    spool = Spool(settings.spool_dir)
    spool.ensure()
    # Stream every incoming dataset to a temp file on the spool filesystem, so memory does not
    # grow with instance size and the finished file can be renamed into the spool.
    _config.STORE_RECV_CHUNKED_DATASET = True
    streams.install(spool.tmp)
    app = make_celery(settings, "dicom-ingest-receiver")
    publisher = Publisher(app)
    publisher.start()
    sweeper = PeriodicSweeper(
        spool, lambda rid: publish(app, rid), settings.sweep_interval, settings.sweep_age,
        queue_length=lambda: queue_length(settings.redis_url),
    )
    sweeper.start()
    monitor = SpoolMonitor(spool, settings.spool_min_free_mb * 2**20, settings.spool_max_depth,
                           settings.spool_max_age)
    monitor.start()
    context = StoreContext(spool=spool, enqueuer=publisher, gate=monitor)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [context]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_ACCEPTED, _log_association),
        (evt.EVT_REJECTED, _log_association),
        (evt.EVT_RELEASED, _log_association),
        (evt.EVT_ABORTED, _log_association),
    ]
    ae = build_ae(settings)
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    receiver = Receiver(settings, server, publisher, sweeper, monitor)
    log.info(
        "receiver %s listening on %s:%d, spool %s, broker %s",
        settings.ae_title,
        settings.host,
        receiver.port,
        settings.spool_dir,
        _redact(settings.redis_url),
    )
    return receiver


def run(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then stop cleanly."""
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("receiver: %s, stopping", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    receiver = start(settings)
    done.wait()
    receiver.stop()
    log.info("receiver stopped")
    return 0


def _redact(url: str) -> str:
    """A URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
