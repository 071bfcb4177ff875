"""The benchmark's outputs: a markdown table and a PNG chart."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OURS = "dicom-ingest"
DCMTK = "DCMTK storescp"
#: DCMTK's storescp made to fsync each file and its directory before it answers
DURABLE_DCMTK = "DCMTK storescp, fsync before answer"
#: the loop that makes files of a load's size durable, with no network and no DICOM: about
#: the most that a receiver which fsyncs before it answers can take in on the same machine
#: (over one association the next instance comes only after the answer, so the disk's work
#: for one instance cannot overlap the next one's)
DISK_ALONE = "the disk alone: write, fsync, rename, fsync dir"


@dataclass(frozen=True)
class Load:
    """One load of the receive runs, and its target: at least ``least`` times the rate of
    :data:`DURABLE_DCMTK` under the same load in the same run."""

    kb: int  # instance size
    associations: int  # parallel ones
    least: float

    @property
    def label(self) -> str:
        plural = "s" if self.associations > 1 else ""
        return f"{self.kb} KB, {self.associations} association{plural}"


#: every receiver takes each of these in every round
LOADS = (Load(512, 1, 1.1), Load(512, 4, 1.1), Load(512, 16, 1.0), Load(40, 1, 1.0),
         Load(40, 4, 1.0))
#: the loads ours also takes with a backlog waiting in its spool (``--backlog``)
BACKLOG_LOADS = LOADS[:2]
#: the backlog target: at least this share of the rate with an empty spool, same rounds
BACKLOG_LEAST = 0.9
TARGETS_TITLE = "Targets in this run (throughput: ours against durable DCMTK, the same run)"


def backlog_name(entries: int) -> str:
    """The receiver column of ours with ``entries`` waiting in its spool."""
    return f"{OURS}, {entries:,} entries waiting"


def targets(rows: list[Any]) -> list[tuple[str, str, bool | None]]:
    """The targets against the rows of one run: (target, this run's value, met; None where
    the run did not measure it). Throughput is judged against durable DCMTK in the same run,
    and the value names what the disk alone made (no DICOM, the same fsyncs): a bound for
    any receiver that fsyncs before it answers."""

    def row(test: str, server: str = OURS) -> Any:
        return next((r for r in rows if r.server == server and r.test == test), None)

    found: list[tuple[str, str, bool | None]] = []
    for load in LOADS:
        test = f"{load.label} (instances/s)"
        ours, durable = row(test), row(test, DURABLE_DCMTK)
        value, met = "", None
        if ours is not None and durable is not None:
            times = ours.value / durable.value
            value, met = f"{times:.2f}x", times >= load.least
            context = [f"{name}: {r.value / durable.value:.2f}x" for name, r in (
                ("the disk alone, no DICOM", row(test, DISK_ALONE)),
                ("plain DCMTK", row(test, DCMTK))) if r is not None]
            if context:
                value += f" ({'; '.join(context)})"
        elif ours is not None:
            value = "no durable DCMTK row in this run"
        found.append((f"{load.label}: at least {load.least:.1f}x durable DCMTK", value, met))
    for load in BACKLOG_LOADS:
        waiting = next((r for r in rows if r.test == f"{load.label} (instances/s)"
                        and getattr(r, "of_empty", None) is not None), None)
        found.append((f"{load.label}, a backlog waiting in the spool: at least "
                      f"{BACKLOG_LEAST:.1f}x an empty spool",
                      f"{waiting.of_empty:.2f}x ({waiting.server.removeprefix(OURS + ', ')})"
                      if waiting else "",
                      waiting.of_empty >= BACKLOG_LEAST if waiting else None))
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
    lines += ["", TARGETS_TITLE + ":", "", "| target | this run | |",
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
