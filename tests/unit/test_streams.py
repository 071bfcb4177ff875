"""The file a received dataset streams into: every byte lands, in order, whatever the
fragment sizes, with direct I/O and without."""

from __future__ import annotations

import errno
import fcntl
import os
import random
from pathlib import Path

import pytest

from receiver import aio
from receiver.streams import DIRECT_ALIGN, DIRECT_CHUNK, SpoolTempFile, enable_direct
from tests.support import crc32, need

# lengths around the block and chunk edges, where a tail is padded and cut back
LENGTHS = [0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, DIRECT_CHUNK - 1,
           DIRECT_CHUNK, DIRECT_CHUNK + 1, 3 * DIRECT_CHUNK + 132, 1_234_567]
FRAGMENTS = [1, 7, 128, DIRECT_ALIGN, 65_536, DIRECT_CHUNK, 300_000]


def _direct_io_here(folder: Path) -> bool:
    probe = folder / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        return enable_direct(fd)
    finally:
        os.close(fd)
        probe.unlink()


def _stream(stream: SpoolTempFile, data: bytes, rng: random.Random) -> None:
    offset = 0
    while offset < len(data):
        size = rng.choice(FRAGMENTS)
        assert stream.write(memoryview(data)[offset : offset + size]) == len(
            data[offset : offset + size])
        offset += size


@pytest.mark.parametrize("direct,asynchronous", [(True, True), (True, False), (False, False)],
                         ids=["direct-async", "direct", "buffered"])
