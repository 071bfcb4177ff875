"""What the integration tests share."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty catalog database of each kind (SQLite's in a folder not made yet:
    opening the catalog makes it)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog' / 'catalog.sqlite'}"
    return str(request.getfixturevalue("postgres"))
