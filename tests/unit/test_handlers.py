"""The C-STORE handler's fallback for a dataset that did not stream through our file."""

from __future__ import annotations

from pathlib import Path

from receiver import handlers
from tests.support import corpus_source, crc32, split_part10


def test_a_file_read_back_gets_its_size_crc_and_dataset_offset(tmp_path: Path) -> None:
    # larger than one read (1 MB), so the offset comes from the first and the CRC from all
    data = corpus_source("CT_small.dcm").read_bytes()
    meta, dataset = split_part10(data)
    body = dataset + b"\0" * (3 * (1 << 20))
    path = tmp_path / "received.dcm"
    path.write_bytes(meta + body)
    assert handlers._checksum(path) == (len(meta) + len(body), crc32(meta + body), len(meta))
