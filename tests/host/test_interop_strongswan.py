"""Our IKE engine (appliance/ikerunner.py) against strongSwan 5.9.8 between two host namespaces
(issue 4, Acceptance): strongSwan as responder and as initiator, both proposals, IKE SA up with a
Child SA whose SPIs and keys match `swanctl --list-sas` and charon's key log, Child and IKE SA
rekeys started from either side, DPD detecting a killed peer, DELETE on shutdown, and a refused
proposal and a wrong PSK giving a clear failure on our side.

On the host strongSwan keeps its Child SAs in kernel-libipsec, which fakes NAT detection so it
can use ESP-in-UDP (tests/peers/README.md): our engine sees the peer "behind a NAT" and floats
to port 4500, and its Child SAs say udp_encap.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from tests.host.ikerunner_proc import EngineProc, tunnel_json
from tests.peers.fixtures import ns_pair, strongswan_factory  # noqa: F401
from tests.peers.strongswan import Child, Conn

PSK = "interop-Secret-0123456789"

PROPOSALS = {
    "x25519": ("aes256gcm16-prfsha384-x25519", "aes256gcm16", "AES_GCM_16-256/PRF_HMAC_SHA2_384/CURVE_25519"),
    "ecp256": ("aes128gcm16-prfsha256-ecp256", "aes128gcm16", "AES_GCM_16-128/PRF_HMAC_SHA2_256/ECP_256"),
}


def fp(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def swan_conn(side_sw, side_us, proposal="x25519", **kw) -> Conn:
    ike, esp, _ = PROPOSALS[proposal]
    args = dict(local_addrs=[side_sw.addr4], remote_addrs=[side_us.addr4], local_id="b.example.net",
                remote_id="a.example.net", psk=PSK, proposals=[ike], children=[Child(esp_proposals=[esp])])
    args.update(kw)
    return Conn(**args)


def ours(tmp_path, side_us, side_sw, *, start: bool, proposal="x25519", **kw) -> EngineProc:
    ike, esp, _ = PROPOSALS[proposal]
    t = tunnel_json(side_us, side_sw, "to-b", local_id="a.example.net", remote_id="b.example.net",
                    psk=PSK.encode(), start=start, ike_proposals=[ike], esp_proposals=[esp], **kw)
    return EngineProc(tmp_path / "ours", side_us, [t])


def check_pair(us: EngineProc, sw, inst: dict) -> None:
    """Our installed pair is strongSwan's, SPIs crossed and keys crossed."""
    sa = sw.wait_ike_up()
    (c,) = sa.installed()
    assert (inst["spi_in"], inst["spi_out"]) == (c.spi_out_int, c.spi_in_int)
    assert c.keys is not None, "strongSwan's Child SA keys not found in its log"
    assert inst["encr_key_out_sha256"] == fp(c.keys.encr_in)
    assert inst["encr_key_in_sha256"] == fp(c.keys.encr_out)


def current_pair(us: EngineProc) -> dict:
    """The pair our engine last installed and has not deleted."""
    deleted = {(e["spi_in"], e["spi_out"]) for e in us.of("ChildSaDeleted")}
    live = [e for e in us.of("ChildSaInstalled") if (e["spi_in"], e["spi_out"]) not in deleted]
    assert len(live) == 1, live
    return live[0]


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_strongswan_responder(tmp_path, ns_pair, strongswan_factory, proposal):
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us, proposal))
    with ours(tmp_path, side_us, side_sw, start=True, proposal=proposal) as us:
        inst = us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        up = us.of("IkeSaUp")[0]
        sa = sw.wait_ike_up()
        assert not sa.initiator and sa.proposal == PROPOSALS[proposal][2]
        assert (up["spi_i"], up["spi_r"]) == (sa.spi_i, sa.spi_r)
        assert up["remote_id"] == "b.example.net" and sa.remote_id == "a.example.net"
        check_pair(us, sw, inst)
        # kernel-libipsec fakes NAT-D: we float to 4500 and encapsulate
        assert inst["udp_encap"] is True and (inst["local_port"], inst["remote_port"]) == (4500, 4500)
        assert inst["if_id"] == 42


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_strongswan_initiator(tmp_path, ns_pair, strongswan_factory, proposal):
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us, proposal))
    with ours(tmp_path, side_us, side_sw, start=False, proposal=proposal) as us:
        sw.initiate("c")
        inst = us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        up = us.of("IkeSaUp")[0]
        sa = sw.wait_ike_up()
        assert sa.initiator and not up["initiator"]
        assert (up["spi_i"], up["spi_r"]) == (sa.spi_i, sa.spi_r)
        check_pair(us, sw, inst)


@pytest.mark.parametrize("who", ["ours", "strongswan"])
def test_child_rekey_from_either_side(tmp_path, ns_pair, strongswan_factory, who):
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, start=True) as us:
        old = us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20)
        sw.wait_ike_up()
        m = us.mark()
        if who == "ours":
            us.send("rekey_child to-b")
        else:
            sw.rekey(child="c")
        us.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 15, since=m)
        us.wait_event(lambda e: e["event"] == "ChildSaDeleted" and e["spi_in"] == old["spi_in"], 15, since=m)
        new = current_pair(us)
        assert new["spi_in"] != old["spi_in"]
        sw.wait_for(lambda sas: len(sas) == 1 and len(sas[0].installed()) == 1
                    and sas[0].installed()[0].spi_out_int == new["spi_in"], what="strongSwan on the new pair")
        check_pair(us, sw, new)


