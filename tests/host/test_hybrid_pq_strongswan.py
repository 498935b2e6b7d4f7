"""Hybrid post-quantum proposals (RFC 9370 `ke1_mlkem768`) against a classic-only strongSwan
5.9.8 (it knows neither IKE_INTERMEDIATE nor additional key exchange transforms), between two
host namespaces: when our policy also allows a classic proposal - a second proposal, or
`ke1_none` in the hybrid one - the tunnel comes up on the classic suite, each side initiating;
when every proposal requires ML-KEM, it never does, with a clear failure on either side.
"""

from __future__ import annotations

import pytest

from tests.host.ikerunner_proc import EngineProc, tunnel_json
from tests.peers.fixtures import ns_pair, strongswan_factory  # noqa: F401
from tests.peers.strongswan import Child, Conn

PSK = "hybrid-Secret-0123456789"
CLASSIC = "aes256gcm16-prfsha384-x25519"
HYBRID = CLASSIC + "-ke1_mlkem768"
SWAN_PROPOSAL = "AES_GCM_16-256/PRF_HMAC_SHA2_384/CURVE_25519"

POLICIES = {
    "two-proposals": [HYBRID, CLASSIC],
    "ke1_none": [HYBRID + "-ke1_none"],
}


def swan_conn(side_sw, side_us) -> Conn:
    return Conn(local_addrs=[side_sw.addr4], remote_addrs=[side_us.addr4], local_id="b.example.net",
                remote_id="a.example.net", psk=PSK, proposals=[CLASSIC],
                children=[Child(esp_proposals=["aes256gcm16"])])


def ours(tmp_path, side_us, side_sw, *, start: bool, ike: list[str], **kw) -> EngineProc:
    t = tunnel_json(side_us, side_sw, "to-b", local_id="a.example.net", remote_id="b.example.net",
                    psk=PSK.encode(), start=start, ike_proposals=ike, esp_proposals=["aes256gcm16"], **kw)
    return EngineProc(tmp_path / "ours", side_us, [t])


@pytest.mark.parametrize("policy", POLICIES)
def test_we_initiate_hybrid_optional_to_a_classic_only_strongswan(tmp_path, ns_pair, strongswan_factory,
                                                                  policy):
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, start=True, ike=POLICIES[policy]) as us:
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        up = us.of("IkeSaUp")[0]
        sa = sw.wait_ike_up()
        assert not sa.initiator and sa.proposal == SWAN_PROPOSAL
        assert "mlkem" not in up["proposal"] and up["proposal"].startswith(CLASSIC)
        assert (up["spi_i"], up["spi_r"]) == (sa.spi_i, sa.spi_r)
        # our offer carried the additional key exchange (transform type 6, ML-KEM-768 = 36):
        # strongSwan 5.9.8 does not know the type and took the classic part
        log = sw.log_text()
        assert "received proposals: IKE:AES_GCM_16_256/PRF_HMAC_SHA2_384/CURVE_25519/UNKNOWN_6_36" in log
        assert "selected proposal: IKE:AES_GCM_16_256/PRF_HMAC_SHA2_384/CURVE_25519\n" in log


@pytest.mark.parametrize("policy", POLICIES)
def test_classic_only_strongswan_initiates_to_our_hybrid_optional_policy(tmp_path, ns_pair,
                                                                         strongswan_factory, policy):
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, start=False, ike=POLICIES[policy]) as us:
        sw.initiate("c")
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        up = us.of("IkeSaUp")[0]
        sa = sw.wait_ike_up()
        assert sa.initiator and not up["initiator"] and sa.proposal == SWAN_PROPOSAL
        assert up["proposal"] == CLASSIC


def test_hybrid_required_never_connects_to_a_classic_only_strongswan(tmp_path, ns_pair, strongswan_factory):
    side_us, side_sw = ns_pair
    sw = strongswan_factory(side_sw, "sw")
    sw.load(swan_conn(side_sw, side_us))
    # we initiate: strongSwan accepts none of our proposals (each requires ML-KEM)
    with ours(tmp_path, side_us, side_sw, start=True, ike=[HYBRID],
              retransmit={"timeout": 1.0, "base": 1.5, "tries": 2}) as us:
        f = us.wait_event(lambda e: e["event"] == "IkeSaFailed", 20)
        assert "NO_PROPOSAL_CHOSEN" in f["reason"] and HYBRID in f["reason"]
        assert us.of("IkeSaUp") == []
    # strongSwan initiates: we answer NO_PROPOSAL_CHOSEN
    with ours(tmp_path / "2", side_us, side_sw, start=False, ike=[HYBRID]) as us:
        sw.initiate_async("c")
        sw.wait_for(lambda _sas: sw.log_has("NO_PROPOSAL_CHOSEN"), 20, what="NO_PROPOSAL_CHOSEN in charon's log")
        assert us.of("IkeSaUp") == []
        assert sw.list_sas() == [] or all(not s.established for s in sw.list_sas())


@pytest.mark.parametrize("kem", ["mlkem768", "mlkem1024"])
def test_two_of_our_engines_agree_the_hybrid_suite_over_real_sockets(tmp_path, ns_pair, kem):
    # two appliances (ikerunner processes, one per namespace, UDP 500/4500 on the host kernel);
    # ML-KEM-1024's IKE_INTERMEDIATE goes as IKE fragments (RFC 7383, 1280-octet default)
    side_a, side_b = ns_pair
    hybrid = f"{CLASSIC}-ke1_{kem}"
    ta = tunnel_json(side_a, side_b, "to-b", local_id="a.example.net", remote_id="b.example.net",
                     psk=PSK.encode(), ike_proposals=[hybrid])
    tb = tunnel_json(side_b, side_a, "to-a", local_id="b.example.net", remote_id="a.example.net",
                     psk=PSK.encode(), ike_proposals=[hybrid], start=False)
    b = EngineProc(tmp_path / "b", side_b, [tb])
    a = EngineProc(tmp_path / "a", side_a, [ta])
    with a, b:
        ia = a.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="A's Child SA")
        ib = b.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="B's Child SA")
        assert (ia["spi_in"], ia["spi_out"]) == (ib["spi_out"], ib["spi_in"])
        assert ia["encr_key_out_sha256"] == ib["encr_key_in_sha256"]
        assert a.of("IkeSaUp")[0]["proposal"] == b.of("IkeSaUp")[0]["proposal"] == hybrid
        # the IKE SA rekey keeps the hybrid suite (IKE_FOLLOWUP_KE, RFC 9370 §2.2.4)
        ma, mb = a.mark(), b.mark()
        a.send("rekey_ike to-b")
        ka = a.wait_event(lambda e: e["event"] == "IkeSaRekeyed", 10, since=ma)
        kb = b.wait_event(lambda e: e["event"] == "IkeSaRekeyed", 10, since=mb)
        assert ka["proposal"] == kb["proposal"] == hybrid
        ma, mb = a.mark(), b.mark()
        b.send("rekey_child to-a")
        a.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 10, since=ma)
        b.wait_event(lambda e: e["event"] == "ChildSaRekeyed", 10, since=mb)
