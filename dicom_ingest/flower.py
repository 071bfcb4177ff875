"""``dicom-ingest flower``: Celery's dashboard on our broker, never without authentication."""

from __future__ import annotations

import logging
import os
import secrets
import sys

from ingest.settings import Settings

log = logging.getLogger("dicom_ingest.flower")


def run(settings: Settings, address: str = "0.0.0.0") -> int:
    """Replace this process with Flower (so SIGTERM reaches it); basic auth always on."""
    auth = settings.flower_basic_auth
    if not auth:
        auth = f"admin:{secrets.token_urlsafe(12)}"
        # a one-machine convenience: the password is shown once, to whoever started it
        print(f"dicom-ingest: INGEST_FLOWER_BASIC_AUTH is not set; Flower's login for this "
              f"run is {auth}", file=sys.stderr)
    args = [sys.executable, "-m", "celery", "--broker", settings.redis_url, "flower",
            f"--port={settings.flower_port}", f"--address={address}",
            "--purge_offline_workers=60"]
    env = dict(os.environ, FLOWER_BASIC_AUTH=auth)  # not on the command line: ps shows that
    log.info("flower on http://%s:%d", address, settings.flower_port)
    os.execve(sys.executable, args, env)
    return 0  # not reached
