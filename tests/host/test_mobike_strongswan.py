"""MOBIKE interop with strongSwan 5.9.8 (issue 10 item 3, RFC 4555): our engine
(appliance/ikerunner.py with `follow_addresses`, the daemon's rtnetlink watch and route lookup,
appliance/mobility.py) initiates to strongSwan (responder, mobike=yes). Then our namespace gets a
new address and loses the old one: the IKE SA and its Child SA move there without a new IKE SA
(swanctl --list-sas: same unique id, same IKE and ESP SPIs, strongSwan's remote host is the new
address). With mobike=no on strongSwan, no update is sent: the IKE SA is made again from the new
address (the documented fallback).

IKE-level checks only (the host kernel has no ESP; tests/lab/test_mobike_lab.py moves traffic).
"""

from __future__ import annotations

import pytest

from tests.host.ikerunner_proc import EngineProc, tunnel_json
from tests.peers.fixtures import strongswan_factory  # noqa: F401
from tests.peers.strongswan import Child, Conn
from tests.peers.topology import pair_of_namespaces

PSK = "mobike-Secret-0123456789"
NEW = "192.0.2.11"


@pytest.fixture
def sides():
    with pair_of_namespaces("mob") as (a, b):
        # deleting the primary address keeps the secondary one (as cloud images set it)
        a.ns.run(["sysctl", "-qw", f"net.ipv4.conf.{a.ifname}.promote_secondaries=1"])
        yield a, b


def _ours(tmp_path, a, b) -> EngineProc:
    t = tunnel_json(a, b, "to-b", local_id="a.example.net", remote_id="b.example.net", psk=PSK.encode(),
                    mobike=True, dpd={"interval": 0, "timeout": 30, "action": "restart"})
    return EngineProc(tmp_path / "a", a, [t], extra={"follow_addresses": True})


def _swan(strongswan_factory, b, mobike: bool):
    sw = strongswan_factory(b, "sw")
    sw.load(Conn(local_addrs=[b.addr4], remote_addrs=["%any"], local_id="b.example.net",
                 remote_id="a.example.net", psk=PSK, mobike=mobike, dpd_delay=None, children=[Child()]))
    return sw


def _status(us: EngineProc) -> list[dict]:
    m = us.mark()
    us.send("status")
    return us.wait_event(lambda e: e["event"] == "status", 5, since=m)["detail"]


def _move(a) -> None:
    a.ns.run(["ip", "addr", "add", f"{NEW}/24", "dev", a.ifname])
    a.ns.run(["ip", "addr", "del", f"{a.addr4}/24", "dev", a.ifname])


def test_strongswan_responder_follows_our_move_without_a_new_ike_sa(tmp_path, sides, strongswan_factory):
    a, b = sides
    sw = _swan(strongswan_factory, b, mobike=True)
    with _ours(tmp_path, a, b) as us:
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        before = sw.wait_ike_up()
        (st,) = _status(us)
        assert st["mobike"] is True and st["local"][0] == a.addr4, st
        (child,) = before.children
        m = us.mark()
        _move(a)
        ch = us.wait_event(lambda e: e["event"] == "local_address_changed", 15, since=m, what="address change")
        assert (ch["address"], ch["previous"], ch["action"]) == (NEW, a.addr4, "update")
        moved = us.wait_event(lambda e: e["event"] == "IkeSaAddressesUpdated", 15, since=m, what="SA moved")
        assert moved["local"][0] == NEW and moved["remote"][0] == b.addr4
        after = sw.wait_for(lambda sas: next((s for s in sas if s.remote_host == NEW), None), 15,
                            "strongSwan's IKE SA at the new address")
        # the same IKE SA (unique id, SPIs): nothing was re-made
        assert len(sw.list_sas()) == 1
        assert (after.uniqueid, after.spi_i, after.spi_r) == (before.uniqueid, before.spi_i, before.spi_r)
        log = sw.log_path.read_text()
        assert "N(UPD_SA_ADDR)" in log and f"CHILD_SA c{{{child.uniqueid}}} state change: INSTALLED => UPDATING" in log
        # strongSwan on the host runs kernel-libipsec, which cannot update an SA in place: charon
        # then rekeys the Child SA itself ("queueing CHILD_REKEY task"). Any new pair on our side
        # is that rekey, answered by us: a successor of the old pair, never a new Child SA of ours.
        sw.wait_for(lambda sas: all(c.state == "INSTALLED" for c in sas[0].children), 15, "strongSwan's rekey")
        for inst in us.of("ChildSaInstalled", since=m):
            assert inst.get("replaces"), inst
        assert not us.of("IkeSaUp", since=m) and not us.of("IkeSaDown", since=m)
        (st,) = _status(us)
        assert st["local"][0] == NEW and st["mobike_moves"] == 1
        # the moved SA still works: a Child SA rekey from strongSwan reaches us at the new address
        sw.rekey(child="c")
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, since=m, what="rekeyed Child SA")
        assert sw.wait_ike_up().uniqueid == before.uniqueid


