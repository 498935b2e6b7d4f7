"""Two of our IKE engines (appliance/ikerunner.py), one in each network namespace, over real
UDP sockets on the host kernel: IKE SA + Child SA, rekeys from both sides, DPD, DELETE."""

from __future__ import annotations


from tests.host.ikerunner_proc import EngineProc, tunnel_json
from tests.peers.fixtures import ns_pair  # noqa: F401

PSK = b"host-test-psk-0123456789abcdef"


def _pair(tmp_path, a_side, b_side, a_kw=None, b_kw=None):
    ta = tunnel_json(a_side, b_side, "to-b", local_id="a.example.net", remote_id="b.example.net",
                     psk=PSK, **(a_kw or {}))
    tb = tunnel_json(b_side, a_side, "to-a", local_id="b.example.net", remote_id="a.example.net",
                     psk=PSK, **dict({"start": False}, **(b_kw or {})))
    b = EngineProc(tmp_path / "b", b_side, [tb])
    a = EngineProc(tmp_path / "a", a_side, [ta])
    return a, b


def _pair_ok(a: EngineProc, b: EngineProc, ia: dict, ib: dict) -> None:
    assert (ia["spi_in"], ia["spi_out"]) == (ib["spi_out"], ib["spi_in"])
    assert ia["encr_key_out_sha256"] == ib["encr_key_in_sha256"]
    assert ia["encr_key_in_sha256"] == ib["encr_key_out_sha256"]


def test_two_engines_establish_rekey_and_delete(tmp_path, ns_pair):
    side_a, side_b = ns_pair
    a, b = _pair(tmp_path, side_a, side_b)
    with a, b:
        ia = a.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="A's Child SA")
        ib = b.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="B's Child SA")
        _pair_ok(a, b, ia, ib)
        up = a.of("IkeSaUp")[0]
        assert up["local"] == [side_a.addr4, 500] and up["remote"] == [side_b.addr4, 500]
        assert ia["udp_encap"] is False and ia["if_id"] == 42

        # Child SA rekey from the responder side
        ma, mb = a.mark(), b.mark()
        b.send("rekey_child to-a")
        rb = b.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 10, since=mb)
        ra = a.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 10, since=ma)
        assert (ra["new_spi_in"], ra["new_spi_out"]) == (rb["new_spi_out"], rb["new_spi_in"])
        a.wait_event(lambda e: e["event"] == "ChildSaDeleted", 10, since=ma)
        a.wait_event(lambda e: e["event"] == "ChildSaOutboundInstalled", 10, since=ma)

        # IKE SA rekey from the initiator side
        ma, mb = a.mark(), b.mark()
        a.send("rekey_ike to-b")
        ka = a.wait_event(lambda e: e["event"] == "IkeSaRekeyed", 10, since=ma)
        kb = b.wait_event(lambda e: e["event"] == "IkeSaRekeyed", 10, since=mb)
        assert (ka["new_spi_i"], ka["new_spi_r"]) == (kb["new_spi_i"], kb["new_spi_r"])

        # the rekeyed IKE SA carries a Child SA rekey
        ma, mb = a.mark(), b.mark()
        a.send("rekey_child to-b")
        a.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 10, since=ma)
        b.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 10, since=mb)

        # DELETE
        ma, mb = a.mark(), b.mark()
        a.send("terminate to-b")
        b.wait_event(lambda e: e["event"] == "IkeSaDown", 10, since=mb)
        a.wait_event(lambda e: e["event"] == "IkeSaDown", 10, since=ma)
        assert not a.of("PeerDead") and not b.of("PeerDead")


def test_dead_peer_detection_and_restart(tmp_path, ns_pair):
    side_a, side_b = ns_pair
    dpd = {"interval": 1, "timeout": 3, "action": "restart"}
    fast = {"timeout": 0.5, "base": 1.5, "tries": 3}
    a, b = _pair(tmp_path, side_a, side_b, a_kw={"dpd": dpd, "retransmit": fast, "reconnect_delay": 1})
    with a:
        with b:
            a.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20)
            m = a.mark()
            b.kill()
            dead = a.wait_event(lambda e: e["event"] == "PeerDead", 15, since=m)
            assert dead["action"] == "restart"
            a.wait_event(lambda e: e["event"] == "IkeSaDown", 5, since=m)
        # a new responder comes up; A re-initiates on its own
        b2 = EngineProc(tmp_path / "b2", side_b, [tunnel_json(side_b, side_a, "to-a", local_id="b.example.net",
                                                              remote_id="a.example.net", psk=PSK, start=False)])
        with b2:
            m = a.mark()
            ia = a.wait_event(lambda e: e["event"] == "ChildSaInstalled", 30, since=m)
            ib = b2.wait_event(lambda e: e["event"] == "ChildSaInstalled", 10)
            _pair_ok(a, b2, ia, ib)


def test_wrong_psk_is_reported_on_both_sides(tmp_path, ns_pair):
    side_a, side_b = ns_pair
    a, b = _pair(tmp_path, side_a, side_b, b_kw={"psk_hex": b"not-the-same-key".hex()})
    with a, b:
        fb = b.wait_event(lambda e: e["event"] == "AuthFailed", 20)
        fa = a.wait_event(lambda e: e["event"] == "AuthFailed", 20)
        assert "pre-shared key" in fb["reason"] and "AUTHENTICATION_FAILED" in fa["reason"]
        assert PSK.decode() not in (a.log_tail(400) + b.log_tail(400))
