"""The benchmark's outputs: a markdown table and a PNG chart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

OURS = "dicom-ingest"
#: DCMTK's storescp made to fsync each file and its directory before it answers
DURABLE_DCMTK = "DCMTK storescp, fsync before answer"
#: the loop that makes 512 KB files durable, with no network and no DICOM: about the most
#: that a receiver which fsyncs before it answers can take in on the same machine (over one
#: association the next instance comes only after the answer, so the disk's work for one
#: instance cannot overlap the next one's)
DISK_ALONE = "the disk alone: write, fsync, rename, fsync dir"


def targets(rows: list[Any]) -> list[tuple[str, str, bool | None]]:
    """Issue 5's targets against the rows of one run: (target, this run's value, met; None
    where the run did not measure it)."""

    def row(test: str, server: str = OURS) -> Any:
        return next((r for r in rows if r.server == server and r.test == test), None)

    found: list[tuple[str, str, bool | None]] = []
    for label, test, least in (
            ("512 KB, one association: at least 0.8x DCMTK",
             "512 KB, 1 association (instances/s)", 0.8),
            ("512 KB, four associations: at least 1.0x DCMTK",
             "512 KB, 4 associations (instances/s)", 1.0)):
        r = row(test)
        value = f"{r.ratio:.2f}x" if r and r.ratio is not None else ""
        durable, disk = row(test, DURABLE_DCMTK), row(test, DISK_ALONE)
        context = []
        if disk is not None and disk.ratio is not None:
            context.append(f"the disk alone, no DICOM: {disk.ratio:.2f}x")
        if r is not None and durable is not None and durable.ratio is not None:
            context.append(f"DCMTK fsyncing before its answer: {durable.ratio:.2f}x; ours "
                           f"{r.value / durable.value:.2f}x of it")
        if value and context:
            value += f" ({'; '.join(context)})"
        found.append((label, value,
                      r.ratio >= least if r and r.ratio is not None else None))
    e2e = [r for r in rows if r.test.startswith("end to end, directory,")
           and getattr(r, "of_receive", None) is not None]
    most = max(e2e, key=lambda r: int(r.test.split(", ")[2].split()[0]), default=None)
    found.append(("end to end (directory): at least 0.9x the receive rate",
                  f"{most.of_receive:.2f}x ({most.test.split(', ')[2]})" if most else "",
                  most.of_receive >= 0.9 if most else None))
    p99 = row("C-STORE round trip p99 (ms, pynetdicom sender)")
    found.append(("C-STORE ack latency p99: at most 2x DCMTK's",
                  f"{p99.ratio:.2f}x ({p99.value:.1f} ms)" if p99 and p99.ratio else "",
                  p99.ratio <= 2.0 if p99 and p99.ratio else None))
    rss = next((r for r in rows if r.server == OURS and r.test.startswith("receiver peak RSS")),
               None)
    found.append(("receiver RSS while a 1 GB instance arrives: under 150 MB",
                  f"{rss.value:.1f} MB" if rss else "", rss.value < 150 if rss else None))
    return found


def markdown(rows: list[Any], machine: str) -> str:
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine}.",
             "", "| measurement | receiver | value | ours / DCMTK | note |",
             "|---|---|---:|---:|---|"]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        lines.append(f"| {r.test} | {r.server} | {r.value:.1f} {r.unit} | {ratio} | {r.note} |")
    lines += ["", "Targets of issue 5 in this run:", "", "| target | this run | |",
              "|---|---|---|"]
    for target, value, met in targets(rows):
        lines.append(f"| {target} | {value} | {verdict(met, '**not met**')} |")
    return "\n".join(lines) + "\n"


def verdict(met: bool | None, not_met: str = "NOT MET") -> str:
    """A target's verdict in words: met, ``not_met``, or not measured (``met`` None)."""
    return "not measured" if met is None else "met" if met else not_met


def chart(rows: list[Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tests = [t for t in dict.fromkeys(r.test for r in rows) if "instances/s" in t]
    if not tests:
        return False  # a run without the receive part: nothing to draw
    servers = list(dict.fromkeys(r.server for r in rows if r.test in tests))
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(1, len(servers))
    for i, server in enumerate(servers):
        values = [next((r.value for r in rows if r.test == t and r.server == server), 0)
                  for t in tests]
        ax.bar([x + i * width for x in range(len(tests))], values, width, label=server)
    ax.set_xticks([x + width * (len(servers) - 1) / 2 for x in range(len(tests))])
    ax.set_xticklabels([t.replace(" (instances/s)", "") for t in tests])
    ax.set_ylabel("instances per second")
    ax.set_title("C-STORE receive throughput (storescu senders, loopback)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(rows: list[Any], out: Path, machine: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "RESULTS.md"
    md.write_text(markdown(rows, machine))
    written = [md]
    png = out / "throughput.png"
    if chart(rows, png):
        written.append(png)
    return written
