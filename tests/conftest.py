"""Test tiers and the lab bridge.

- tests/unit/: pure Python, no privileges.
- tests/host/: network namespaces on the host kernel (needs root); marked `host`.
- tests/lab/: need ESP and XFRM interfaces, which the host kernel lacks; marked `lab`.

On the host, every selected lab test is replaced by a stand-in item. The first stand-in to run
boots the lab guest once (image/lab/runner.py) and runs pytest inside it on exactly the selected
lab tests; each stand-in then reports its guest twin's outcome, so lab results are part of the
same pytest run, its summary and its exit status. Inside the guest (ISTHMUS_IN_LAB=1) lab tests
run as ordinary tests.

Options: `--lab=run` (default) or `--lab=skip` (skip lab tests, refused when CI=true),
`--lab-timeout=SECONDS`.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
IN_LAB = os.environ.get("ISTHMUS_IN_LAB") == "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("isthmus")
    g.addoption("--lab", choices=["run", "skip"], default=os.environ.get("ISTHMUS_LAB", "run"),
                help="run lab tests in the lab guest (default) or skip them")
    g.addoption("--lab-timeout", type=float, default=float(os.environ.get("ISTHMUS_LAB_TIMEOUT", "1800")),
                help="seconds before the lab guest is killed")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--lab") == "skip" and os.environ.get("CI") == "true" and not IN_LAB:
        raise pytest.UsageError("--lab=skip is refused in CI: lab tests are part of `make test`")


def _tier(item: pytest.Item) -> str | None:
    parts = Path(str(item.path)).resolve().relative_to(TOP).parts
    if len(parts) >= 2 and parts[0] == "tests":
        return parts[1]
    return None


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = _tier(item)
        if tier == "lab":
            item.add_marker(pytest.mark.lab)
        elif tier == "host":
            item.add_marker(pytest.mark.host)
    if IN_LAB:
        # Inside the guest only lab tests make sense.
        items[:] = [i for i in items if i.get_closest_marker("lab")]
        return
    lab_items = [i for i in items if i.get_closest_marker("lab")]
    if not lab_items:
        return
    bridge = LabBridge(config, [i.nodeid for i in lab_items])
    config.stash[BRIDGE] = bridge
    for n, item in enumerate(items):
        if item.get_closest_marker("lab"):
            stand_in = LabItem.from_parent(item.parent, name=item.name, bridge=bridge)
            stand_in.own_markers.extend(item.iter_markers())
            stand_in._nodeid = item.nodeid
            items[n] = stand_in


BRIDGE = pytest.StashKey["LabBridge"]()


class LabBridge:
    """Runs the selected lab tests in one guest boot and keeps their outcomes by node id."""

    def __init__(self, config: pytest.Config, nodeids: list[str]):
        self.config = config
        self.nodeids = nodeids
        self.outcomes: dict[str, dict] | None = None
        self.failure: str | None = None

    def ensure_ran(self) -> None:
        if self.outcomes is not None:
            return
        sys.path.insert(0, str(TOP))
        from image.lab import runner

        capman = self.config.pluginmanager.getplugin("capturemanager")
        tw = self.config.get_terminal_writer()
        self.outcomes = {}

        def show(line: str) -> None:
            tw.line(f"lab| {line}")

        args = ["python3", "-m", "pytest", "-p", "tests.lab.guest_report", "-p", "no:cacheprovider",
                "-o", "addopts=", "-q", "-rA", "--tb=short",
                "--color=" + ("yes" if self.config.get_terminal_writer().hasmarkup else "no"), *self.nodeids]
        verbosity = self.config.getoption("verbose")
        if verbosity > 0:
            args.append("-" + "v" * verbosity)
        with capman.global_and_fixture_disabled():
            tw.line()
            tw.sep("-", f"lab: booting the guest for {len(self.nodeids)} test(s)")
            try:
                res = runner.run(shlex.join(args), timeout=self.config.getoption("--lab-timeout"), output=show,
                                 log=show)
            except runner.LabError as e:
                self.failure = f"the lab could not start: {e}"
                tw.line(f"lab| {self.failure}", red=True)
                return
            tw.sep("-", f"lab: guest finished in {res.seconds:.0f} s (status {res.status})")
        for r in res.results:
            self._merge(r)
        if res.timed_out:
            self.failure = f"the lab guest was killed after {res.seconds:.0f} s (timeout)"
        elif res.status is None:
            self.failure = "the lab guest powered off without an exit status"
        if self.failure or not res.results:
            tail = "\n".join(res.console.splitlines()[-40:])
            self.failure = (self.failure or "the lab run reported no test results") + "\n--- guest console (tail) ---\n" + tail

    def _merge(self, r: dict) -> None:
        assert self.outcomes is not None
        cur = self.outcomes.setdefault(r["nodeid"], {"outcome": "passed", "longrepr": "", "duration": 0.0,
                                                      "sections": []})
        cur["duration"] += r.get("duration", 0.0)
        if r["outcome"] == "failed":
            cur["outcome"] = "failed"
            cur["longrepr"] += f"[{r['when']}] {r.get('longrepr', '')}\n"
        elif r["outcome"] == "skipped" and cur["outcome"] == "passed":
            cur["outcome"] = "skipped"
            cur["longrepr"] = r.get("longrepr", "")
        cur["sections"].extend(r.get("sections", []))


class LabFailure(Exception):
    pass


class LabItem(pytest.Item):
    """Host-side stand-in for a test that ran inside the lab guest."""

    def __init__(self, *, bridge: LabBridge, **kw):
        super().__init__(**kw)
        self.bridge = bridge

    def runtest(self) -> None:
        if self.config.getoption("--lab") == "skip":
            pytest.skip("lab tests skipped (--lab=skip)")
        self.bridge.ensure_ran()
        assert self.bridge.outcomes is not None
        got = self.bridge.outcomes.get(self.nodeid)
        if got is None:
            raise LabFailure(self.bridge.failure or "the guest did not report this test (not collected there?)")
        self.user_properties.append(("lab_duration", round(got["duration"], 3)))
        for name, text in got["sections"]:
            self.add_report_section("call", f"lab {name}", text)
        if got["outcome"] == "failed":
            raise LabFailure(got["longrepr"])
        if got["outcome"] == "skipped":
            pytest.skip(f"in the lab: {got['longrepr']}")

    def repr_failure(self, excinfo, style=None):  # type: ignore[override]
        if isinstance(excinfo.value, LabFailure):
            return f"(ran inside the lab guest)\n{excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"[lab] {self.name}"
