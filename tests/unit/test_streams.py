"""The file a received dataset streams into: every byte lands, in order, whatever the
fragment sizes, and a write error is kept for the answer."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from receiver.streams import WRITEBACK_STEP, SpoolTempFile
from tests.support import crc32

# lengths around the head and the writeback steps
LENGTHS = [0, 1, SpoolTempFile.HEAD - 1, SpoolTempFile.HEAD + 1, WRITEBACK_STEP - 1,
           WRITEBACK_STEP, WRITEBACK_STEP + 1, 3 * WRITEBACK_STEP + 132, 1_234_567]
FRAGMENTS = [1, 7, 128, 4096, 65_536, WRITEBACK_STEP, 300_000]


def _stream(stream: SpoolTempFile, data: bytes, rng: random.Random) -> None:
    offset = 0
    while offset < len(data):
        size = rng.choice(FRAGMENTS)
        assert stream.write(memoryview(data)[offset : offset + size]) == len(
            data[offset : offset + size])
        offset += size


@pytest.mark.parametrize("length", LENGTHS)
def test_every_byte_lands_in_order(tmp_path: Path, length: int) -> None:
    rng = random.Random(length)
    data = rng.randbytes(length)
    stream = SpoolTempFile(tmp_path)
    _stream(stream, data, rng)
    stream.finish()
    stream.close()
    assert Path(stream.name).read_bytes() == data
    assert stream.size == length == os.stat(stream.name).st_size
    assert stream.crc.hexdigest() == crc32(data)
    assert stream.head == data[: SpoolTempFile.HEAD]


def test_a_write_error_is_kept_for_finish_and_the_rest_swallowed(tmp_path: Path) -> None:
    stream = SpoolTempFile(tmp_path)
    stream.write(b"x" * WRITEBACK_STEP)  # written, and its writeback started
    devnull = os.open(os.devnull, os.O_RDONLY)  # the disk goes away under it
    os.dup2(devnull, stream.fd)
    os.close(devnull)
    assert stream.write(b"y" * WRITEBACK_STEP) == WRITEBACK_STEP  # no exception on the way in
    assert stream.write(b"z") == 1
    with pytest.raises(OSError) as raised:
        stream.finish()
    assert raised.value.errno == errno.EBADF
    stream.close()


def test_a_stream_that_could_not_be_created_fails_at_finish(tmp_path: Path) -> None:
    stream = SpoolTempFile.failed(OSError(errno.ENOSPC, "no temp file"))
    assert stream.write(b"x" * 10) == 10 and stream.size == 0
    with pytest.raises(OSError) as raised:
        stream.finish()
    assert raised.value.errno == errno.ENOSPC
    stream.close()
    assert stream.fd == -1


def test_a_short_write_is_kept_though_its_buffer_is_reused(tmp_path: Path) -> None:
    """The fast path reads every fragment into one reused buffer: a short write waits to go
    out with the next, so it must not keep a view of that buffer."""
    stream = SpoolTempFile(tmp_path)
    buffer = bytearray(b"a" * 100)
    stream.write(memoryview(buffer))
    buffer[:] = b"b" * 100
    stream.write(memoryview(buffer))
    stream.finish()
    stream.close()
    assert Path(stream.name).read_bytes() == b"a" * 100 + b"b" * 100
