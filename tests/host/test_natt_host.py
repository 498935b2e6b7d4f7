"""NAT traversal through a real NAT (issue 10, "NAT:"): our engine (appliance/ikerunner.py) in a
namespace behind a middle namespace doing nftables masquerade (tests/peers/nat.py), strongSwan
5.9.8 or another of our engines in front.

IKE-level checks (the host kernel has no ESP; tests/lab/test_natt_lab.py sends traffic): the IKE
SA floats to 4500, the Child SA is UDP-encapsulated on both sides, NAT keepalives (one octet 0xFF
to port 4500) go out from behind the NAT only and keep a mapping alive that would otherwise time
out, and a rebinding (new port range, conntrack flushed) is followed by the side in front
without a rekey.
"""

from __future__ import annotations

import time

import pytest

from tests.host.ikerunner_proc import EngineProc, tunnel_json
from tests.peers.fixtures import strongswan_factory  # noqa: F401
from tests.peers.nat import PUBLIC, natted_namespaces
from tests.peers.strongswan import Child, Conn

PSK = "natt-Secret-0123456789"


@pytest.fixture
def natted():
    with natted_namespaces() as sides:
        yield sides


def _ours(tmp_path, inside, outside, **kw) -> EngineProc:
    kw.setdefault("dpd", {"interval": 0, "timeout": 30, "action": "restart"})
    t = tunnel_json(inside, outside, "to-b", local_id="a.example.net", remote_id="b.example.net",
                    psk=PSK.encode(), start=True, **kw)
    return EngineProc(tmp_path / "inside", inside, [t])


def _status(us: EngineProc) -> dict:
    m = us.mark()
    us.send("status")
    (detail,) = us.wait_event(lambda e: e["event"] == "status", 5, since=m)["detail"]
    return detail


def _swan(strongswan_factory, outside):
    sw = strongswan_factory(outside, "sw")
    sw.load(Conn(local_addrs=[outside.addr4], remote_addrs=[PUBLIC], local_id="b.example.net",
                 remote_id="a.example.net", psk=PSK, children=[Child()]))
    return sw


def _in_range(port, lo, hi) -> bool:
    return port is not None and lo <= port <= hi


@pytest.mark.parametrize("keepalive", [2, 0])
def test_strongswan_in_front_float_encapsulation_and_keepalives(tmp_path, natted, strongswan_factory, keepalive):
    inside, nat, outside = natted
    sw = _swan(strongswan_factory, outside)
    with _ours(tmp_path, inside, outside, nat_keepalive=keepalive) as us:
        inst = us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        sa = sw.wait_ike_up()
        # floated to 4500 through the NAT; ESP in UDP on both sides
        assert (inst["udp_encap"], inst["local_port"], inst["remote_port"]) == (True, 4500, 4500)
        st = _status(us)
        assert st["nat_local"] is True and st["local"] == [inside.addr4, 4500]
        public_port = nat.public_port(4500)
        assert _in_range(public_port, 20000, 20099), nat.mappings()
        assert (sa.remote_host, sa.remote_port, sa.nat_remote) == (PUBLIC, public_port, True)
        assert sa.installed()[0].encap
        # idle longer than the NAT keeps an idle UDP mapping
        nat.set_udp_timeout(4)
        before = nat.keepalives()
        time.sleep(9)
        sent = nat.keepalives() - before
        if keepalive:
            assert 3 <= sent <= 6, sent          # every 2 s, as the 0xFF octet to port 4500
            assert _status(us)["keepalives_sent"] >= sent
            assert nat.public_port(4500) == public_port, "the keepalives did not keep the mapping"
            m = us.mark()
            sw.rekey(child="c")                  # strongSwan still reaches us through it
            us.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 15, since=m, what="rekey from strongSwan")
        else:
            assert sent == 0
            assert nat.public_port(4500) is None, "the mapping outlived its timeout without keepalives"


def test_strongswan_follows_a_rebinding_without_a_rekey(tmp_path, natted, strongswan_factory):
    inside, nat, outside = natted
    sw = _swan(strongswan_factory, outside)
    with _ours(tmp_path, inside, outside, dpd={"interval": 2, "timeout": 30, "action": "restart"}) as us:
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        before = sw.wait_ike_up()
        (child,) = before.installed()
        m = us.mark()
        nat.rebind(30000, 30099)    # conntrack flushed, a new port range: the next packet gets a new mapping
        # our next liveness check leaves through the new mapping; strongSwan follows it
        # (its Child SA is UPDATING for a moment while charon moves it: wait for INSTALLED again)
        after = sw.wait_for(lambda sas: len(sas) == 1 and _in_range(sas[0].remote_port, 30000, 30099)
                            and sas[0].installed() and sas[0], timeout=15, what="strongSwan on the new mapping")
        assert after.remote_port == nat.public_port(4500)
        # the same IKE SA followed the mapping (RFC 7296 §2.23), and nothing was asked of us
        assert (after.spi_i, after.spi_r, after.uniqueid) == (before.spi_i, before.spi_r, before.uniqueid)
        log = sw.log_text()
        assert "parsed CREATE_CHILD_SA request" not in log   # (our liveness checks are INFORMATIONAL)
        assert not us.of("IkeSaRekeyed", m)
        (child_after,) = after.installed()
        assert child_after.encap
        if sw.kernel == "libipsec":
            # charon's userspace ESP cannot move an SA (update_sa NOT_SUPPORTED): it rekeys the
            # Child SA itself to follow the new mapping (ike_sa.c update_hosts); in the lab
            # (kernel-netlink) the SA is updated in place
            moved_at = log.index(f"to {PUBLIC}[{after.remote_port}]")
            assert "queueing CHILD_REKEY task" in log[moved_at:]
        else:
            assert (child_after.uniqueid, child_after.spi_in, child_after.spi_out) == \
                (child.uniqueid, child.spi_in, child.spi_out)
            assert not us.of("ChildSaRekeyed", m) and not us.of("ChildSaInstalled", m)
        assert _status(us)["remote"] == [outside.addr4, 4500]   # the side behind the NAT stays put
        # strongSwan's own requests reach us through the new mapping
        m = us.mark()
        sw.rekey(child="c")
        us.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 15, since=m, what="rekey from strongSwan")


