"""The control socket is root-only: a real non-root user (nobody) is refused — by the 0700 run
directory and, should that directory be opened up, by the socket's own 0600 mode — and the CLI
says so with exit status 4. Needs root (to create the server as root and run clients as nobody)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from appliance.control import ControlClient
from tests.unit.control_util import ServerThread

NOBODY = 65534
TOP = Path(__file__).resolve().parents[2]
# The interpreter itself (the venv's python is a symlink into a checkout nobody may be unable to
# traverse: a clone under /root is mode 0700).
PYTHON = os.path.realpath(sys.executable)
# What the client side needs, copied by the `client_tree` fixture into a world-readable folder.
_SKIP = {"pip", "setuptools", "_distutils_hack", "pygments", "hypothesis", "_pytest", "pytest",
         "exabgp", "__pycache__"}


async def status(params):
    return {"name": "perm-test"}


@pytest.fixture(scope="module")
def client_tree():
    """A copy of the project's packages and the venv's site-packages that `nobody` can read, so the
    refusals below come from the control socket's modes and never from where the clone lives."""
    d = Path(tempfile.mkdtemp(prefix="isthmus-perm-client-"))
    os.chmod(d, 0o755)
    src = d / "src"
    for pkg in ("appliance", "bgp"):
        shutil.copytree(TOP / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    shutil.copytree(site, d / "site", ignore=lambda folder, names: [
        n for n in names if n in _SKIP or n.startswith("__editable__") or n.endswith(".pth")])
    for path in d.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    yield f"{src}:{d / 'site'}"
    shutil.rmtree(d)


def as_nobody(pythonpath: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *argv], capture_output=True, text=True, timeout=60, user=NOBODY,
                          group=NOBODY, extra_groups=[], cwd="/",
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath})


CLIENT = """
import sys
from appliance.control import ControlClient, ControlPermissionError
try:
    print(ControlClient(sys.argv[1]).call("status"))
except ControlPermissionError as exc:
    print("denied:", exc)
"""


@pytest.fixture
def open_parent():
    """A parent directory nobody may traverse (pytest's tmp_path is root-only)."""
    if os.geteuid() != 0:
        pytest.fail("host tier: run as root")
    d = Path(tempfile.mkdtemp(prefix="isthmus-perm-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def test_nobody_is_refused(open_parent, client_tree):
    run = open_parent / "run"
    with ServerThread(run, {"status": status}) as srv:
        assert ControlClient(run).call("status") == {"name": "perm-test"}  # root gets in

        # 1. the run directory (0700) stops nobody
        r = as_nobody(client_tree, "-c", CLIENT, str(run))
        assert r.stdout.startswith("denied: permission denied on ") and "root-only" in r.stdout, r.stderr
        r = as_nobody(client_tree, "-m", "appliance.cli", "--run-dir", str(run), "status")
        assert r.returncode == 4, (r.stdout, r.stderr)
        assert "permission denied" in r.stderr and "run the command as root" in r.stderr
        r = as_nobody(client_tree, "-m", "appliance.cli", "--run-dir", str(run), "status", "--json")
        assert r.returncode == 4 and json.loads(r.stdout)["error"]["code"] == "permission_denied"
        r = as_nobody(client_tree, "-m", "appliance.cli", "--run-dir", str(run), "events")
        assert r.returncode == 4

        # 2. with the directory opened up, the socket's own 0600 still stops nobody
        os.chmod(run, 0o755)
        r = as_nobody(client_tree, "-m", "appliance.cli", "--run-dir", str(run), "status")
        assert r.returncode == 4, (r.stdout, r.stderr)

        # 3. with the socket itself opened, the client reaches the daemon, and the daemon refuses
        #    it by its credentials (no role groups: root only, appliance/access.py): the refusals
        #    above were the modes' doing, and the daemon's own check stands behind them
        os.chmod(srv.path, 0o666)
        r = as_nobody(client_tree, "-c", CLIENT, str(run))
        assert "forbidden" in r.stderr and "user nobody (uid 65534)" in r.stderr, (r.stdout, r.stderr)
        r = as_nobody(client_tree, "-m", "appliance.cli", "--run-dir", str(run), "version")
        assert "not reachable (permission denied: user nobody" in r.stdout, (r.stdout, r.stderr)
