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

import os
import shlex
import sys
import threading
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
    if config.getoption("--lab") == "run" and os.environ.get("ISTHMUS_LAB_PARALLEL", "1") != "0":
        bridge.start()
    for n, item in enumerate(items):
        if item.get_closest_marker("lab"):
            stand_in = LabItem.from_parent(item.parent, name=item.name, bridge=bridge)
            stand_in.own_markers.extend(item.iter_markers())
            stand_in._nodeid = item.nodeid
            items[n] = stand_in


BRIDGE = pytest.StashKey["LabBridge"]()


class LabBridge:
    """Runs the selected lab tests in one guest boot and keeps their outcomes by node id.

    The guest starts in a background thread as soon as collection ends, so it runs while the host
    tiers run (their tests mostly wait on daemons and timers). Its console is buffered until the
    first lab stand-in runs, then shown, then streamed live. ISTHMUS_LAB_PARALLEL=0 boots it only
    when the first lab test runs.
    """

    def __init__(self, config: pytest.Config, nodeids: list[str]):
        self.config = config
        self.nodeids = nodeids
        self.outcomes: dict[str, dict] | None = None
        self.failure: str | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._buffer: list[str] = []
        self._live = False
        self._result = None
        self._error: str | None = None

    def _args(self) -> list[str]:
        args = ["python3", "-m", "pytest", "-p", "tests.lab.guest_report", "-p", "no:cacheprovider",
                "-o", "addopts=", "-q", "-rfEs", "--tb=short",
                "--color=" + ("yes" if self.config.get_terminal_writer().hasmarkup else "no"), *self.nodeids]
        verbosity = self.config.getoption("verbose")
        if verbosity > 0:
            args.append("-" + "v" * verbosity)
        return args

    def _show(self, line: str) -> None:
        with self._lock:
            if self._live:
                self.config.get_terminal_writer().line(f"lab| {line}")
            else:
                self._buffer.append(line)

    def _boot(self) -> None:
        sys.path.insert(0, str(TOP))
        from image.lab import runner

        try:
            self._result = runner.run(shlex.join(self._args()), timeout=self.config.getoption("--lab-timeout"),
                                      output=self._show, log=self._show)
        except runner.LabError as e:
            self._error = f"the lab could not start: {e}"
        except Exception as e:  # reported through the stand-ins, never lost in a thread
            self._error = f"the lab runner failed: {e!r}"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._boot, name="lab-guest", daemon=True)
            self._thread.start()

    def ensure_ran(self) -> None:
        if self.outcomes is not None:
            return
        capman = self.config.pluginmanager.getplugin("capturemanager")
        tw = self.config.get_terminal_writer()
        self.outcomes = {}
        with capman.global_and_fixture_disabled():
            tw.line()
            tw.sep("-", f"lab: the guest runs {len(self.nodeids)} test(s)")
            with self._lock:
                for line in self._buffer:
                    tw.line(f"lab| {line}")
                self._buffer.clear()
                self._live = True
            self.start()
            assert self._thread is not None
            self._thread.join()
            res = self._result
            if res is not None:
                tw.sep("-", f"lab: guest finished in {res.seconds:.0f} s (status {res.status})")
        if res is None:
            self.failure = self._error or "the lab runner returned nothing"
            return
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
