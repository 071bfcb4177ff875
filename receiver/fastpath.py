"""The C-STORE fast path: P-DATA straight from the socket to the spool file.

pynetdicom receives a C-STORE through several layers: the DUL thread decodes each P-DATA-TF
PDU into objects and queues it, the association thread polls the queue, reassembles the
command set and decodes it with pydicom, builds and encodes a File Meta with pydicom, calls
our handler, then encodes the response with pydicom and queues it back to the DUL thread to
send. That work, not the bytes, bounds the receiver.

Here the DUL thread itself handles the P-DATA-TF PDUs of an established association
(``Sta6``): it reads each PDU into one reused buffer, walks its PDVs, parses the command set
(always implicit VR little endian, a handful of elements), writes the File Meta and then
every dataset fragment into a :class:`~receiver.streams.SpoolTempFile` as it arrives, makes
the instance durable with :func:`receiver.handlers.store` (the same code pynetdicom's handler
path uses), and writes the C-STORE response PDU on the socket. Nothing is decoded.

Everything else stays pynetdicom's: association negotiation, the AE title checks, TLS,
release, abort, timers, C-ECHO, and any message the fast path does not recognise as a
well-formed C-STORE request on an accepted storage context (those PDVs are handed to
pynetdicom unchanged, and its handler answers them). ``INGEST_RECEIVER_FAST_PATH=0`` turns the
fast path off.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from receiver import internals, limits, statuses
from receiver.handlers import Arrival, Received, StoreContext, account, hand_off, store
from receiver.reactors import wait_readable
from receiver.streams import SpoolTempFile

log = logging.getLogger("dicom_ingest.receiver")

_PDU_HEADER = struct.Struct(">BBI")  # type, reserved, length
_PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context id, control header
_ELEMENT = struct.Struct("<HHI")  # implicit VR little endian: group, element, length
_US = struct.Struct("<H")
_P_DATA_TF = 0x04
_ESTABLISHED = "Sta6"

# command set elements (group 0000)
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_RESPONDED = 0x0120
_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_AFFECTED_SOP_INSTANCE = 0x1000
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101

# Mid-dataset the DUL thread keeps reading for up to this long before it goes back to
# pynetdicom's reactor: the rest of the dataset is on its way.
_MID_MESSAGE_WAIT = 0.05

_SLICE = 256 * 1024  # most of a dataset fragment read from the socket at once
_MAX_COMMAND = 64 * 1024  # a C-STORE command set is a few hundred bytes
_MAX_UID = 1024  # longer "UIDs" go to pynetdicom; the workers quarantine shorter bad ones


class CommandSetError(ValueError):
    """Bytes that are not an implicit VR little endian command set."""


def parse_command_set(data: bytes) -> dict[int, bytes]:
    """The elements of a command set: {element number: value bytes}; group 0000 only."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            raise CommandSetError("a command set element header is cut short")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0 or offset + length > end:
            raise CommandSetError(f"bad command set element ({group:04X},{element:04X})")
        elements[element] = data[offset : offset + length]
        offset += length
    return elements


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _uid(raw: bytes) -> bytes:
    return raw.rstrip(b"\0 ")


def encode_command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """An implicit VR little endian command set with its group length first."""
    body = b"".join(_ELEMENT.pack(0, number, len(value)) + value for number, value in elements)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def store_response(sop_class: bytes, sop_instance: bytes, message_id: int, status: int) -> bytes:
    """The command set of a C-STORE response."""
    return encode_command_set([
        (_AFFECTED_SOP_CLASS, _even(sop_class, b"\0")),
        (_COMMAND_FIELD, _US.pack(_C_STORE_RSP)),
        (_MESSAGE_ID_RESPONDED, _US.pack(message_id)),
        (_DATA_SET_TYPE, _US.pack(_NO_DATA_SET)),
        (_STATUS, _US.pack(status)),
        (_AFFECTED_SOP_INSTANCE, _even(sop_instance, b"\0")),
    ])


