"""The bench's DCMTK that fsyncs before it answers (``bench/fsync_before_answer.c``, loaded
into storescp with LD_PRELOAD): seen through strace, storescp fsyncs each received file and
then its directory before it writes the C-STORE response."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from bench.servers import build_fsync_before_answer, free_port, wait_port
from tests.processes import stop_traced
from tests.support import dcmtk, dcmtk_env, make_instance, need

_CALL = re.compile(r"^\d+\s+(\w+)\((.*)\)\s+=\s+(-?\d+)")


def test_storescp_fsyncs_each_file_and_its_directory_before_it_answers(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    need(strace is not None, "strace (apt-get install strace)")
    library = build_fsync_before_answer(tmp_path)
    need(library is not None, "a C compiler (cc) to build bench/fsync_before_answer.c")
    assert strace is not None and library is not None
    out, trace, port = tmp_path / "out", tmp_path / "trace.txt", free_port()
    out.mkdir()
    files = [tmp_path / f"{n}.dcm" for n in range(2)]
    for path in files:
        make_instance(path, pixel_bytes=200_000)
    with open(tmp_path / "storescp.log", "wb") as log:
        proc = subprocess.Popen(
            [strace, "-f", "-s", "4096", "-e", "trace=openat,fsync,write", "-o", str(trace),
             "-E", f"LD_PRELOAD={library}", dcmtk("storescp"), "+xa", "-od", str(out),
             str(port)], env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_port(port, proc)
            except RuntimeError:  # strace could not trace (ptrace not allowed here)
                need(False, f"strace tracing storescp: {(tmp_path / 'storescp.log').read_text()}")
            sent = subprocess.run([dcmtk("storescu"), "-aec", "ANY-SCP", "127.0.0.1", str(port),
                                   *map(str, files)], env=dcmtk_env(), capture_output=True,
                                  text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr
        finally:
            stop_traced(proc)
    assert len(list(out.iterdir())) == 2

    # each received file: opened, fsynced, its directory opened and fsynced, and only then
    # a write to another descriptor than the file's (the association's socket: the answer)
    answered_durable, received, synced_file, synced_dir = 0, -1, False, False
    directory = -1
    for line in trace.read_text(errors="replace").splitlines():
        call = _CALL.match(line)
        if call is None:
            continue
        name, args, result = call.group(1), call.group(2), int(call.group(3))
        if name == "openat" and f'"{out}/' in args and "O_WRONLY" in args:
            received, synced_file, synced_dir = result, False, False
        elif name == "openat" and f'"{out}"' in args and "O_DIRECTORY" in args:
            directory = result
        elif name == "fsync" and received >= 0 and int(args) == received:
            synced_file = True
        elif name == "fsync" and synced_file and int(args) == directory:
            synced_dir = True
        elif name == "write" and received >= 0 and int(args.split(",")[0]) not in (
                received, 1, 2):
            assert synced_file and synced_dir, f"answered before the fsyncs: {line}"
            answered_durable += 1
            received = -1
    assert answered_durable == 2

