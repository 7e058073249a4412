"""A pytest plugin: the run fails if any test was skipped or xfailed for a reason nobody allowed.

A suite that silently skips (an import that failed, a missing model, a missing GPU where
one was expected) would report green while testing nothing. Every skip or xfail reason
must start with one of :data:`ALLOWED`; anything else turns the exit status into 1 and
lists the tests. Loaded by tests/conftest.py, so every run of the suite has it.
"""

from __future__ import annotations

import pytest

# Reasons a user would accept. Keep this list short and say why each is legitimate.
ALLOWED: tuple[str, ...] = (
    "needs CUDA:",  # GPU paths are exercised only on machines that have one (never in CI here)
)

_unexpected: list[tuple[str, str]] = []


def _reason(report) -> str:
    if hasattr(report, "wasxfail"):
        return f"xfail: {report.wasxfail}"
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2]).removeprefix("Skipped: ")
    return str(lr)


def pytest_runtest_logreport(report) -> None:
    if report.skipped or hasattr(report, "wasxfail"):
        reason = _reason(report)
        if not reason.startswith(ALLOWED):
            _unexpected.append((report.nodeid, reason))


def pytest_collectreport(report) -> None:
    # A module-level skip (importorskip, pytest.skip(allow_module_level=True)) is reported here.
    if report.skipped:
        reason = _reason(report)
        if not reason.startswith(ALLOWED):
            _unexpected.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter) -> None:
    if _unexpected:
        terminalreporter.section("unexpected skips (the run fails)", red=True)
        for nodeid, reason in _unexpected:
            terminalreporter.line(f"{nodeid}: {reason}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    if _unexpected and exitstatus in (0, 5):  # 5: nothing ran because everything skipped
        session.exitstatus = 1