def command_pdus(context_id: int, command: bytes, max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying a command set, fragmented to the peer's maximum PDU length
    (0: no limit)."""
    room = len(command) if max_pdu <= 0 else max(1, max_pdu - 6)
    out = bytearray()
    for start in range(0, len(command), room):
        fragment = command[start : start + room]
        control = 0x03 if start + room >= len(command) else 0x01  # command; last or not
        item = _PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        out += _PDU_HEADER.pack(_P_DATA_TF, 0, len(item)) + item
    return bytes(out)


def _meta_element(number: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 2, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, number, vr, len(value)) + value


_META_VERSION = _meta_element(0x0001, b"OB", b"\x00\x01")


def file_meta_tail(implementation_uid: bytes, implementation_version: bytes,
                   source_ae: bytes, receiving_ae: bytes) -> bytes:
    """The File Meta elements that are the same for every instance of an association."""
    return b"".join((
        _meta_element(0x0012, b"UI", _even(implementation_uid, b"\0")),
        _meta_element(0x0013, b"SH", _even(implementation_version, b" ")),
        _meta_element(0x0016, b"AE", _even(source_ae, b" ")),
        _meta_element(0x0018, b"AE", _even(receiving_ae, b" ")),
    ))


_PREAMBLE = b"\0" * 128 + b"DICM"


def file_meta(sop_class: bytes, sop_instance: bytes, transfer_syntax: bytes,
              implementation_uid: bytes, implementation_version: bytes,
              source_ae: bytes, receiving_ae: bytes) -> bytes:
    """Preamble, ``DICM`` and the File Meta group (explicit VR little endian)."""
    return _file_meta(sop_class, sop_instance, transfer_syntax,
                      file_meta_tail(implementation_uid, implementation_version, source_ae,
                                     receiving_ae))


def _file_meta(sop_class: bytes, sop_instance: bytes, transfer_syntax: bytes,
               tail: bytes) -> bytes:
    """:func:`file_meta` with its association's part (:func:`file_meta_tail`) made already."""
    body = b"".join((
        _META_VERSION,
        _meta_element(0x0002, b"UI", _even(sop_class, b"\0")),
        _meta_element(0x0003, b"UI", _even(sop_instance, b"\0")),
        _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\0")),
        tail,
    ))
    return _PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


@dataclass(frozen=True)
class _Parties:
    """Who is on either end of an established association: the same for each of its
    C-STOREs, so worked out once."""

    calling: str
    called: str
    peer: str
    peer_max_pdu: int  # the longest PDU the requestor takes (0: no limit)
    meta_tail: bytes  # the File Meta's elements about both ends (:func:`file_meta_tail`)

    @classmethod
    def of(cls, assoc: Any) -> _Parties:
        requestor, acceptor = assoc.requestor, assoc.acceptor
        calling = str(requestor.ae_title).strip()
        called = str(acceptor.ae_title).strip()
        return cls(calling, called, f"{requestor.address}:{requestor.port}",
                   int(requestor.maximum_length or 0),
                   file_meta_tail(str(acceptor.implementation_class_uid).encode(),
                                  str(acceptor.implementation_version_name or "").encode()[:16],
                                  calling.encode("latin-1", "replace")[:16],
                                  called.encode("latin-1", "replace")[:16]))


class _Store:
    """One C-STORE on the fast path, from its command set to its response."""

    def __init__(self, arrival: Arrival, context_id: int, message_id: int,
                 sop_class: bytes, sop_instance: bytes, stream: SpoolTempFile,
                 meta_length: int) -> None:
        self.arrival = arrival
        self.context_id = context_id
        self.message_id = message_id
        self.sop_class = sop_class
        self.sop_instance = sop_instance
        self.stream = stream
        self.meta_length = meta_length

    def received(self) -> Received:
        self.stream.finish()  # raises the first write error, if there was one
        return Received(self.stream.name, self.stream.size,
                        self.stream.crc.hexdigest(), self.meta_length, self.stream.fd)

    def discard(self) -> None:
        self.stream.close()
        if self.stream.name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.stream.name)


