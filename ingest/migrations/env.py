"""Alembic's environment: migrate on the connection the catalog hands over (see
:func:`ingest.migrations.config`), or on ``sqlalchemy.url`` when run by ``alembic`` itself."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:  # the alembic command line, for writing a new revision
        url = context.config.get_main_option("sqlalchemy.url")
        if url is None:
            raise RuntimeError("set sqlalchemy.url to run migrations from the command line")
        with sa.create_engine(url).begin() as own:
            context.configure(connection=own)
            with context.begin_transaction():
                context.run_migrations()
        return
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


run()