def test_without_mobike_on_strongswan_the_ike_sa_is_made_again_from_the_new_address(
        tmp_path, sides, strongswan_factory):
    a, b = sides
    sw = _swan(strongswan_factory, b, mobike=False)
    with _ours(tmp_path, a, b) as us:
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        before = sw.wait_ike_up()
        (st,) = _status(us)
        assert st["mobike"] is False
        m = us.mark()
        _move(a)
        ch = us.wait_event(lambda e: e["event"] == "local_address_changed", 15, since=m, what="address change")
        assert ch["action"] == "no-mobike"
        us.wait_event(lambda e: e["event"] == "IkeSaUp", 30, since=m, what="new IKE SA")
        after = sw.wait_for(lambda sas: next((s for s in sas if s.remote_host == NEW and s.state == "ESTABLISHED"),
                                             None), 15, "strongSwan's new IKE SA")
        assert after.uniqueid != before.uniqueid
        assert not us.of("IkeSaAddressesUpdated", since=m)


def test_strongswan_initiator_moves_and_our_responder_follows_after_its_return_routability_check(
        tmp_path, sides, strongswan_factory):
    """The other way round: strongSwan (initiator, mobike=yes) changes its address; charon's
    kernel-netlink sees it and sends UPDATE_SA_ADDRESSES; our responder moves the IKE SA, checks
    the new address with COOKIE2 (charon echoes it) and only then moves the Child SAs."""
    a, b = sides
    b.ns.run(["sysctl", "-qw", f"net.ipv4.conf.{b.ifname}.promote_secondaries=1"])
    sw = strongswan_factory(b, "sw")
    sw.load(Conn(remote_addrs=[a.addr4], local_id="b.example.net", remote_id="a.example.net", psk=PSK,
                 mobike=True, dpd_delay=None, children=[Child()]))
    t = tunnel_json(a, b, "to-b", local_id="a.example.net", remote_id="b.example.net", psk=PSK.encode(),
                    mobike=True, start=False, dpd={"interval": 0, "timeout": 30, "action": "clear"})
    with EngineProc(tmp_path / "a", a, [t]) as us:
        sw.initiate(child="c")
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        before = sw.wait_ike_up()
        m = us.mark()
        b_new = "192.0.2.12"
        b.ns.run(["ip", "addr", "add", f"{b_new}/24", "dev", b.ifname])
        b.ns.run(["ip", "addr", "del", f"{b.addr4}/24", "dev", b.ifname])
        moved = us.wait_event(lambda e: e["event"] == "IkeSaAddressesUpdated", 30, since=m, what="SA moved")
        assert moved["remote"][0] == b_new and moved["local"][0] == a.addr4
        after = sw.wait_for(lambda sas: next((s for s in sas if s.local_host == b_new), None), 15,
                            "strongSwan's IKE SA at its new address")
        assert (after.uniqueid, after.spi_i, after.spi_r) == (before.uniqueid, before.spi_i, before.spi_r)
        log = sw.log_path.read_text()
        assert "N(UPD_SA_ADDR)" in log
        # our return routability check (our first request on this SA), echoed by charon
        assert "parsed INFORMATIONAL request 0 [ N(COOKIE2) ]" in log, log[-3000:]
        assert "generating INFORMATIONAL response 0 [ N(COOKIE2) ]" in log
        assert log.index("N(UPD_SA_ADDR)") < log.index("parsed INFORMATIONAL request 0 [ N(COOKIE2) ]")
        assert len(us.of("IkeSaAddressesUpdated", since=m)) == 1
        (st,) = _status(us)
        assert st["remote"][0] == b_new and st["mobike"] is True
        assert not us.of("IkeSaUp", since=m) and not us.of("IkeSaDown", since=m)