def test_isthmus_to_isthmus_through_the_nat(tmp_path, natted):
    inside, nat, outside = natted
    front = tunnel_json(outside, inside, "to-a", local_id="b.example.net", remote_id="a.example.net",
                        psk=PSK.encode(), start=False, remote_addr=PUBLIC, nat_keepalive=2,
                        dpd={"interval": 0, "timeout": 30, "action": "clear"})
    with EngineProc(tmp_path / "outside", outside, [front]) as them, \
            _ours(tmp_path, inside, outside, nat_keepalive=2,
                  dpd={"interval": 3, "timeout": 30, "action": "restart"}) as us:
        ours = us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA behind the NAT")
        theirs = them.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA in front")
        public_port = nat.public_port(4500)
        assert _in_range(public_port, 20000, 20099)
        assert (ours["udp_encap"], ours["local_port"], ours["remote_port"]) == (True, 4500, 4500)
        assert (theirs["udp_encap"], theirs["remote_addr"], theirs["remote_port"]) == (True, PUBLIC, public_port)
        assert (ours["spi_in"], ours["spi_out"]) == (theirs["spi_out"], theirs["spi_in"])
        st_us, st_them = _status(us), _status(them)
        assert (st_us["nat_local"], st_us["nat_remote"]) == (True, False)
        assert (st_them["nat_local"], st_them["nat_remote"]) == (False, True)
        time.sleep(5)
        assert nat.keepalives() >= 1 and nat.keepalives_in() == 0   # only from behind the NAT
        assert _status(them)["keepalives_sent"] == 0

        m_us, m_them = us.mark(), them.mark()
        nat.rebind(30000, 30099)
        moved = them.wait_event(lambda e: e["event"] == "IkeSaAddressesUpdated", 15, since=m_them,
                                what="the front side following the new mapping")
        new_port = nat.public_port(4500)
        assert _in_range(new_port, 30000, 30099)
        assert (moved["remote"], moved["local"], moved["udp_encap"]) == ([PUBLIC, new_port], [outside.addr4, 4500], True)
        for proc, m in ((us, m_us), (them, m_them)):
            assert not proc.of("ChildSaInstalled", m) and not proc.of("IkeSaRekeyed", m)
        assert not us.of("IkeSaAddressesUpdated", m_us)       # the side behind the NAT never moves
        them.send("rekey_child to-a")                         # and the front side reaches it there
        rk = us.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 15, since=m_us, what="rekey from the front")
        new = them.wait_event(lambda e: e["event"] == "ChildSaInstalled", 15, since=m_them)
        assert (new["remote_port"], new["udp_encap"]) == (new_port, True)
        assert rk["old_spi_in"] == ours["spi_in"]


def _pair(tmp_path, inside, outside, ours_kw, theirs_kw, remote_addr):
    front = tunnel_json(outside, inside, "to-a", local_id="b.example.net", remote_id="a.example.net",
                        psk=PSK.encode(), start=False, remote_addr=remote_addr,
                        dpd={"interval": 0, "timeout": 30, "action": "clear"}, **theirs_kw)
    return EngineProc(tmp_path / "outside", outside, [front]), _ours(tmp_path, inside, outside, **ours_kw)


def test_force_encapsulates_between_two_isthmus_without_a_nat(tmp_path):
    from tests.peers.topology import pair_of_namespaces

    with pair_of_namespaces("frc") as (a, b):
        them, us = _pair(tmp_path, a, b, dict(nat_traversal="force", nat_keepalive=1), {}, a.addr4)
        with them, us:
            ours = us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
            theirs = them.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
            for e in (ours, theirs):
                assert (e["udp_encap"], e["local_port"], e["remote_port"]) == (True, 4500, 4500)
            st_us, st_them = _status(us), _status(them)
            assert (st_us["nat_fake"], st_us["nat_local"], st_us["nat_remote"]) == (True, False, False)
            assert (st_them["nat_fake"], st_them["nat_local"], st_them["nat_remote"]) == (False, False, True)
            time.sleep(2.5)
            assert _status(us)["keepalives_sent"] == 0   # no NAT here: nothing to keep open


def test_off_stays_on_500_through_the_nat(tmp_path, natted):
    inside, nat, outside = natted
    them, us = _pair(tmp_path, inside, outside, dict(nat_traversal="off", nat_keepalive=1), {}, PUBLIC)
    with them, us:
        ours = us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        theirs = them.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        assert (ours["udp_encap"], ours["local_port"], ours["remote_port"]) == (False, 500, 500)
        assert (theirs["udp_encap"], theirs["remote_addr"]) == (False, PUBLIC)
        assert _in_range(theirs["remote_port"], 20000, 20099)   # port 500's mapping: never 4500
        assert nat.public_port(4500) is None
        time.sleep(2.5)
        assert nat.keepalives() == 0