@pytest.mark.parametrize("who", ["ours", "strongswan"])
def test_ike_rekey_from_either_side(tmp_path, ns_pair, strongswan_factory, who):
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, start=True) as us:
        inst = us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20)
        before = sw.wait_ike_up()
        m = us.mark()
        if who == "ours":
            us.send("rekey_ike to-b")
        else:
            sw.rekey(ike="p")
        rk = us.wait_event(lambda e: e["event"] == "IkeSaRekeyed", 15, since=m)
        sa = sw.wait_for(lambda sas: len(sas) == 1 and sas[0].spi_i != before.spi_i and sas[0],
                         what="strongSwan on the new IKE SA")
        assert (rk["new_spi_i"], rk["new_spi_r"]) == (sa.spi_i, sa.spi_r)
        assert current_pair(us) == inst     # the Child SA moved over unchanged
        # and the new IKE SA works: rekey the Child SA over it
        m = us.mark()
        us.send("rekey_child to-b")
        us.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 15, since=m)
        assert not us.of("IkeSaDown") and not us.of("PeerDead")


def test_dpd_detects_a_killed_strongswan(tmp_path, ns_pair, strongswan_factory):
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, start=True, dpd={"interval": 1, "timeout": 4, "action": "clear"},
              retransmit={"timeout": 0.5, "base": 1.4, "tries": 3}) as us:
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20)
        m = us.mark()
        sw.kill()
        dead = us.wait_event(lambda e: e["event"] == "PeerDead", 15, since=m)
        assert dead["action"] == "clear"
        us.wait_event(lambda e: e["event"] == "ChildSaDeleted", 5, since=m)
        us.wait_event(lambda e: e["event"] == "IkeSaDown", 5, since=m)


def test_strongswan_shutdown_deletes_and_our_terminate_deletes(tmp_path, ns_pair, strongswan_factory):
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, start=False) as us:
        sw.initiate("c")
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20)
        m = us.mark()
        sw.stop()       # SIGTERM: charon sends DELETE for its IKE SA
        down = us.wait_event(lambda e: e["event"] == "IkeSaDown", 10, since=m)
        assert down["reason"] == "deleted by the peer"
        assert us.of("ChildSaDeleted", since=m)
    sw2 = strongswan_factory(side_sw, "sw2")
    sw2.load(swan_conn(side_sw, side_us))
    with ours(tmp_path / "2", side_us, side_sw, start=True) as us:
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20)
        sw2.wait_ike_up()
        us.send("terminate to-b")
        sw2.wait_no_ike(10)
        us.wait_event(lambda e: e["event"] == "IkeSaDown", 10)


def test_a_proposal_strongswan_refuses_is_a_clear_failure(tmp_path, ns_pair, strongswan_factory):
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us, "ecp256"))
    # the unauthenticated NO_PROPOSAL_CHOSEN fails us only when our retransmissions run out
    # (RFC 7296 §2.21.1): 1 + 1.5 + 2.25 s here
    with ours(tmp_path, side_us, side_sw, start=True, proposal="x25519",
              retransmit={"timeout": 1.0, "base": 1.5, "tries": 2}) as us:
        f = us.wait_event(lambda e: e["event"] == "IkeSaFailed", 20)
        assert "NO_PROPOSAL_CHOSEN" in f["reason"] and "aes256gcm16-prfsha384-x25519" in f["reason"]


def test_a_wrong_psk_is_a_clear_failure(tmp_path, ns_pair, strongswan_factory):
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us, psk="a-different-Secret-987654"))
    with ours(tmp_path, side_us, side_sw, start=True) as us:
        f = us.wait_event(lambda e: e["event"] == "AuthFailed", 20)
        assert "AUTHENTICATION_FAILED" in f["reason"] and PSK not in f["reason"]
    # and the other way round: strongSwan initiates with the wrong key
    sw.load(swan_conn(side_sw, side_us, psk="a-different-Secret-987654"))
    with ours(tmp_path / "2", side_us, side_sw, start=False) as us:
        sw.initiate_async("c")
        f = us.wait_event(lambda e: e["event"] == "AuthFailed", 20)
        assert "does not verify with the pre-shared key" in f["reason"]


@pytest.mark.parametrize("what", ["child", "ike"])
def test_rekey_collision_with_strongswan(tmp_path, ns_pair, strongswan_factory, what):
    """Both sides rekey at the same moment (§2.8.1 / §2.8.2): strongSwan and we must agree on
    which new SA is redundant (lowest nonce) and end with one IKE SA and one matching pair."""
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, start=True) as us:
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20)
        before = sw.wait_ike_up()
        m = us.mark()
        if what == "child":
            us.send("rekey_child to-b")
            sw.rekey(child="c")
            us.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 15, since=m)
        else:
            us.send("rekey_ike to-b")
            sw.rekey(ike="p")
            us.wait_event(lambda e: e["event"] == "IkeSaRekeyed", 15, since=m)

        def settled(sas):
            if len(sas) != 1 or len(sas[0].installed()) != 1 or sas[0].tasks["active"] or sas[0].tasks["queued"]:
                return None
            if len(sas[0].children) != 1:
                return None
            return sas[0]

        time.sleep(2.0)   # let both sides finish their DELETEs
        sa = sw.wait_for(settled, timeout=20, what="strongSwan settled on one IKE SA and one pair")
        if what == "ike":
            assert sa.spi_i != before.spi_i
            # (if strongSwan's rekey was done before our command ran, ours rekeys the new SA)
            rk = us.of("IkeSaRekeyed", since=m)
            assert 1 <= len(rk) <= 2 and (rk[-1]["new_spi_i"], rk[-1]["new_spi_r"]) == (sa.spi_i, sa.spi_r)
        pair = current_pair(us)
        check_pair(us, sw, pair)
        assert not us.of("IkeSaDown") and not us.of("PeerDead") and not us.of("ChildSaFailed")
