"""The catalog: one SQL row per archived or quarantined object, an index of the archive that
can be rebuilt from it (``dicom-ingest catalog rebuild``).

SQLAlchemy Core on SQLite (the default, a file) or PostgreSQL (``postgresql://``, through
psycopg 3). The schema is Alembic's (``ingest/migrations/``): :meth:`Catalog.open` creates or
upgrades it. The database's own errors surface as they are, except that a database which
cannot be reached or refuses us is a :class:`CatalogError` (the workers retry on it)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ingest.settings import Settings, redact_url

ARCHIVED, QUARANTINED = "archived", "quarantined"
#: where the catalog lives when INGEST_CATALOG_URL is unset (relative to the working directory)
DEFAULT_PATH = Path("data") / "catalog.sqlite"
#: seconds a SQLite writer waits for another process's write to end
SQLITE_BUSY_TIMEOUT = 30
#: how many UIDs or keys go into one IN (...)
_CHUNK = 500

metadata = sa.MetaData()
#: the one table; its schema is made by the Alembic revisions, this is how the code sees it
instances = sa.Table(
    "instances",
    metadata,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("sop_instance_uid", sa.String, nullable=False, index=True),
    sa.Column("sop_class_uid", sa.String, nullable=False),
    sa.Column("study_uid", sa.String, nullable=False, index=True),
    sa.Column("series_uid", sa.String, nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String, nullable=False),
    sa.Column("transfer_syntax", sa.String, nullable=False),
    sa.Column("calling_aet", sa.String, nullable=False, index=True),
    sa.Column("receipt_id", sa.String, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False, index=True),
    sa.Column("archived_at", sa.Float, nullable=True),
    sa.Column("state", sa.String, nullable=False),
    sa.Column("reason", sa.String, nullable=True),
)


#: one row per study that has archived instances: ``open`` until it is stable, then ``stable``
#: with the revision of its latest event (:mod:`ingest.studies`)
studies = sa.Table(
    "studies",
    metadata,
    sa.Column("study_uid", sa.String, primary_key=True),
    sa.Column("state", sa.String, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("first_received_at", sa.Float, nullable=False),
    sa.Column("last_received_at", sa.Float, nullable=False),
    sa.Column("last_archived_at", sa.Float, nullable=False, index=True),
    sa.Column("stabilised_at", sa.Float, nullable=True),
)
#: the outbox: one row per study event, ``{study}:{revision}``, until it is delivered
events = sa.Table(
    "events",
    metadata,
    sa.Column("event_id", sa.String, primary_key=True),
    sa.Column("study_uid", sa.String, nullable=False, index=True),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("manifest_key", sa.String, nullable=False),
    sa.Column("manifest", sa.Text, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("manifest_written_at", sa.Float, nullable=True),
    sa.Column("webhook_delivered_at", sa.Float, nullable=True),
    sa.Column("task_delivered_at", sa.Float, nullable=True),
    sa.Column("delivered_at", sa.Float, nullable=True, index=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("claimed_until", sa.Float, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
)
#: each spool's watermark: every entry received before ``clear_before`` had left it at
#: ``updated_at`` (written by the stabiliser of the receiver on that spool)
spools = sa.Table(
    "spools",
    metadata,
    sa.Column("spool_id", sa.String, primary_key=True),
    sa.Column("clear_before", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
OPEN, STABLE = "open", "stable"


class CatalogError(Exception):
    """The database cannot be reached or refused us."""


@dataclass(frozen=True)
class Row:
    """One object in the archive: an instance under its key, or a quarantined object (then
    ``study_uid`` and ``series_uid`` may be empty and ``reason`` says why)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    key: str
    size: int
    sha256: str
    transfer_syntax: str
    calling_aet: str
    receipt_id: str
    received_at: float
    archived_at: float | None
    state: str
    reason: str | None = None


_FIELDS = tuple(f.name for f in fields(Row))


def catalog_url(settings: Settings) -> str:
    """INGEST_CATALOG_URL, or the default SQLite file's URL."""
    return settings.catalog_url or f"sqlite:///{DEFAULT_PATH}"


def engine_url(url: str) -> sa.URL:
    """``url`` as SQLAlchemy needs it: ``postgresql://`` (and ``postgres://``) through
    psycopg 3."""
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


