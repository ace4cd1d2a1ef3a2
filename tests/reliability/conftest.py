"""Reliability suite fixtures: the tally (faults injected/survived, bad inputs, rows lost) and
the summary printed at the end of the test session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from rel_helpers import TALLY, Tally


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rel_rep_{rep.when}", rep)


@pytest.fixture(autouse=True)
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    """The suite's counters; what this test injected counts as survived if it passed."""
    TALLY.current.clear()
    yield TALLY
    rep = getattr(request.node, "rel_rep_call", None)
    TALLY.end_test(bool(rep is not None and rep.passed))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    t = TALLY.totals
    if not (t["tests_passed"] or t["tests_failed"]):
        return
    terminalreporter.section("brandmon reliability summary")
    for line in TALLY.lines():
        terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker prints no summary: it hands its tally to the controller instead."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["reliability_tally"] = TALLY.dump()
