"""The publisher process's reading of receipt ids: batches, and the end of input."""

from __future__ import annotations

import os
import threading
import time

from receiver.publisher import _lines


def _write_slowly(fd: int, parts: list[bytes], pause: float) -> threading.Thread:
    def run() -> None:
        for part in parts:
            os.write(fd, part)
            time.sleep(pause)
        os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_ids_that_arrive_while_it_gathers_go_in_one_batch() -> None:
    r, w = os.pipe()
    writer = _write_slowly(w, [b"a\n", b"b\n", b"c\n"], 0.1)
    try:
        assert list(_lines(r, gather=30.0)) == [["a", "b", "c"]]
    finally:
        writer.join()
        os.close(r)


def test_without_gathering_each_read_is_a_batch() -> None:
    r, w = os.pipe()
    writer = _write_slowly(w, [b"a\n", b"b\n", b"c\n"], 0.3)
    try:
        assert list(_lines(r, gather=0.0)) == [["a"], ["b"], ["c"]]
    finally:
        writer.join()
        os.close(r)


def test_gathering_stops_at_the_batch_limit() -> None:
    r, w = os.pipe()
    writer = _write_slowly(w, [b"a\nb\n", b"c\n"], 0.3)
    try:  # two lines reach the limit: no waiting for the third
        assert list(_lines(r, gather=30.0, most=2)) == [["a", "b"], ["c"]]
    finally:
        writer.join()
        os.close(r)


def test_a_last_line_without_its_newline_and_blank_lines() -> None:
    r, w = os.pipe()
    writer = _write_slowly(w, [b"a\n\n  \nb"], 0.0)
    try:
        assert list(_lines(r, gather=30.0)) == [["a"], ["b"]]
    finally:
        writer.join()
        os.close(r)
