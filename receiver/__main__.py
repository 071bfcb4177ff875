"""``python -m receiver``: one receiver process, with the settings of its environment (the
extra processes that the first one starts on its listening socket)."""

from __future__ import annotations

import sys

from ingest import logs
from ingest.settings import from_env
from receiver import scp


def main() -> int:
    settings = from_env()
    logs.configure(settings.log_format, settings.log_level)
    return scp.run(settings)


if __name__ == "__main__":
    sys.exit(main())