@contextlib.contextmanager
def _unreachable(url: str, what: str) -> Iterator[None]:
    """Translate a database that is down, gone away or refusing us into CatalogError."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        unreachable = isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
        if not (unreachable or exc.connection_invalidated):
            raise
        detail = " ".join(str(exc.orig).split())  # the driver's message on one line
        raise CatalogError(f"catalog {redact_url(url)}: {what} failed: {detail}") from exc


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers never block the writer; several worker processes write one at a time (each
    # waits up to SQLITE_BUSY_TIMEOUT, the connection's ``timeout``)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


#: the newest migration in ``ingest/migrations/versions`` (a unit test keeps them one)
HEAD_REVISION = "0002"


def schema_revision(connection: sa.Connection) -> str | None:
    """The migration the catalog's schema is at; None before the first."""
    if not sa.inspect(connection).has_table("alembic_version"):
        return None
    value = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    return None if value is None else str(value)


class Catalog:
    """The catalog's rows, read and written through one engine (open one per process)."""

    def __init__(self, engine: sa.Engine, url: str) -> None:
        self.engine = engine
        self.url = url

    @classmethod
    def open(cls, url: str) -> Catalog:
        """Connect and create or upgrade the schema; CatalogError when unreachable."""
        target = engine_url(url)
        if target.get_backend_name() == "sqlite":
            if target.database and target.database != ":memory:":
                Path(target.database).parent.mkdir(parents=True, exist_ok=True)
            # a connection per use: nothing held open between tasks, nothing left to close
            engine = sa.create_engine(target, poolclass=sa.NullPool,
                                      connect_args={"timeout": SQLITE_BUSY_TIMEOUT})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = sa.create_engine(target, pool_pre_ping=True, pool_size=2,
                                      connect_args={"connect_timeout": 5})
        catalog = cls(engine, url)
        try:
            with _unreachable(url, "opening"):
                catalog._upgrade()
        except BaseException:
            engine.dispose()
            raise
        return catalog

    def _upgrade(self) -> None:
        with self.engine.connect() as connection:
            if schema_revision(connection) == HEAD_REVISION:
                return  # current: Alembic (seconds of imports) is not even loaded
        from ingest.migrations import upgrade

        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            lock = Path(f"{database}.lock") if database and database != ":memory:" else None
            with _file_lock(lock), self.engine.begin() as connection:
                upgrade(connection)
        else:
            with self.engine.begin() as connection:
                # one process migrates at a time; the others then find the schema current
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(74657)"))
                upgrade(connection)

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def transaction(self, what: str = "writing") -> Iterator[sa.Connection]:
        """One transaction (committed at the end of the block); CatalogError when the
        database cannot be reached."""
        with _unreachable(self.url, what), self.engine.begin() as connection:
            yield connection

    def record(self, row: Row) -> None:
        """Insert ``row``, or replace the row of its key."""
        self.record_many([row])

    def record_many(self, rows: Sequence[Row]) -> None:
        """:meth:`record` for each of ``rows``, in one transaction."""
        if not rows:
            return
        with self.transaction() as connection:
            self._upsert(connection, rows)

    def _upsert(self, connection: sa.Connection, rows: Sequence[Row]) -> None:
        values = [{name: getattr(row, name) for name in _FIELDS} for row in rows]
        connection.execute(self._instance_upsert, values)

    # The statements a worker runs for every instance, built once: building one (its cache
    # key above all) cost more CPU than running it.

    @functools.cached_property
    def _instance_upsert(self) -> Any:
        statement = self.insert(instances)
        return statement.on_conflict_do_update(
            index_elements=[instances.c.key],
            set_={name: statement.excluded[name] for name in _FIELDS if name != "key"})

    @functools.cached_property
    def _study_upsert(self) -> Any:
        """A study opened (or re-opened) by an archived instance; parameters ``study_uid``,
        ``state``, ``revision``, ``first_received_at``, ``last_received_at`` and
        ``last_archived_at``."""
        statement = self.insert(studies)
        new, old = statement.excluded, studies.c
        return statement.on_conflict_do_update(
            index_elements=[old.study_uid],
            set_={"state": OPEN,
                  "last_archived_at": sa.case((new.last_archived_at > old.last_archived_at,
                                               new.last_archived_at),
                                              else_=old.last_archived_at),
                  "first_received_at": sa.case((new.first_received_at < old.first_received_at,
                                                new.first_received_at),
                                               else_=old.first_received_at),
                  "last_received_at": sa.case((new.last_received_at > old.last_received_at,
                                               new.last_received_at),
                                              else_=old.last_received_at)})

    def insert(self, table: sa.Table) -> Any:
        """An INSERT of this dialect, which knows ON CONFLICT."""
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    def record_archived(self, row: Row, now: float | None = None) -> None:
        """The row of a newly archived instance, and in the same transaction its study opened
        (or re-opened, after its event) with ``now`` as its last archive time: a worker that
        dies after this has told both, or neither."""
        now = time.time() if now is None else now
        study = {"study_uid": row.study_uid, "state": OPEN, "revision": 0,
                 "first_received_at": row.received_at, "last_received_at": row.received_at,
                 "last_archived_at": now}
        with self.transaction() as connection:
            self._upsert(connection, [row])
            connection.execute(self._study_upsert, study)

    def get(self, key: str) -> Row | None:
        """The row of ``key``, if there is one."""
        with _unreachable(self.url, "reading"), self.engine.connect() as connection:
            found = connection.execute(
                sa.select(instances).where(instances.c.key == key)).first()
        return None if found is None else as_row(found)

    def by_sop(self, sop_instance_uids: Iterable[str]) -> dict[str, list[Row]]:
        """Every row of each given SOP Instance UID that has one (more than one: a versioned
        copy, or a quarantined object beside the archived one)."""
        uids = sorted(set(sop_instance_uids))
        found: dict[str, list[Row]] = {}
        with _unreachable(self.url, "reading"), self.engine.connect() as connection:
            for start in range(0, len(uids), _CHUNK):
                query = (sa.select(instances)
                         .where(instances.c.sop_instance_uid.in_(uids[start:start + _CHUNK]))
                         .order_by(instances.c.received_at, instances.c.key))
                for raw in connection.execute(query):
                    row = as_row(raw)
                    found.setdefault(row.sop_instance_uid, []).append(row)
        return found

    def find(self, study: str | None = None, series: str | None = None, sop: str | None = None,
             calling_aet: str | None = None, since: float | None = None,
             limit: int | None = None) -> list[Row]:
        """Rows matching every filter given (``since``: received at or after, in seconds
        since the epoch), oldest first."""
        query = sa.select(instances)
        for column, value in ((instances.c.study_uid, study), (instances.c.series_uid, series),
                              (instances.c.sop_instance_uid, sop),
                              (instances.c.calling_aet, calling_aet)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(instances.c.received_at >= since)
        query = query.order_by(instances.c.received_at, instances.c.key)
        if limit is not None:
            query = query.limit(limit)
        with _unreachable(self.url, "reading"), self.engine.connect() as connection:
            return [as_row(raw) for raw in connection.execute(query)]

    def keys(self) -> set[str]:
        """The key of every row."""
        with _unreachable(self.url, "reading"), self.engine.connect() as connection:
            return set(connection.execute(sa.select(instances.c.key)).scalars())

    def remove(self, keys: Iterable[str]) -> int:
        """Delete the rows of ``keys``; how many there were."""
        wanted = sorted(set(keys))
        removed = 0
        with self.transaction() as connection:
            for start in range(0, len(wanted), _CHUNK):
                result = connection.execute(
                    sa.delete(instances).where(instances.c.key.in_(wanted[start:start + _CHUNK])))
                removed += result.rowcount
        return removed


class LazyCatalog:
    """A catalog opened at its first use, not before: a process that starts while the database
    is down still does the rest of its work, and asks again at the next use (each call raises
    CatalogError until the database answers)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._catalog: Catalog | None = None

    def __call__(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog.open(self.url)
        return self._catalog

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None


def as_row(raw: Any) -> Row:
    """A :class:`Row` from a result row of ``instances``."""
    return Row(**{name: getattr(raw, name) for name in _FIELDS})


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive lock on ``path`` (made if missing) while the block runs; none for None."""
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
