"""UID rules and object-key naming: the archive layout is public."""

from __future__ import annotations

import re

_UID = re.compile(r"^[0-9.]{1,64}$")


def is_safe_uid(value: object) -> bool:
    """True when ``value`` may become part of a path or key: ``[0-9.]{1,64}``, no empty part."""
    return (
        isinstance(value, str)
        and _UID.match(value) is not None
        and ".." not in value
        and not value.startswith(".")
        and not value.endswith(".")
    )


def normalize_prefix(prefix: str) -> str:
    """``''`` stays empty; anything else ends in exactly one ``/`` and starts with none."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def instance_key(prefix: str, study: str, series: str, sop_instance: str) -> str:
    """``{prefix}{Study}/{Series}/{SOP}.dcm``; every UID must pass :func:`is_safe_uid`."""
    for uid in (study, series, sop_instance):
        if not is_safe_uid(uid):
            raise ValueError(f"unsafe UID for a key: {uid!r:.80}")
    return f"{normalize_prefix(prefix)}{study}/{series}/{sop_instance}.dcm"


def manifest_key(prefix: str, study: str) -> str:
    """``{prefix}{Study}/study.json``: the study's manifest."""
    if not is_safe_uid(study):
        raise ValueError(f"unsafe UID for a key: {study!r:.80}")
    return f"{normalize_prefix(prefix)}{study}/study.json"


def archive_prefix(archive_url: str) -> str:
    """The key prefix inside the archive ``INGEST_ARCHIVE_URL`` names (``s3://BUCKET/PREFIX``;
    a directory archive has none)."""
    return archive_url.partition("://")[2].partition("/")[2] if archive_url.startswith(
        "s3://") else ""


def quarantine_keys(prefix: str, receipt_id: str) -> tuple[str, str]:
    """The object key and the reason key of a quarantined receipt."""
    base = f"{normalize_prefix(prefix)}quarantine/{receipt_id}"
    return f"{base}.dcm", f"{base}.json"
