"""The catalog's schema migrations (Alembic), run by the code when the catalog is opened."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

HERE = Path(__file__).resolve().parent


def config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration, built in code: the scripts are this package; ``connection``
    is the one ``env.py`` migrates on."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(connection: sa.Connection) -> None:
    """Bring the schema on ``connection`` to the newest revision (nothing when it is)."""
    cfg = config(connection)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    if MigrationContext.configure(connection).get_current_revision() != head:
        command.upgrade(cfg, "head")
