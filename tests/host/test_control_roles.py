"""Roles on the control socket (appliance/access.py), with real users and groups: the test creates
a read-only user, an admin user and a user with no role (useradd/groupadd, removed afterwards), runs
the real CLI as each of them against a real ControlServer, and reads the audit lines it logs.

The groups get names of their own (not isthmus-read/isthmus-admin), so no other daemon on this
machine sees role groups appear while the test runs. Needs root."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import tempfile
from pathlib import Path

import pytest

from appliance.access import AccessPolicy
from tests.host.test_control_permissions import PYTHON, client_tree  # noqa: F401 (fixture)
from tests.unit.control_util import ServerThread


@pytest.fixture
def accounts():
    if os.geteuid() != 0:
        pytest.fail("host tier: run as root")
    tag = secrets.token_hex(3)
    groups = {"read": f"isth-r-{tag}", "admin": f"isth-a-{tag}"}
    users = {"reader": (f"isth-rd-{tag}", groups["read"]), "admin": (f"isth-ad-{tag}", groups["admin"]),
             "stranger": (f"isth-no-{tag}", None)}
    made_groups, made_users = [], []
    try:
        for g in groups.values():
            subprocess.run(["groupadd", "--system", g], check=True)
            made_groups.append(g)
        for name, group in users.values():
            cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
            if group:
                cmd += ["--groups", group]
            subprocess.run([*cmd, name], check=True)
            made_users.append(name)
        import grp
        policy = AccessPolicy(read_gid=grp.getgrnam(groups["read"]).gr_gid,
                              admin_gid=grp.getgrnam(groups["admin"]).gr_gid)
        yield {k: v[0] for k, v in users.items()}, policy
    finally:
        for u in made_users:
            subprocess.run(["userdel", u], check=False)
        for g in made_groups:
            subprocess.run(["groupdel", g], check=False)


def cli_as(user: str, pythonpath: str, run: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI as `user` with the groups the group database gives it (as login would)."""
    import grp
    import pwd
    pw = pwd.getpwnam(user)
    extra = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    return subprocess.run([PYTHON, "-m", "appliance.cli", "--run-dir", str(run), *args], capture_output=True,
                          text=True, timeout=60, user=pw.pw_uid, group=pw.pw_gid, extra_groups=extra, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath})


def test_roles_and_audit(accounts, client_tree, caplog):  # noqa: F811
    names, policy = accounts
    calls: list[str] = []

    async def status(params):
        return {"name": "roles-test", "version": "0", "uptime": 1.0, "config": "/etc/isthmus/isthmus.yaml",
                "tunnels": {"configured": 1, "up": 1}, "sas": {"ike": 1, "child": 1}}

    async def terminate(params):
        calls.append(params["tunnel"])
        return {"tunnel": params["tunnel"], "state": "terminating", "message": "deleting"}

    parent = Path(tempfile.mkdtemp(prefix="isthmus-roles-"))
    os.chmod(parent, 0o755)
    run = parent / "run"
    caplog.set_level(logging.INFO, logger="isthmus.audit")
    try:
        with ServerThread(run, {"status": status, "terminate": terminate}, access=policy) as srv:
            assert oct(os.stat(srv.path).st_mode & 0o777) == "0o666"  # the daemon decides, not the modes

            # the read-only user reads ...
            r = cli_as(names["reader"], client_tree, run, "status", "--json")
            assert r.returncode == 0, (r.stdout, r.stderr)
            # ... and may not change state: a clear message, the handler never runs, an audit line
            r = cli_as(names["reader"], client_tree, run, "down", "to-b")
            assert r.returncode == 1, (r.stdout, r.stderr)
            assert f"'down' changes state and needs the group isthmus-admin; user {names['reader']}" in r.stderr
            assert calls == []
            refused = [m for m in caplog.messages if m.startswith("audit:") and "outcome=refused:forbidden" in m]
            assert len(refused) == 1, caplog.messages
            line = refused[0]
            assert f"user={names['reader']}" in line and "action=down" in line and "tunnel=to-b" in line
            assert "role=read" in line and line.startswith("audit: when=20") and "Z user=" in line

            # a user in neither group may not even read
            r = cli_as(names["stranger"], client_tree, run, "status")
            assert r.returncode == 1 and "is in neither" in r.stderr, (r.stdout, r.stderr)

            # the admin changes state, and that is audited with who, what and when
            r = cli_as(names["admin"], client_tree, run, "down", "to-b")
            assert r.returncode == 0, (r.stdout, r.stderr)
            assert calls == ["to-b"]
            ok = [m for m in caplog.messages if m.startswith("audit:") and "outcome=ok" in m]
            assert len(ok) == 1 and f"user={names['admin']}" in ok[0] and "role=admin" in ok[0], caplog.messages
            assert "action=down tunnel=to-b" in ok[0] and "when=" in ok[0] and "pid=" in ok[0]

            # reads are not audited
            assert not any("action=status" in m for m in caplog.messages)
    finally:
        import shutil
        shutil.rmtree(parent, ignore_errors=True)
