"""The benchmark's outputs: a markdown table and a PNG chart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def markdown(rows: list[Any], machine: str) -> str:
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine}.",
             "", "| measurement | receiver | value | ours / DCMTK | note |",
             "|---|---|---:|---:|---|"]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        lines.append(f"| {r.test} | {r.server} | {r.value:.1f} {r.unit} | {ratio} | {r.note} |")
    return "\n".join(lines) + "\n"


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
