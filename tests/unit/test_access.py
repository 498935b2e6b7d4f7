"""appliance/access.py: roles from credentials, and the audit line (no sockets: see
tests/host/test_control_roles.py for real users on a real socket)."""

from __future__ import annotations

import pytest

from appliance.access import (STATE_CHANGING, AccessPolicy, Peer, audit_line, authorize, policy_from_system,
                              role_of)
from appliance.control import ControlError

POLICY = AccessPolicy(read_gid=900, admin_gid=901)


def peer(uid=1000, gid=1000, groups=()):
    return Peer(pid=42, uid=uid, gid=gid, groups=frozenset({gid, *groups}))


def test_roles():
    assert role_of(peer(uid=0, gid=0), None) == "admin"          # root, with or without groups
    assert role_of(peer(uid=0, gid=0), POLICY) == "admin"
    assert role_of(peer(groups=[901]), POLICY) == "admin"
    assert role_of(peer(groups=[900, 901]), POLICY) == "admin"
    assert role_of(peer(groups=[900]), POLICY) == "read"
    assert role_of(peer(gid=900), POLICY) == "read"               # primary group counts
    assert role_of(peer(groups=[900]), None) is None               # no policy: root only
    assert role_of(peer(groups=[5]), POLICY) is None


@pytest.mark.parametrize("method", sorted(STATE_CHANGING) + ["some_future_method"])
def test_read_only_may_not_change_state(method):
    with pytest.raises(ControlError) as e:
        authorize(peer(groups=[900]), method, POLICY)
    assert e.value.code == "forbidden" and "isthmus-admin" in e.value.message
    assert authorize(peer(groups=[901]), method, POLICY) == "admin"


def test_read_only_reads_and_strangers_do_not():
    for m in ("status", "tunnels", "sas", "routes", "bgp", "version", "subscribe"):
        assert authorize(peer(groups=[900]), m, POLICY) == "read"
        with pytest.raises(ControlError, match="is in neither"):
            authorize(peer(), m, POLICY)


def test_down_message_names_the_cli_verb():
    with pytest.raises(ControlError, match="'down' changes state"):
        authorize(peer(groups=[900]), "terminate", POLICY)


def test_audit_line_fields_and_hostile_values():
    line = audit_line(peer(uid=0, gid=0), "admin", "terminate", {"tunnel": "to-b"}, "ok", when=0)
    assert line == "audit: when=1970-01-01T00:00:00.000Z user=root uid=0 pid=42 role=admin action=down tunnel=to-b outcome=ok"
    line = audit_line(peer(uid=0, gid=0), "admin", "terminate", {"tunnel": "x y\nuser=evil", "psk": "s3cret"}, "ok")
    assert "\n" not in line and "user=evil" not in line and "s3cret" not in line
    assert audit_line(peer(uid=4242424), None, "reload", {}, "refused:forbidden", when=0).split()[2:5] == [
        "user=4242424", "uid=4242424", "pid=42"]


def test_policy_from_system_is_none_without_the_groups():
    import grp
    names = {g.gr_name for g in grp.getgrall()}
    if {"isthmus-read", "isthmus-admin"} & names:
        assert policy_from_system() is not None
    else:
        assert policy_from_system() is None
