"""strongSwan ⟷ strongSwan between two host namespaces: proves tests/peers/strongswan.py and is the
template for "our engine vs strongSwan" interop tests (issue 4, Acceptance).

On the host, strongSwan keeps Child SAs in kernel-libipsec (userspace ESP): the host kernel has no
ESP, and with kernel-netlink every Child SA install fails (see test_kernel_netlink_cannot_install).
kernel-libipsec forces UDP encapsulation, so Child SAs are ESP-in-UDP here.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.peers.strongswan import Child, Conn, IkeSa, StrongSwan, StrongSwanError, spis_match
from tests.peers.fixtures import ns_pair, strongswan_factory  # noqa: F401

PSK = "interop-Secret-0123456789"

# name: (IKE proposal, ESP proposal, what list-sas must show for the IKE SA, for the Child SA)
PROPOSALS = {
    "x25519": ("aes256gcm16-prfsha384-x25519", "aes256gcm16",
               "AES_GCM_16-256/PRF_HMAC_SHA2_384/CURVE_25519", "AES_GCM_16-256"),
    "ecp256": ("aes128gcm16-prfsha256-ecp256", "aes128gcm16",
               "AES_GCM_16-128/PRF_HMAC_SHA2_256/ECP_256", "AES_GCM_16-128"),
}


def tunnel(proposal: str = "x25519", **changes) -> Conn:
    ike, esp, _, _ = PROPOSALS[proposal]
    conn = Conn(local_addrs=["192.0.2.1"], remote_addrs=["192.0.2.2"], local_id="a.example.net",
                remote_id="b.example.net", psk=PSK, proposals=[ike], children=[Child(esp_proposals=[esp])])
    return dataclasses.replace(conn, **changes)


@pytest.fixture
def nets(ns_pair):
    return ns_pair


@pytest.fixture
def daemons(ns_pair, strongswan_factory):
    a_side, b_side = ns_pair
    return strongswan_factory(a_side, "A"), strongswan_factory(b_side, "B")


def up(a: StrongSwan, b: StrongSwan, conn: Conn, conn_b: Conn | None = None) -> tuple[IkeSa, IkeSa]:
    a.load(conn)
    b.load(conn_b or conn.mirrored())
    a.initiate("c")
    sa, sb = a.wait_ike_up(), b.wait_ike_up()
    assert spis_match(sa, sb), (sa, sb)
    return sa, sb


def assert_child_keys_cross(sa: IkeSa, sb: IkeSa) -> None:
    """Each side's outbound key is the other's inbound key (RFC 7296 §2.17: one KEYMAT, two halves)."""
    ca, = sa.installed()
    cb, = sb.installed()
    assert ca.keys is not None and cb.keys is not None, "Child SA keys not found in the charon logs"
    assert ca.keys.encr_out == cb.keys.encr_in and ca.keys.encr_in == cb.keys.encr_out
    assert ca.keys.encr_in != ca.keys.encr_out
    assert ca.keys.integ_out == cb.keys.integ_in and ca.keys.integ_in == cb.keys.integ_out


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_sa_up_with_matching_spis_and_keys(daemons, proposal):
    a, b = daemons
    sa, sb = up(a, b, tunnel(proposal))
    _, _, ike_shown, esp_shown = PROPOSALS[proposal]
    assert sa.initiator and not sb.initiator
    for s in (sa, sb):
        assert s.proposal == ike_shown
        c, = s.installed()
        assert c.proposal == esp_shown and c.mode == "TUNNEL" and c.protocol == "ESP"
        assert (c.if_id_in, c.if_id_out) == (42, 42)
        assert c.local_ts == ["0.0.0.0/0", "::/0"] == c.remote_ts
        assert c.encap == (a.kernel == "libipsec")
    assert (sa.local_id, sa.remote_id) == ("a.example.net", "b.example.net") == (sb.remote_id, sb.local_id)
    assert_child_keys_cross(sa, sb)
    key_len = {"x25519": 32 + 4, "ecp256": 16 + 4}[proposal]  # AES key + GCM salt
    assert len(sa.installed()[0].keys.encr_out) == key_len


@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("side", ["A", "B"])
def test_child_rekey_from_either_side(daemons, proposal, side):
    a, b = daemons
    sa, sb = up(a, b, tunnel(proposal))
    old = sa.installed()[0]
    marks = a.mark(), b.mark()
    (a if side == "A" else b).rekey(child="c")
    for d, m in zip((a, b), marks):
        ev = d.wait_event("child-rekey", since=m)
        pair = ev["p"]["child-sas"]["c"]
        assert pair["old"]["spi-in"] in (old.spi_in, old.spi_out)
    # Afterwards: one installed pair per side, new SPIs, crossed, with crossed keys.
    def settled(d):
        return lambda sas: (len(sas) == 1 and len(sas[0].installed()) == 1
                            and sas[0].installed()[0].spi_in not in (old.spi_in, old.spi_out) and sas[0])
    na = a.wait_for(settled(a), what="one new Child SA")
    nb = b.wait_for(settled(b), what="one new Child SA")
    assert spis_match(na, nb)
    assert (na.spi_i, na.spi_r) == (sa.spi_i, sa.spi_r), "a Child SA rekey must keep the IKE SA"
    assert_child_keys_cross(na, nb)
    assert na.installed()[0].keys.encr_out != old.keys.encr_out
    rekeyer = a if side == "A" else b
    assert rekeyer.log_has(r"generating CREATE_CHILD_SA request \d+ \[ N\(REKEY_SA\) SA No TSi TSr \]")


@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("side", ["A", "B"])
def test_ike_rekey_from_either_side(daemons, proposal, side):
    a, b = daemons
    sa, sb = up(a, b, tunnel(proposal))
    child = sa.installed()[0]
    marks = a.mark(), b.mark()
    (a if side == "A" else b).rekey(ike="p")
    for d, m in zip((a, b), marks):
        ev = d.wait_event("ike-rekey", since=m)
        assert ev["p"]["old"]["initiator-spi"] == sa.spi_i
        assert ev["p"]["new"]["initiator-spi"] != sa.spi_i
    def settled(sas):
        return len(sas) == 1 and sas[0].state == "ESTABLISHED" and sas[0].spi_i != sa.spi_i and sas[0]
    na = a.wait_for(settled, what="one new IKE SA")
    nb = b.wait_for(settled, what="one new IKE SA")
    assert spis_match(na, nb)
    assert na.proposal == sa.proposal
    # The Child SA moves to the new IKE SA unchanged (RFC 7296 §2.18).
    c, = na.installed()
    assert (c.spi_in, c.spi_out) == (child.spi_in, child.spi_out)
    # The IKE SA initiator of the new SA is whoever started the rekey.
    assert na.initiator == (side == "A") and nb.initiator == (side == "B")


def test_dpd_detects_killed_peer(daemons):
    a, b = daemons
    conn = tunnel(dpd_delay=1, children=[Child(esp_proposals=["aes256gcm16"], dpd_action="clear")])
    up(a, b, conn)
    m = a.mark()
    b.kill()
    budget = 1 + a.retransmit.give_up_after() + 5
    ev = a.wait_event("ike-updown", lambda body: "up" not in body, timeout=budget, since=m)
    assert ev["p"]["remote-id"] == "b.example.net"
    assert a.log_has(r"giving up after \d+ retransmits")
    assert a.list_sas() == []


def test_dpd_keeps_a_live_peer(daemons):
    """The counterpart: B is alive and answers A's liveness checks, so nothing is torn down.
    (Only A runs DPD: a side that receives requests has no reason to send its own.)"""
    a, b = daemons
    conn = tunnel(dpd_delay=1)
    sa, _ = up(a, b, conn, conn.mirrored(dpd_delay=None))
    a.wait_for(lambda sas: a.log_text().count("sending DPD request") >= 2, timeout=10, what="two liveness checks")
    assert b.log_has(r"generating INFORMATIONAL response \d+ \[ \]")
    na = a.wait_ike_up()
    assert na.spi_i == sa.spi_i
    assert not a.log_has("giving up after")


@pytest.mark.parametrize("what", ["ike", "child"])
def test_delete_on_terminate(daemons, what):
    a, b = daemons
    up(a, b, tunnel())
    m = b.mark()
    if what == "ike":
        a.terminate(ike="p")
        b.wait_event("ike-updown", lambda body: "up" not in body, since=m)
        assert b.log_has(r"received DELETE for IKE_SA p\[1\]")
        b.wait_no_ike()
        a.wait_no_ike()
    else:
        a.terminate(child="c")
        b.wait_event("child-updown", lambda body: "up" not in body, since=m)
        assert b.log_has(r"received DELETE for ESP CHILD_SA with SPI")
        sb = b.wait_for(lambda sas: len(sas) == 1 and not sas[0].installed() and sas[0], what="IKE SA without child")
        assert sb.state == "ESTABLISHED"


def test_delete_on_shutdown(daemons):
    a, b = daemons
    up(a, b, tunnel())
    m = b.mark()
    assert a.stop() == 0
    assert a.log_has(r"sending DELETE for IKE_SA p\[1\]")
    b.wait_event("ike-updown", lambda body: "up" not in body, since=m)
    assert b.log_has(r"received DELETE for IKE_SA p\[1\]")
    b.wait_no_ike()


def test_wrong_psk_fails_authentication(daemons):
    a, b = daemons
    a.load(tunnel())
    b.load(tunnel().mirrored(psk="another-Secret-0123456789"))
    ok, log = a.initiate("c", check=False)
    assert not ok
    assert any("received AUTHENTICATION_FAILED notify error" in line for line in log), log
    assert b.log_has(r"tried 1 shared key for 'b.example.net' - 'a.example.net', but MAC mismatched")
    assert a.list_sas() == [] and b.list_sas() == []
    assert PSK not in "\n".join(log)


def test_refused_ike_proposal(daemons):
    a, b = daemons
    a.load(tunnel("ecp256"))
    b.load(tunnel("x25519").mirrored())
    ok, log = a.initiate("c", check=False)
    assert not ok
    assert any("received NO_PROPOSAL_CHOSEN notify error" in line for line in log), log
    assert b.log_has(r"received proposals: IKE:AES_GCM_16_128/PRF_HMAC_SHA2_256/ECP_256")
    assert b.log_has("received proposals unacceptable")
    assert a.list_sas() == [] and b.list_sas() == []


def test_refused_esp_proposal_keeps_ike_sa(daemons):
    a, b = daemons
    a.load(tunnel(children=[Child(esp_proposals=["aes128gcm16"])]))
    b.load(tunnel(children=[Child(esp_proposals=["aes256gcm16"])]).mirrored())
    ok, log = a.initiate("c", check=False)
    assert not ok
    assert any("received NO_PROPOSAL_CHOSEN notify, no CHILD_SA built" in line for line in log), log
    sa = a.wait_ike_up(child=None)
    assert sa.children == []


def test_kernel_netlink_cannot_install_on_the_host(nets, tmp_path):
    """Why the host uses kernel-libipsec: with kernel-netlink the IKE SA comes up but the
    responder cannot add the ESP state to the host kernel, so no Child SA exists."""
    a_side, b_side = nets
    with StrongSwan(tmp_path / "A", a_side.name, name="A", kernel="netlink") as a, \
         StrongSwan(tmp_path / "B", b_side.name, name="B", kernel="netlink") as b:
        a.load(tunnel())
        b.load(tunnel().mirrored())
        ok, _ = a.initiate("c", check=False)
        assert not ok
        assert b.log_has(r"unable to add SAD entry with SPI [0-9a-f]+")
        assert a.wait_ike_up(child=None).children == []


def test_certificate_authentication(daemons):
    from tests.peers.certs import TestCA, write_credential
    a, b = daemons
    ca = TestCA()
    for d, ident in ((a, "a.example.net"), (b, "b.example.net")):
        ca.write_ca(d.swanctl_dir)
        write_credential(d.swanctl_dir, ca.issue(ident), "me")
    conn = tunnel(auth="pubkey", psk=None, cert="me.pem")
    sa, sb = up(a, b, conn)
    assert b.log_has(r"authentication of 'a.example.net' with ECDSA_WITH_SHA256_DER successful"
                     r"|authentication of 'a.example.net' with [A-Z_0-9]+ successful")
    assert_child_keys_cross(sa, sb)


def test_vici_errors_are_reported(daemons):
    a, _ = daemons
    a.load(tunnel())
    with pytest.raises(StrongSwanError, match="no config named 'nope'|CHILD_SA config 'nope' not found"):
        a.initiate("nope")
