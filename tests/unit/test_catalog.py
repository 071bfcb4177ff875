"""The catalog's pieces that need no database server: its URL, rows from object metadata and
keys, ``--since``. (The catalog itself, on SQLite and PostgreSQL: tests/integration.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ingest.catalog import ARCHIVED, catalog_url, engine_url
from ingest.settings import Settings, SettingsError, from_env, known_variables
from workers.archive import StoredObject
from workers.inventory import format_time, instance_row, key_uids, parse_time

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def test_the_catalog_url_setting() -> None:
    assert "INGEST_CATALOG_URL" in known_variables()
    assert catalog_url(Settings()) == "sqlite:///data/catalog.sqlite"
    url = "postgresql://ingest:pw@db:5432/catalog"
    settings = from_env({"INGEST_CATALOG_URL": url})
    assert catalog_url(settings) == url and "pw" not in repr(settings)
    assert from_env({}, catalog_url="sqlite:////var/catalog.sqlite").catalog_url.endswith(
        "/var/catalog.sqlite")
    with pytest.raises(SettingsError, match="INGEST_CATALOG_URL") as raised:
        from_env({"INGEST_CATALOG_URL": "mysql://user:secret@db/catalog"})
    assert "secret" not in str(raised.value)


def test_postgresql_urls_go_to_psycopg_3() -> None:
    assert engine_url("postgresql://u:p@h:5/d").drivername == "postgresql+psycopg"
    assert engine_url("postgres://u@h/d").drivername == "postgresql+psycopg"
    assert engine_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"
    assert engine_url("sqlite:///x.sqlite").drivername == "sqlite"


def test_keys_name_the_uids() -> None:
    assert key_uids(f"{STUDY}/{SERIES}/{SOP}.dcm", "") == (STUDY, SERIES, SOP)
    assert key_uids(f"site/{STUDY}/{SERIES}/{SOP}.dcm", "site") == (STUDY, SERIES, SOP)
    versioned = f"{STUDY}/{SERIES}/{SOP}.20250101T000000-0123456789abcdef.dcm"
    assert key_uids(versioned, "") == (STUDY, SERIES, SOP)
    for other in (f"{STUDY}/study.json", "quarantine/20250101T000000-0123456789abcdef.dcm",
                  f"{STUDY}/{SERIES}/{SOP}.json", f"{STUDY}/x/{SOP}.dcm",
                  f"other/{STUDY}/{SERIES}/{SOP}.dcm", f"{STUDY}/{SERIES}/{SOP}.dcm.tmp"):
        assert key_uids(other, "") is None, other
    assert key_uids(f"{STUDY}/{SERIES}/{SOP}.dcm", "site") is None


def test_a_row_from_object_metadata() -> None:
    meta = {"sha256": "ab" * 32, "calling-aet": "CT1", "received-at": "2025-03-01T08:00:00Z",
            "transfer-syntax": "1.2.840.10008.1.2.1", "receipt-id": "r",
            "sop-class-uid": "1.2.840.10008.5.1.4.1.1.2", "archived-at": "2025-03-01T08:00:02Z"}
    stored = StoredObject(f"{STUDY}/{SERIES}/{SOP}.dcm", 10, "ab" * 32, metadata=meta,
                          modified=1.0)
    row = instance_row(stored, "")
    assert row is not None
    assert (row.sop_instance_uid, row.study_uid, row.series_uid) == (SOP, STUDY, SERIES)
    assert row.received_at == parse_time("2025-03-01T08:00:00Z") == 1740816000.0
    assert row.archived_at == 1740816002.0 and row.state == ARCHIVED
    assert (row.calling_aet, row.receipt_id, row.size) == ("CT1", "r", 10)
    assert format_time(row.received_at) == meta["received-at"]
    # archived by a version before archived-at: the store's time
    older = StoredObject(stored.key, 10, "ab" * 32, metadata={}, modified=5.0)
    assert instance_row(older, "") == row.__class__(
        SOP, "", STUDY, SERIES, stored.key, 10, "ab" * 32, "", "", "", 5.0, 5.0, ARCHIVED)
    assert instance_row(StoredObject("quarantine/x.dcm", 1, ""), "") is None


def test_since_takes_dates_times_and_durations() -> None:
    import argparse

    from dicom_ingest.cli import since

    assert since("2h", now=10_000.0) == 10_000.0 - 7200
    assert since("90s", now=100.0) == 10.0
    assert since("1.5d", now=200_000.0) == 200_000.0 - 129_600
    assert since("2025-03-01") == 1740787200.0  # UTC midnight
    assert since("2025-03-01T08:00") == 1740816000.0
    assert since("2025-03-01T09:00+01:00") == 1740816000.0
    assert since("2025-03-01T08:00:00Z") == 1740816000.0
    for bad in ("yesterday", "2h ago", "-1h", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            since(bad)


def test_the_head_revision_the_code_names_is_alembic_s() -> None:
    from alembic.script import ScriptDirectory

    from ingest.catalog import HEAD_REVISION
    from ingest.migrations import config

    assert ScriptDirectory.from_config(config()).get_current_head() == HEAD_REVISION


def test_a_current_catalog_opens_without_alembic(tmp_path: Path) -> None:
    """Alembic's imports take seconds of CPU; each worker process and the stabiliser open the
    catalog, so a current one opens without them (a new one gets its schema from Alembic)."""
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    probe = ("import sys; from ingest.catalog import Catalog, schema_revision, HEAD_REVISION; "
             f"c = Catalog.open({url!r}); "
             "print('alembic' in sys.modules, "
             "schema_revision(c.engine.connect()) == HEAD_REVISION)")
    root = Path(__file__).resolve().parents[2]
    first, second = (subprocess.run([sys.executable, "-c", probe], cwd=root, check=True,
                                    capture_output=True, text=True).stdout.split()
                     for _ in range(2))
    assert first == ["True", "True"]  # made by the migrations
    assert second == ["False", "True"]
