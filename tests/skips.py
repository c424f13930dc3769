"""A pytest plugin (loaded by tests/conftest.py): with CI=true, a skipped test fails with its reason,
unless it is marked `cuda` or `docker`, the only things a CI machine may lack. A suite must not go
green by skipping what matters (a missing browser, recording, model or package)."""

from __future__ import annotations

import os

import pytest

MAY_SKIP = {
    "cuda": "needs a CUDA GPU (or its absence); may skip on a machine without one, also with CI=true",
    "docker": "needs a Docker engine; may skip without one, also with CI=true",
}


def strict() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in MAY_SKIP.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    if not (report.skipped and strict()) or hasattr(report, "wasxfail"):
        return
    if any(item.get_closest_marker(name) for name in MAY_SKIP):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped with CI=true, where only CUDA or Docker tests may skip: {_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = (yield).get_result()
    if report.skipped and strict():  # a whole module skipped, e.g. by importorskip at its top
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped with CI=true: {_reason(report)}"


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")