class FastPath:
    """Installed on one association's DUL when its connection opens."""

    def __init__(self, dul: internals.Dul, ctx: StoreContext,
                 bounds: limits.PduLimits) -> None:
        self.dul = dul
        self.ctx = ctx
        self.bounds = bounds  # outside Sta6 its reader reads, and hands PDUs to pynetdicom
        self._buffer = bytearray(_SLICE)
        self._lock = threading.Lock()
        self._command = bytearray()  # command fragments of the message being assembled
        self._held: list[bytes] = []  # its PDV items, until we know whose message it is
        self._to_pynetdicom_until_done = False  # pynetdicom owns the current message
        self._store: _Store | None = None
        self._parties: _Parties | None = None  # the association's, once it is established

    def install(self) -> None:
        self.dul.replace_reader(self.read_pdu)

    # -- reading -----------------------------------------------------------------------

    def read_pdu(self) -> None:
        """Replaces ``DULServiceProvider._read_pdu_data``: P-DATA-TF of an established
        association comes here; everything else goes to pynetdicom through the bounded
        reader of :mod:`receiver.limits`, which also checks each PDU header read here.

        pynetdicom's reactor reads one PDU per turn. Mid-dataset this keeps reading while
        the next PDU is there or about to be, without a turn of the reactor per PDU, and
        returns to the reactor as soon as pynetdicom has something to do.
        """
        dul = self.dul
        while True:
            if dul.state != _ESTABLISHED or dul.transport is None:
                self.bounds.read_pdu()
                return
            if not self._read_one():
                return
            # data arrived: the association is not idle (pynetdicom restarts this timer after
            # each turn of its reactor; a long dataset is read here in one turn)
            dul.restart_idle_timer()
            if dul.has_work():
                return
            if self._store is None or not self._readable(_MID_MESSAGE_WAIT):
                return

    def _readable(self, timeout: float) -> bool:
        try:
            return bool(wait_readable(self.dul.sock, timeout))
        except (OSError, ValueError, AttributeError):
            return False

    def _read_one(self) -> bool:
        """Read and handle one PDU; False when pynetdicom must take over.

        A P-DATA-TF PDU is read one PDV at a time, and a dataset fragment in slices of at
        most :data:`_SLICE` bytes straight into the spool file: memory stays flat whatever
        PDU size a sender uses (the maximum we announce is unlimited by default)."""
        header = self._recv_bytes(6)
        if header is None:
            return False
        pdu_type, _, length = _PDU_HEADER.unpack(header)
        if not self.bounds.admit(pdu_type, length):  # it aborts the association
            self.abandon()
            return False
        if pdu_type != _P_DATA_TF:
            body = self._recv_bytes(length)
            if body is not None:
                self._to_pynetdicom(header + body)
            return False
        items: list[bytes] = []  # PDV items for pynetdicom, from this PDU
        remaining = length
        while remaining:
            pdv = self._recv_bytes(6) if remaining >= 6 else b""
            if pdv is None:
                return False
            if not pdv:
                log.error("a P-DATA-TF PDU ends inside a PDV header: aborting the association")
                return self._abort()
            item_length, context_id, control = _PDV_HEADER.unpack(pdv)
            size = item_length - 2
            if size < 0 or size > remaining - 6:
                log.error("a PDV longer than its P-DATA-TF PDU: aborting the association")
                return self._abort()
            remaining -= 6 + size
            if not self._on_pdv(size, context_id, control, items):
                return False
        if items:
            data = b"".join(items)
            self._to_pynetdicom(_PDU_HEADER.pack(_P_DATA_TF, 0, len(data)) + data)
        return True

    def _recv(self, count: int) -> memoryview | None:
        """Exactly ``count`` bytes from the socket, in the reused buffer; None (and Evt17,
        transport closed) when the peer goes away first."""
        if len(self._buffer) < count:
            self._buffer = bytearray(count)
        view = memoryview(self._buffer)[:count]
        sock: Any = self.dul.sock
        got = 0
        try:
            while got < count:
                n = sock.recv_into(view[got:], count - got)
                if n == 0:
                    break
                got += n
        except (OSError, TimeoutError, AttributeError):
            pass
        if got < count:
            view.release()
            self._peer_gone(count - got)
            return None
        return view

    def _peer_gone(self, short: int) -> None:
        """The peer closed (or the socket failed) ``short`` bytes before the end of a PDU:
        drop what is in progress and tell pynetdicom (Evt17, transport closed)."""
        log.info("association closed by the peer mid-PDU (%d bytes short)", short)
        self.abandon()
        self.dul.event("Evt17")

    def _recv_bytes(self, count: int) -> bytes | None:
        view = self._recv(count)
        if view is None:
            return None
        data = bytes(view)
        view.release()
        return data

    def _recv_into_stream(self, stream: SpoolTempFile, count: int) -> bool:
        """Read ``count`` bytes of a dataset fragment into ``stream``, through the reused
        receive buffer."""
        while count:
            view = self._recv(min(count, _SLICE))
            if view is None:
                return False
            stream.write(view)
            count -= len(view)
            view.release()
        return True

    def _to_pynetdicom(self, pdu: bytes) -> None:
        """Hand a whole PDU to pynetdicom, as its own reader would have."""
        if not self.dul.deliver(pdu):  # pynetdicom aborts the association
            log.error("unable to decode a received PDU: aborting the association")
            self.abandon()

    def _on_pdv(self, size: int, context_id: int, control: int, items: list[bytes]) -> bool:
        """Read and route one PDV of ``size`` bytes; False when the association ends."""
        is_command, is_last = control & 0x01, control & 0x02
        store = self._store
        if store is not None:  # a dataset we are receiving
            if is_command or context_id != store.context_id:
                log.error("C-STORE from %s: a PDV of another message or context arrived "
                          "mid-dataset: aborting the association", store.arrival.calling)
                return self._abort()
            if not self._recv_into_stream(store.stream, size):
                return False
            if is_last:
                self._finish(store)
            return True
        ours = is_command and not self._to_pynetdicom_until_done
        if ours and len(self._command) + size > _MAX_COMMAND:
            log.error("a command set of more than %d bytes: aborting the association",
                      _MAX_COMMAND)
            return self._abort()
        data = self._recv_bytes(size)
        if data is None:
            return False
        item = _PDV_HEADER.pack(size + 2, context_id, control) + data
        if not ours:
            items.append(item)
            if is_last and not is_command:
                self._to_pynetdicom_until_done = False
            return True
        # a command fragment: hold it until the command set is complete
        self._command += data
        self._held.append(item)
        if not is_last:
            return True
        command, held = bytes(self._command), self._held
        self._command, self._held = bytearray(), []
        store = self._begin(command, context_id)
        if store is None:  # not ours: pynetdicom gets the whole message
            items.extend(held)
            self._to_pynetdicom_until_done = self._has_data_set(command)
            return True
        self._store = store
        return True

    def _abort(self) -> bool:
        """Drop what is in progress; pynetdicom aborts the association (invalid PDU)."""
        self.abandon()
        self._command, self._held = bytearray(), []
        self.dul.event("Evt19")
        return False

    @staticmethod
    def _has_data_set(command: bytes) -> bool:
        try:
            value = parse_command_set(command).get(_DATA_SET_TYPE, b"")
        except CommandSetError:
            return False
        return len(value) == 2 and _US.unpack(value)[0] != _NO_DATA_SET

    # -- one C-STORE -------------------------------------------------------------------

    def _begin(self, command: bytes, context_id: int) -> _Store | None:
        """A :class:`_Store` for a well-formed C-STORE request on an accepted storage
        context, None for anything else (pynetdicom handles it)."""
        try:
            elements = parse_command_set(command)
        except CommandSetError:
            return None
        field, data_set_type = elements.get(_COMMAND_FIELD), elements.get(_DATA_SET_TYPE)
        message_id = elements.get(_MESSAGE_ID)
        sop_class = _uid(elements.get(_AFFECTED_SOP_CLASS, b""))
        sop_instance = _uid(elements.get(_AFFECTED_SOP_INSTANCE, b""))
        if (field is None or len(field) != 2 or _US.unpack(field)[0] != _C_STORE_RQ
                or data_set_type is None or len(data_set_type) != 2
                or _US.unpack(data_set_type)[0] == _NO_DATA_SET
                or message_id is None or len(message_id) != 2
                or not sop_class or not sop_instance
                or len(sop_class) > _MAX_UID or len(sop_instance) > _MAX_UID):
            return None
        assoc = self.dul.assoc
        context = internals.accepted_context(assoc, context_id)
        if context is None or str(context.abstract_syntax) != sop_class.decode("latin-1"):
            return None  # pynetdicom answers with the status the standard gives
        transfer_syntax = str(context.transfer_syntax[0])
        parties = self._parties
        if parties is None:
            parties = self._parties = _Parties.of(assoc)
        arrival = Arrival(
            calling=parties.calling,
            called=parties.called,
            peer=parties.peer,
            sop_class_uid=sop_class.decode("latin-1"),
            sop_instance_uid=sop_instance.decode("latin-1"),
            transfer_syntax=transfer_syntax,
        )
        meta = _file_meta(sop_class, sop_instance, transfer_syntax.encode(), parties.meta_tail)
        try:
            refusal = self.ctx.gate.refusal()
        except Exception:  # store() asks again, and answers for it
            refusal = None
        if refusal is not None:  # past a spool limit: the dataset is not written at all
            stream = SpoolTempFile.failed(OSError(errno.ENOSPC, refusal))
        else:
            try:
                stream = self.ctx.new_stream()
            except OSError as exc:  # answered 0xA700 once the dataset has arrived
                stream = SpoolTempFile.failed(exc)
        stream.write(meta)
        return _Store(arrival, context_id, _US.unpack(message_id)[0], sop_class, sop_instance,
                      stream, len(meta))

    def _finish(self, current: _Store) -> None:
        """The dataset is complete: make it durable, answer, then enqueue."""
        started = time.monotonic()
        with self._lock:
            if self._store is not current:
                return  # abandoned meanwhile
            self._store = None
        status, receipt = store(self.ctx, current.arrival, current.received)
        if receipt is None:
            current.discard()
        else:
            current.stream.close()
        self._respond(current, status)
        if receipt is not None:
            hand_off(self.ctx, receipt)
        account(self.ctx, current.arrival, status, started)

    def _respond(self, current: _Store, status: int) -> None:
        response = store_response(current.sop_class, current.sop_instance, current.message_id,
                                  status)
        parties = self._parties
        max_pdu = parties.peer_max_pdu if parties is not None else 0
        transport = self.dul.transport
        if transport is not None:
            transport.send(command_pdus(current.context_id, response, max_pdu))
        if status != statuses.SUCCESS:
            log.debug("C-STORE status=0x%04X answered", status)

    def abandon(self) -> None:
        """Drop the C-STORE in progress (the association ended or broke before its dataset
        was complete: it was never acked, the sender still holds it)."""
        with self._lock:
            current, self._store = self._store, None
        if current is not None:
            log.warning("C-STORE from %s: association ended before the dataset was complete; "
                        "nothing acked, %d bytes discarded", current.arrival.calling,
                        current.stream.size)
            current.discard()


def on_connection(event: Any, ctx: StoreContext) -> None:
    """EVT_CONN_OPEN handler: put the fast path on this association's DUL."""
    if getattr(event.assoc, "is_acceptor", True):
        fast = FastPath(internals.Dul(event.assoc.dul), ctx,
                        limits.installed(event.assoc, ctx.metrics))
        fast.install()
        event.assoc._dicom_ingest_fast_path = fast


def on_closed(event: Any) -> None:
    """EVT_CONN_CLOSE handler: discard a half-received dataset."""
    fast = getattr(event.assoc, "_dicom_ingest_fast_path", None)
    if isinstance(fast, FastPath):
        fast.abandon()
