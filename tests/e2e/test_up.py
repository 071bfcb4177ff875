"""``dicom-ingest up`` as a new user runs it: no Redis, no settings, one command."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import (
    cli,
    dcmtk,
    dcmtk_env,
    free_port,
    make_instance,
    port_open,
    run,
    split_part10,
    wait_for,
)

pytestmark = pytest.mark.e2e
ROOT = str(Path(__file__).resolve().parents[2])


def test_up_archives_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env |= {"INGEST_PORT": str(port), "INGEST_SPOOL_MIN_FREE_MB": "0",
            "PYTHONWARNINGS": "ignore"}
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cli("up", "--workers", "1"), cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 60, what="the receiver")
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
        files = []
        for i in range(3):
            make_instance(tmp_path / f"{i}.dcm", pixel_bytes=64 * 1024)
            files.append(str(tmp_path / f"{i}.dcm"))
        run([dcmtk("storescu"), "-aec", "DICOM-INGEST", "127.0.0.1", str(port), *files],
            env=dcmtk_env())
        archive = tmp_path / "data" / "archive"
        found = wait_for(lambda: len(list(archive.rglob("*.dcm"))) == 3 and
                         list(archive.rglob("*.dcm")), 60, what="three archived instances")
        assert sorted(split_part10(p.read_bytes())[1] for p in found) == sorted(
            split_part10(Path(f).read_bytes())[1] for f in files)
        assert (tmp_path / "data" / "redis" / "redis.log").exists()  # the embedded Redis ran
        # run beside it, the operator commands find its embedded Redis by themselves
        status = json.loads(run(cli("status", "--json"), env=env | {"PYTHONPATH": ROOT},
                                cwd=tmp_path).stdout)
        assert status["spool_depth"] == 0 and status["queue_length"] == 0
        assert status["workers"] and len(status["workers"]) == 1
        # the catalog lives in up's data directory, where find looks by default
        assert (tmp_path / "data" / "catalog.sqlite").exists()
        rows = run(cli("find", "--json"), env=env | {"PYTHONPATH": ROOT}, cwd=tmp_path).stdout
        assert len(rows.splitlines()) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(90)
        log.close()
    text = (tmp_path / "up.log").read_text(errors="replace")
    assert code == 0, text
    assert "pipeline stopped" in text
    assert not port_open(port)


def test_up_with_flower_needs_a_login(tmp_path: Path) -> None:
    """``up --flower`` serves Flower on loopback, never without a login: with none set it
    generates one and prints it."""
    import urllib.error
    import urllib.request

    port, fport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env |= {"INGEST_PORT": str(port), "INGEST_FLOWER_PORT": str(fport),
            "INGEST_SPOOL_MIN_FREE_MB": "0", "PYTHONWARNINGS": "ignore"}
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cli("up", "--workers", "1", "--flower"), cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: port_open(fport) or proc.poll() is not None, 90, what="flower")
            assert proc.poll() is None, log_path.read_text()
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{fport}/api/workers", timeout=10)
            assert refused.value.code == 401
            login = log_path.read_text().split("Flower's login for this run is ")[1].split()[0]
            request = urllib.request.Request(f"http://127.0.0.1:{fport}/api/workers")
            request.add_header("Authorization",
                               "Basic " + base64.b64encode(login.encode()).decode())
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(90) == 0, log_path.read_text()
