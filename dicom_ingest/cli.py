"""The ``dicom-ingest`` command line. Flags override the INGEST_* environment variables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ingest import __version__, logs
from ingest.embedded import embedded_url
from ingest.settings import Settings, SettingsError, from_env

DESCRIPTION = """\
Queue-backed DICOM ingest. A Storage SCP makes every instance durable in a spool and
answers at once; Celery workers on Redis validate it and archive it to S3 or a directory
as {StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm.

Settings come from INGEST_* environment variables (see the README); flags override them."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spool",
        dest="spool_dir",
        type=Path,
        help="spool root (INGEST_SPOOL_DIR, default ./data/spool)",
    )
    parser.add_argument("--redis", dest="redis_url", help="broker URL (INGEST_REDIS_URL)")
    parser.add_argument(
        "--archive",
        dest="archive_url",
        help="s3://BUCKET[/PREFIX], "
        "file:///PATH or a path (INGEST_ARCHIVE_URL, default ./data/archive)",
    )


def _catalog(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--catalog", dest="catalog_url",
        help="postgresql://USER:PASS@HOST:PORT/DB or sqlite:///PATH (INGEST_CATALOG_URL, "
        "default ./data/catalog.sqlite)")


def _count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{raw} is below 0")
    return value


def _scp(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (INGEST_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="listen port (INGEST_PORT, default 11112)")
    parser.add_argument(
        "--processes", dest="receiver_processes", type=_count,
        help="receiver processes sharing the port (INGEST_RECEIVER_PROCESSES; default 0: one "
        "per core, at most 4)")
    parser.add_argument("--ae-title", help="our AE title (INGEST_AE_TITLE, default DICOM-INGEST)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-ingest",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dicom-ingest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="run the whole pipeline here: embedded Redis (unless "
        "INGEST_REDIS_URL is set), receiver and workers; Ctrl-C stops it",
    )
    _scp(up)
    _common(up)
    up.add_argument(
        "--workers",
        dest="worker_concurrency",
        type=int,
        help="worker processes (INGEST_WORKER_CONCURRENCY, default: two per core)",
    )
    _catalog(up)
    up.add_argument(
        "--data",
        type=Path,
        default=Path("./data"),
        help="where the embedded Redis and the default catalog keep their data (default ./data)",
    )
    up.add_argument("--flower", action="store_true", help="also run Flower on 127.0.0.1 "
                    "(INGEST_FLOWER_PORT, default 5555; login INGEST_FLOWER_BASIC_AUTH, or one "
                    "generated and printed)")

    flower = sub.add_parser("flower", help="run Flower, Celery's dashboard, on the broker; "
                            "basic auth from INGEST_FLOWER_BASIC_AUTH (user:password)")
    _common(flower)
    flower.add_argument("--address", default="0.0.0.0", help="listen address")

    receiver = sub.add_parser("receiver", help="run the Storage SCP (C-STORE, C-ECHO)")
    _scp(receiver)
    _common(receiver)
    _catalog(receiver)  # Storage Commitment and the study stabiliser read it

    worker = sub.add_parser("worker", help="run a Celery worker that archives spool entries")
    _common(worker)
    _catalog(worker)
    worker.add_argument(
        "--concurrency",
        dest="worker_concurrency",
        type=int,
        help="worker processes (INGEST_WORKER_CONCURRENCY, default: two per core)",
    )

    sweep = sub.add_parser(
        "sweep",
        help="one reconciliation pass: re-enqueue spool entries "
        "no task finished, remove stale temporary files",
    )
    _common(sweep)
    sweep.add_argument(
        "--age",
        dest="sweep_age",
        type=float,
        help="seconds after which an entry is re-enqueued (INGEST_SWEEP_AGE)",
    )

    echo = sub.add_parser("echo", help="C-ECHO a receiver (a health check): exit 0 when it "
                          "answers Success")
    echo.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    echo.add_argument("--port", type=int, help="default INGEST_PORT or 11112")
    echo.add_argument("--ae-title", help="called AE title (default INGEST_AE_TITLE)")
    echo.add_argument("--calling", default="INGEST-ECHO", help="our calling AE title (default "
                      "INGEST-ECHO: add it to INGEST_ALLOWED_CALLING_AETS if you set that)")

    status = sub.add_parser("status", help="spool depth, oldest entry, queue length, "
                            "quarantine count, workers seen")
    _common(status)
    status.add_argument("--json", action="store_true", help="print JSON")

    quarantine = sub.add_parser("quarantine", help="list quarantined objects or replay them")
    qsub = quarantine.add_subparsers(dest="action", required=True, metavar="ACTION")
    qlist = qsub.add_parser("list", help="id, reason, SOP Instance UID, sender, time")
    _common(qlist)
    qlist.add_argument("--json", action="store_true", help="print JSON lines")
    qreplay = qsub.add_parser("replay", help="send quarantined objects through validation "
                              "again (after a fix or a changed setting)")
    _common(qreplay)
    qreplay.add_argument("ids", nargs="*", metavar="ID", help="receipt ids to replay")
    qreplay.add_argument("--all", action="store_true", help="replay every quarantined object")
    _catalog(qreplay)

    find = sub.add_parser("find", help="list the catalog's archived and quarantined "
                          "instances, oldest first")
    find.add_argument("--study", help="Study Instance UID")
    find.add_argument("--series", help="Series Instance UID")
    find.add_argument("--sop", help="SOP Instance UID")
    find.add_argument("--calling-aet", help="the sender's AE title")
    find.add_argument("--since", type=since, help="received at or after: an ISO date or "
                      "date and time (UTC unless it says otherwise), or a duration ago such as "
                      "90s, 30m, 2h, 7d")
    find.add_argument("--limit", type=_count, help="at most this many rows")
    find.add_argument("--json", action="store_true", help="print JSON lines")
    _catalog(find)

    studies = sub.add_parser("studies", help="list the studies last received: open or stable, "
                             "revision, counts, and whether their event was delivered")
    studies.add_argument("--limit", type=_count, default=50, help="at most this many (50)")
    studies.add_argument("--json", action="store_true", help="print JSON lines")
    _catalog(studies)

    catalog = sub.add_parser("catalog", help="maintain the catalog")
    csub = catalog.add_subparsers(dest="action", required=True, metavar="ACTION")
    rebuild = csub.add_parser("rebuild", help="rebuild the catalog from the archive's keys "
                              "and object metadata (catches up a catalog that was lost or is "
                              "behind)")
    _common(rebuild)
    _catalog(rebuild)
    return parser


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def since(raw: str, now: float | None = None) -> float:
    """``--since``: seconds since the epoch, from an ISO date (time) or a duration ago."""
    import datetime
    import re
    import time

    text = raw.strip()
    duration = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text.lower())
    if duration:
        ago = float(duration.group(1)) * _DURATION[duration.group(2)]
        return (time.time() if now is None else now) - ago
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{raw!r}: expected an ISO date or time (2025-03-01, 2025-03-01T08:00) or a "
            "duration (90s, 30m, 2h, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _settings(args: argparse.Namespace) -> Settings:
    names = (
        "host",
        "port",
        "ae_title",
        "spool_dir",
        "redis_url",
        "archive_url",
        "worker_concurrency",
        "receiver_processes",
        "sweep_age",
        "catalog_url",
    )
    overrides: dict[str, Any] = {n: getattr(args, n, None) for n in names}
    if overrides.get("redis_url"):
        overrides["redis_url_explicit"] = True
    settings = from_env(**overrides)
    if not settings.redis_url_explicit and args.command not in ("up", "receiver", "worker"):
        # next to a running `dicom-ingest up`: its embedded Redis, not the default one
        running = embedded_url(Path(getattr(args, "data", None) or "./data") / "redis")
        if running:
            settings = settings.replace(redis_url=running)
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        print(f"dicom-ingest: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)
    command = args.command
    if command == "receiver":
        from receiver import scp

        return scp.run(settings)
    if command == "worker":
        from workers import app

        return app.run(settings)
    if command == "up":
        from dicom_ingest import up

        return up.run(settings, args.data, flower=args.flower)
    if command == "flower":
        from dicom_ingest import flower

        return flower.run(settings, args.address)
    if command == "sweep":
        from dicom_ingest import tools

        return tools.sweep(settings)
    if command == "echo":
        from dicom_ingest import tools

        return tools.echo(settings, args.host, args.calling)
    if command == "status":
        from dicom_ingest import tools

        return tools.status(settings, as_json=args.json)
    if command == "quarantine":
        from dicom_ingest import tools

        if args.action == "list":
            return tools.quarantine_list(settings, as_json=args.json)
        if not args.ids and not args.all:
            print("dicom-ingest: name receipt ids to replay, or --all", file=sys.stderr)
            return 2
        return tools.quarantine_replay(settings, args.ids, replay_all=args.all)
    if command == "find":
        from dicom_ingest import tools

        return tools.find(settings, as_json=args.json, limit=args.limit, study=args.study,
                          series=args.series, sop=args.sop, calling_aet=args.calling_aet,
                          since=args.since)
    if command == "studies":
        from dicom_ingest import tools

        return tools.studies(settings, as_json=args.json, limit=args.limit)
    if command == "catalog":
        from dicom_ingest import tools

        return tools.catalog_rebuild(settings)
    raise AssertionError(command)


if __name__ == "__main__":
    sys.exit(main())
