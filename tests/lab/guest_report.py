"""pytest plugin used inside the lab guest: one JSON line per test phase on $ISTHMUS_LAB_RESULTS
(the guest's ttyS2), read back by the host side of tests/conftest.py."""

from __future__ import annotations

import json
import os

import pytest

_out = None


def pytest_configure(config: pytest.Config) -> None:
    global _out
    path = os.environ.get("ISTHMUS_LAB_RESULTS")
    if path:
        _out = open(path, "w", buffering=1)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _out is None:
        return
    if report.when != "call" and report.outcome == "passed":
        return
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        longrepr = str(report.longrepr[2])
    else:
        longrepr = str(report.longrepr) if report.longrepr else ""
    rec = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
           "duration": report.duration, "longrepr": longrepr,
           "sections": [[n, t] for n, t in report.sections] if report.outcome == "failed" else []}
    _out.write(json.dumps(rec) + "\n")
    _out.flush()