@pytest.mark.parametrize("length", LENGTHS)
def test_every_byte_lands_in_order(tmp_path: Path, direct: bool, asynchronous: bool,
                                   length: int) -> None:
    if direct:
        need(_direct_io_here(tmp_path), "a filesystem with O_DIRECT under the test's tmp")
    if asynchronous:
        need(aio.available(), "Linux native AIO (io_setup) allowed here")
    rng = random.Random(length)
    data = rng.randbytes(length)
    stream = SpoolTempFile(tmp_path, direct=direct, asynchronous=asynchronous)
    assert stream.direct is direct
    if direct:
        assert fcntl.fcntl(stream._fd, fcntl.F_GETFL) & os.O_DIRECT
    _stream(stream, data, rng)
    stream.finish()
    # every full chunk went out asynchronously, or none did; the file allocated ahead of
    # its writes is cut back to its size (checked below)
    assert stream.async_writes == (length // DIRECT_CHUNK if asynchronous else 0)
    stream.close()
    assert Path(stream.name).read_bytes() == data
    assert stream.size == length == os.stat(stream.name).st_size
    assert stream.crc.hexdigest() == crc32(data)
    assert stream.head == data[: SpoolTempFile.HEAD]


def test_a_write_error_is_kept_for_sync_and_the_rest_swallowed(tmp_path: Path) -> None:
    need(_direct_io_here(tmp_path), "a filesystem with O_DIRECT under the test's tmp")
    stream = SpoolTempFile(tmp_path)
    stream.write(b"x" * DIRECT_CHUNK)  # one chunk written
    os.close(stream._fd)  # the disk goes away under it
    stream._fd = os.open(os.devnull, os.O_RDONLY)
    assert stream.write(b"y" * DIRECT_CHUNK) == DIRECT_CHUNK  # no exception on the way in
    assert stream.write(b"z") == 1
    with pytest.raises(OSError) as raised:
        stream.finish()
    assert raised.value.errno == errno.EBADF
    stream.close()


def _receive_all(stream: SpoolTempFile, data: bytes, rng: random.Random) -> None:
    """Send ``data`` over a real socket pair in pieces and have ``stream`` receive it with
    :meth:`SpoolTempFile.receive`, asking for fragments of random sizes, as the fast path
    asks for the rest of each PDV."""
    import socket
    import threading

    ours, theirs = socket.socketpair()
    sender = threading.Thread(target=theirs.sendall, args=(data,))
    sender.start()
    try:
        left = len(data)
        while left and stream.receives_directly:
            wanted = min(left, rng.choice(FRAGMENTS))
            while wanted and stream.receives_directly:
                got = stream.receive(ours, wanted)
                assert 0 < got <= wanted
                wanted -= got
                left -= got
        while left:  # after a disk error: drained through write(), which drops it
            chunk = ours.recv(left)
            assert chunk
            stream.write(chunk)
            left -= len(chunk)
    except BaseException:
        ours.close()  # a failed test must not leave the sender blocked on a full socket
        raise
    finally:
        sender.join()  # everything sent (a send of nothing too) before ours closes
        ours.close()
        theirs.close()


@pytest.mark.parametrize("length", LENGTHS)
def test_received_straight_into_the_staging_buffer(tmp_path: Path, length: int) -> None:
    """Bytes read from a socket into the staging buffer itself land in order, with their
    size, CRC-32 and head, after a File Meta written the usual way."""
    need(_direct_io_here(tmp_path), "a filesystem with O_DIRECT under the test's tmp")
    rng = random.Random(length)
    meta, data = rng.randbytes(300), rng.randbytes(length)
    stream = SpoolTempFile(tmp_path)
    stream.write(meta)
    _receive_all(stream, data, rng)
    stream.finish()
    stream.close()
    assert Path(stream.name).read_bytes() == meta + data
    assert stream.size == len(meta + data)
    assert stream.crc.hexdigest() == crc32(meta + data)
    assert stream.head == (meta + data)[: SpoolTempFile.HEAD]


def test_a_disk_error_while_receiving_is_kept_and_the_rest_drained(tmp_path: Path) -> None:
    need(_direct_io_here(tmp_path), "a filesystem with O_DIRECT under the test's tmp")
    stream = SpoolTempFile(tmp_path)
    os.close(stream._fd)  # the disk goes away under it
    stream._fd = os.open(os.devnull, os.O_RDONLY)
    _receive_all(stream, b"y" * (3 * DIRECT_CHUNK), random.Random(1))
    assert not stream.receives_directly
    with pytest.raises(OSError) as raised:
        stream.finish()
    assert raised.value.errno == errno.EBADF
    stream.close()


def test_streams_reuse_their_staging_buffers(tmp_path: Path) -> None:
    need(_direct_io_here(tmp_path), "a filesystem with O_DIRECT under the test's tmp")
    first = SpoolTempFile(tmp_path)
    buffer = first._staging
    first.write(b"a" * 10)
    first.finish()
    first.close()
    second = SpoolTempFile(tmp_path)
    assert second._staging is buffer
    second.close()


def test_writes_in_flight_end_before_an_abandoned_stream_lets_go(tmp_path: Path) -> None:
    """A stream closed mid-dataset (the association broke) with writes in flight waits for
    them before its buffers and its AIO context serve the next stream."""
    need(_direct_io_here(tmp_path), "a filesystem with O_DIRECT under the test's tmp")
    need(aio.available(), "Linux native AIO (io_setup) allowed here")
    abandoned = SpoolTempFile(tmp_path)
    abandoned.write(b"a" * (2 * DIRECT_CHUNK))
    assert abandoned.async_writes == 2 and len(abandoned._inflight) == 2
    abandoned.close()
    assert not abandoned._inflight
    data = random.Random(2).randbytes(3 * DIRECT_CHUNK + 5)
    following = SpoolTempFile(tmp_path)
    following.write(data)
    following.finish()
    following.close()
    assert Path(following.name).read_bytes() == data
    assert following.async_writes == 3


def test_the_last_writes_may_end_after_finish(tmp_path: Path) -> None:
    """finish(wait=False) writes the tail while the last full chunk may still be in flight;
    wait() ends it, and then every byte is in the file."""
    need(_direct_io_here(tmp_path), "a filesystem with O_DIRECT under the test's tmp")
    need(aio.available(), "Linux native AIO (io_setup) allowed here")
    data = random.Random(3).randbytes(2 * DIRECT_CHUNK + 333)
    stream = SpoolTempFile(tmp_path)
    stream.write(data)
    stream.finish(wait=False)
    assert stream.async_writes == 2
    stream.wait()
    assert not stream._inflight
    stream.close()
    assert Path(stream.name).read_bytes() == data
    assert os.stat(stream.name).st_size == len(data)


_REFUSED = """
import os, resource, signal, sys
from pathlib import Path
from receiver.streams import DIRECT_CHUNK, SpoolTempFile
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (DIRECT_CHUNK + 4096, DIRECT_CHUNK + 4096))
stream = SpoolTempFile(Path(sys.argv[1]))
stream.write(b"x" * (3 * DIRECT_CHUNK))  # the allocation ahead goes past the limit
try:
    stream.finish()
except OSError as exc:
    print("refused", exc.errno, stream.async_writes)
else:
    print("finished", stream.async_writes)
stream.close()
"""


def test_a_refused_allocation_is_the_streams_error(tmp_path: Path) -> None:
    """The file cannot grow (here: RLIMIT_FSIZE; a full disk gives ENOSPC the same way):
    the stream keeps the error for finish(), which the C-STORE answers 0xA700."""
    import subprocess
    import sys

    need(_direct_io_here(tmp_path), "a filesystem with O_DIRECT under the test's tmp")
    need(aio.available(), "Linux native AIO (io_setup) allowed here")
    result = subprocess.run([sys.executable, "-c", _REFUSED, str(tmp_path)],
                            capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parents[2])
    assert result.stdout.split() == ["refused", str(errno.EFBIG), "0"], result.stderr
