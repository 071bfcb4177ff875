from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.faults.harness import RESULTS, Row, table
from tests.processes import pipeline

__all__ = ["pipeline"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    """Keep each phase's report on the item: the ``row`` fixture reads the call's."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def row(request: pytest.FixtureRequest) -> Iterator[Row]:
    """This scenario's line in the table, in it from the start: counted and marked pass or
    FAIL when the test ends, whatever happened in it."""
    line = Row(request.node.name)
    RESULTS.append(line)
    try:
        yield line
    finally:
        try:
            line.tally()
        except Exception as exc:  # the archive cannot be listed: say so in the table
            line.fault += f" (not counted: {exc})"
        report = getattr(request.node, "report_call", None)
        line.result = ("pass" if report is not None and report.passed
                       else "skipped" if report is not None and report.skipped else "FAIL")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("fault scenarios: every instance that got 0x0000 must be archived (lost = 0)")
    for line in table():
        write(line)
