"""The benchmark's verdict on its targets, from the rows of one run."""

from __future__ import annotations

from bench.__main__ import Row
from bench.report import DCMTK, DISK_ALONE, DURABLE_DCMTK, OURS, backlog_name, markdown, targets

RATE = "(instances/s)"


def _rows() -> list[Row]:
    rows = [Row(f"{load} {RATE}", server, value, "inst/s")
            for load, dcmtk, durable, ours in (
                ("512 KB, 1 association", 678.0, 255.0, 283.0),
                ("512 KB, 4 associations", 893.0, 406.0, 400.0),
                ("512 KB, 16 associations", 900.0, 450.0, 495.0),
                ("40 KB, 1 association", 1848.0, 697.0, 451.0),
                ("40 KB, 4 associations", 2500.0, 1000.0, 1000.0))
            for server, value in ((DCMTK, dcmtk), (DURABLE_DCMTK, durable), (OURS, ours))]
    return [
        *rows,
        Row(f"512 KB, 4 associations {RATE}", f"{OURS}, fast path off", 900.0, "inst/s"),
        Row(f"512 KB, 1 association {RATE}", backlog_name(20000), 260.0, "inst/s",
            of_empty=0.93),
        Row(f"512 KB, 4 associations {RATE}", backlog_name(20000), 300.0, "inst/s",
            of_empty=0.78),
        Row("C-STORE round trip p99 (ms, pynetdicom sender)", OURS, 6.9, "ms", 0.91),
        Row("end to end, directory, 1 worker process(es)", OURS, 216.8, "inst/s",
            of_receive=0.52),
        Row("end to end, directory, 4 worker process(es)", OURS, 290.8, "inst/s",
            of_receive=0.94),
        Row("end to end, s3, 4 worker process(es)", OURS, 79.7, "inst/s", of_receive=0.26),
        Row("receiver peak RSS, 1024 MB instance", OURS, 71.3, "MB"),
    ]


def test_each_target_is_judged_against_durable_dcmtk_in_the_same_run() -> None:
    assert targets(_rows()) == [
        ("512 KB, 1 association: at least 1.1x durable DCMTK",
         "1.11x (plain DCMTK: 2.66x)", True),
        ("512 KB, 4 associations: at least 1.1x durable DCMTK",
         "0.99x (plain DCMTK: 2.20x)", False),
        ("512 KB, 16 associations: at least 1.0x durable DCMTK",
         "1.10x (plain DCMTK: 2.00x)", True),
        ("40 KB, 1 association: at least 1.0x durable DCMTK",
         "0.65x (plain DCMTK: 2.65x)", False),
        ("40 KB, 4 associations: at least 1.0x durable DCMTK",
         "1.00x (plain DCMTK: 2.50x)", True),
        ("512 KB, 1 association, a backlog waiting in the spool: at least 0.9x an empty "
         "spool", "0.93x (20,000 entries waiting)", True),
        ("512 KB, 4 associations, a backlog waiting in the spool: at least 0.9x an empty "
         "spool", "0.78x (20,000 entries waiting)", False),
        ("end to end (directory): at least 0.9x the receive rate",
         "0.94x (4 worker process(es))", True),
        ("C-STORE ack latency p99: at most 2x DCMTK's", "0.91x (6.9 ms)", True),
        ("receiver RSS while a 1 GB instance arrives: under 150 MB", "71.3 MB", True),
    ]


def test_what_a_run_did_not_measure_is_said() -> None:
    receive_only = [r for r in _rows() if "end to end" not in r.test and "RSS" not in r.test
                    and r.of_empty is None]
    verdicts = {target: met for target, _, met in targets(receive_only)}
    assert verdicts["end to end (directory): at least 0.9x the receive rate"] is None
    assert verdicts["receiver RSS while a 1 GB instance arrives: under 150 MB"] is None
    assert verdicts["512 KB, 1 association, a backlog waiting in the spool: at least 0.9x an "
                    "empty spool"] is None
    table = markdown(receive_only, "test machine")
    assert ("| 40 KB, 1 association: at least 1.0x durable DCMTK | 0.65x (plain DCMTK: 2.65x) "
            "| **not met** |") in table
    assert "| end to end (directory): at least 0.9x the receive rate |  | not measured |" in table


def test_without_durable_dcmtk_the_throughput_targets_are_not_judged() -> None:
    """A machine without a C compiler has no durable DCMTK row: nothing to judge against."""
    rows = [r for r in _rows() if r.server != DURABLE_DCMTK]
    found = {target: (value, met) for target, value, met in targets(rows)}
    assert found["512 KB, 16 associations: at least 1.0x durable DCMTK"] == (
        "no durable DCMTK row in this run", None)


def test_the_throughput_targets_say_what_the_disk_alone_made() -> None:
    """The disk-alone loop bounds any receiver that fsyncs before it answers: the verdict
    names it, against durable DCMTK like the target, so a run says by itself whether its
    machine can meet a target at all."""
    rows = [*_rows(),
            Row(f"512 KB, 1 association {RATE}", DISK_ALONE, 425.0, "files/s", 0.63),
            Row(f"512 KB, 16 associations {RATE}", DISK_ALONE, 630.0, "files/s", 0.70),
            Row(f"40 KB, 4 associations {RATE}", DISK_ALONE, 1500.0, "files/s", 0.60)]
    found = {target: value for target, value, _ in targets(rows)}
    assert found["512 KB, 1 association: at least 1.1x durable DCMTK"] == (
        "1.11x (the disk alone, no DICOM: 1.67x; plain DCMTK: 2.66x)")
    assert found["512 KB, 16 associations: at least 1.0x durable DCMTK"] == (
        "1.10x (the disk alone, no DICOM: 1.40x; plain DCMTK: 2.00x)")
    assert found["40 KB, 4 associations: at least 1.0x durable DCMTK"] == (
        "1.00x (the disk alone, no DICOM: 1.50x; plain DCMTK: 2.50x)")
    assert found["512 KB, 4 associations: at least 1.1x durable DCMTK"] == (
        "0.99x (plain DCMTK: 2.20x)")  # no disk-alone row for it
