"""Helpers the test tiers share, by what they help with: :mod:`tests.support.services`
(skips, polling, ports, tools), :mod:`tests.support.dicom` (files), :mod:`tests.support.senders`
and :mod:`tests.support.spool`; re-exported here."""

from tests.support.dicom import (
    CORPUS,
    corpus_source,
    crc32,
    dataset_bytes,
    encode_dataset,
    hostile_dataset,
    make_instance,
    make_segmentation,
    objects_under,
    raw_part10,
    sha256,
    split_part10,
    unique_copy,
)
from tests.support.senders import commitment_request, pynetdicom_send
from tests.support.services import (
    IN_CI,
    cli,
    dcmtk,
    dcmtk_env,
    free_port,
    need,
    port_open,
    run,
    task_event_listener,
    wait_for,
)
from tests.support.spool import spool_entries, spool_entry

__all__ = [
    "CORPUS",
    "IN_CI",
    "cli",
    "commitment_request",
    "corpus_source",
    "crc32",
    "dataset_bytes",
    "dcmtk",
    "dcmtk_env",
    "encode_dataset",
    "free_port",
    "hostile_dataset",
    "make_instance",
    "make_segmentation",
    "need",
    "objects_under",
    "port_open",
    "pynetdicom_send",
    "raw_part10",
    "run",
    "sha256",
    "split_part10",
    "spool_entries",
    "spool_entry",
    "task_event_listener",
    "unique_copy",
    "wait_for",
]
