"""The fast path's hand-made encodings, read back with pydicom's and pynetdicom's decoders."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom.dsutils import decode
from pynetdicom.pdu import P_DATA_TF

from receiver import reactors
from receiver.fastpath import (
    CommandSetError,
    command_pdus,
    encode_command_set,
    file_meta,
    parse_command_set,
    store_response,
)

CT = b"1.2.840.10008.5.1.4.1.1.2"
SOP = b"1.2.826.0.1.3680043.8.498.123"  # odd length: padded with a NUL


def test_store_response_is_what_pynetdicom_reads() -> None:
    command = decode(io.BytesIO(store_response(CT, SOP, 7, 0xA700)), True, True)
    assert command.CommandField == 0x8001
    assert command.MessageIDBeingRespondedTo == 7
    assert command.Status == 0xA700
    assert command.CommandDataSetType == 0x0101
    assert command.AffectedSOPClassUID == CT.decode()
    assert command.AffectedSOPInstanceUID == SOP.decode()
    encoded = store_response(CT, SOP, 7, 0)
    assert command.CommandGroupLength == len(encoded) - 12


def test_command_set_round_trip_and_garbage() -> None:
    elements = [(0x0002, CT + b"\0"), (0x0100, b"\x01\x00"), (0x0110, b"\x05\x00")]
    parsed = parse_command_set(encode_command_set(elements))
    assert parsed[0x0002] == CT + b"\0" and parsed[0x0110] == b"\x05\x00"
    assert parsed[0x0000] == (len(encode_command_set(elements)) - 12).to_bytes(4, "little")
    for bad in (b"\x00\x00\x00\x00\x04\x00", b"\x08\x00\x10\x00\x02\x00\x00\x00ab",
                b"\x00\x00\x02\x00\xff\x00\x00\x00ab"):
        with pytest.raises(CommandSetError):
            parse_command_set(bad)


@pytest.mark.parametrize("max_pdu", [0, 16, 64, 1 << 20])
def test_command_pdus_respect_the_peer_maximum(max_pdu: int) -> None:
    command = store_response(CT, SOP, 1, 0)
    stream = command_pdus(3, command, max_pdu)
    fragments, offset = [], 0
    while offset < len(stream):
        length = int.from_bytes(stream[offset + 2 : offset + 6], "big")
        pdu = P_DATA_TF()
        pdu.decode(stream[offset : offset + 6 + length])
        assert max_pdu == 0 or length <= max_pdu
        for item in pdu.presentation_data_value_items:
            assert item.presentation_context_id == 3
            fragments.append(item.presentation_data_value)
        offset += 6 + length
    assert b"".join(f[1:] for f in fragments) == command
    assert [f[0] for f in fragments] == [0x01] * (len(fragments) - 1) + [0x03]


def test_file_meta_is_a_valid_part10_header(tmp_path: Path) -> None:
    meta = file_meta(CT, SOP, b"1.2.840.10008.1.2.1", b"1.2.826.0.1.3680043.9.3811.3.0.0",
                     b"PYNETDICOM_300", b"MODALITY1", b"DICOM-INGEST")
    (tmp_path / "meta").write_bytes(meta)
    read = pydicom.filereader.read_file_meta_info(tmp_path / "meta")
    assert read.MediaStorageSOPClassUID == CT.decode()
    assert read.MediaStorageSOPInstanceUID == SOP.decode()
    assert read.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert read.SourceApplicationEntityTitle.strip() == "MODALITY1"
    assert read.ReceivingApplicationEntityTitle.strip() == "DICOM-INGEST"
    assert 132 + 12 + read.FileMetaInformationGroupLength == len(meta)


def test_the_association_reactor_wakes_on_its_event() -> None:
    """The patched reactor turn returns once its event is set, and clears it for the next
    turn; other sleeps are real sleeps."""
    wake = threading.Event()
    done = threading.Event()

    def reactor() -> None:
        threading.current_thread()._dicom_ingest_wake = wake  # type: ignore[attr-defined]
        reactors._association_sleep(0.001)
        done.set()

    wake.set()
    thread = threading.Thread(target=reactor)
    thread.start()
    thread.join(10)
    assert done.is_set() and not wake.is_set()
