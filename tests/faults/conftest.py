from typing import Any

from tests.processes import pipeline

__all__ = ["pipeline"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.faults.test_faults import RESULTS

    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("fault scenarios: every instance that got 0x0000 must be archived (lost = 0)")
    write(f"{'scenario':58} {'sent':>5} {'acked':>6} {'archived':>9} {'quarantined':>12} "
          f"{'lost':>5}")
    for row in RESULTS:
        write(f"{row[0]:58} {row[1]:5d} {row[2]:6d} {row[3]:9d} {row[4]:12d} {row[5]:5d}")
