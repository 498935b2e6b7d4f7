"""Two engines in memory: IKE_SA_INIT, IKE_AUTH, Child SAs, rekeys, DELETE, DPD, reliability."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.ike import events as ev
from appliance.ike import message as M
from appliance.ike.constants import ExchangeType, NotifyType
from appliance.ike.engine import IkeEngine
from appliance.ike.policy import DpdConfig, Identity
from tests.unit.ike.simnet import (
    A_ADDR,
    B_ADDR,
    PSK,
    Faults,
    SimNet,
    installed_pair_ok,
    make_engines,
    one_ike_sa_each,
    tunnel,
)


def up(seed: int = 1, a_kw=None, b_kw=None, faults=None, run: float = 30) -> SimNet:
    a, b = make_engines(seed, a_kw, b_kw)
    net = SimNet({A_ADDR: a, B_ADDR: b}, faults)
    a.start(net.now)
    b.start(net.now)
    net.run(run)
    return net


def kinds(net: SimNet, ip: str) -> list[str]:
    return [type(e).__name__ for e in net.events[ip]]


def of(net: SimNet, ip: str, cls):
    return [e for e in net.events[ip] if isinstance(e, cls)]


def exchanges(net: SimNet) -> list[tuple[str, str, int]]:
    """(exchange, request|response, message id) of every delivered datagram, in order."""
    out = []
    for _t, d in net.delivered:
        h = M.parse_header(d.data)
        out.append((ExchangeType(h.exchange_type).name, "response" if h.is_response else "request",
                    h.message_id))
    return out


# ------------------------------------------------------------------ establishment


def test_ike_sa_and_first_child_sa_come_up_with_matching_keys():
    net = up()
    assert kinds(net, A_ADDR) == ["IkeSaUp", "ChildSaInstalled"]
    assert kinds(net, B_ADDR) == ["IkeSaUp", "ChildSaInstalled"]
    assert installed_pair_ok(net) == []
    assert one_ike_sa_each(net) == []
    (ua,), (ub,) = of(net, A_ADDR, ev.IkeSaUp), of(net, B_ADDR, ev.IkeSaUp)
    assert ua.initiator and not ub.initiator
    assert (ua.local_id, ua.remote_id) == ("a.example.net", "b.example.net")
    assert (ub.local_id, ub.remote_id) == ("b.example.net", "a.example.net")
    assert ua.proposal == "aes256gcm16-prfsha384-x25519"
    (ca,), (cb,) = of(net, A_ADDR, ev.ChildSaInstalled), of(net, B_ADDR, ev.ChildSaInstalled)
    assert (ca.spi_in, ca.spi_out) == (cb.spi_out, cb.spi_in)
    assert ca.encr_key_out == cb.encr_key_in and ca.encr_key_in == cb.encr_key_out
    assert len(ca.encr_key_in) == 36 and ca.encr_id == 20 and ca.encr_key_bits == 256
    assert ca.integ_id is None and not ca.esn and not ca.udp_encap and ca.if_id == 42
    assert (ca.local_addr, ca.remote_addr, ca.local_port, ca.remote_port) == (A_ADDR, B_ADDR, 500, 500)
    assert ca.outbound and cb.outbound
    # rekey 9 min before the 1 h lifetime, minus up to another 9 min at random
    assert 3600 - 1080 <= ca.lifetime_soft <= 3600 - 540 and ca.lifetime_hard == pytest.approx(3600)
    assert ca.lifetime_soft != cb.lifetime_soft
    assert exchanges(net) == [("IKE_SA_INIT", "request", 0), ("IKE_SA_INIT", "response", 0),
                              ("IKE_AUTH", "request", 1), ("IKE_AUTH", "response", 1)]


@pytest.mark.parametrize("ike,esp", [
    ("aes128gcm16-prfsha256-ecp256", "aes128gcm16"),
    ("aes256-sha256-modp3072", "aes256-sha256"),
    ("aes128-sha512-ecp384", "aes128-sha384-esn"),
    ("chacha20poly1305-prfsha256-x25519", "chacha20poly1305"),
    ("aes256gcm16-prfsha512-x448", "aes256gcm16"),
    ("aes256gcm16-prfsha384-ecp521", "aes256gcm16-esn"),
])
def test_suites(ike, esp):
    net = up(a_kw=dict(ike=ike, esp=esp), b_kw=dict(ike=ike, esp=esp))
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
    (ca,) = of(net, A_ADDR, ev.ChildSaInstalled)
    assert ca.esn == esp.endswith("-esn")
    if "sha" in esp and "gcm" not in esp:
        assert ca.integ_id is not None and ca.integ_key_in


def test_invalid_ke_payload_retry():
    # A sends its KE for x25519 first; B only takes ecp256 and asks for it.
    net = up(a_kw=dict(ike="aes256gcm16-prfsha384-x25519-ecp256"), b_kw=dict(ike="aes256gcm16-prfsha384-ecp256"))
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
    assert [x[:2] for x in exchanges(net)][:4] == [("IKE_SA_INIT", "request"), ("IKE_SA_INIT", "response")] * 2
    first_reply = M.parse_message(net.delivered[1][1].data)[0]
    n = first_reply.notify(NotifyType.INVALID_KE_PAYLOAD)
    assert n is not None and n.data == (19).to_bytes(2, "big")
    assert of(net, A_ADDR, ev.IkeSaUp)[0].proposal == "aes256gcm16-prfsha384-ecp256"


def test_no_proposal_chosen_is_a_clear_failure():
    # §2.21.1: the unauthenticated NO_PROPOSAL_CHOSEN is not acted on at once (anyone may send
    # it); the initiator fails when its retransmissions run out, saying what it was told
    net = up(a_kw=dict(ike="aes128gcm16-prfsha256-ecp256"), b_kw=dict(ike="aes256gcm16-prfsha384-x25519"),
             run=3)
    assert not of(net, A_ADDR, ev.IkeSaFailed)
    net.run(170)
    f = of(net, A_ADDR, ev.IkeSaFailed)[0]
    assert "NO_PROPOSAL_CHOSEN" in f.reason and "aes128gcm16-prfsha256-ecp256" in f.reason
    assert net.engines[B_ADDR].sas() == []


def test_wrong_psk_fails_authentication_on_both_sides_without_revealing_it():
    a, b = make_engines(1, None, dict(psk=b"another-secret-key"))
    net = SimNet({A_ADDR: a, B_ADDR: b})
    a.start(net.now)
    net.run(3)
    (fb,) = of(net, B_ADDR, ev.AuthFailed)
    (fa,) = of(net, A_ADDR, ev.AuthFailed)
    assert "pre-shared key" in fb.reason and "a.example.net" in fb.reason
    assert "AUTHENTICATION_FAILED" in fa.reason
    for e in net.events[A_ADDR] + net.events[B_ADDR]:
        assert PSK.decode() not in repr(e) and "another-secret" not in repr(e)
    assert not of(net, A_ADDR, ev.ChildSaInstalled) and not of(net, B_ADDR, ev.ChildSaInstalled)
    assert a.sas() == [] and b.sas() == []


def test_auth_failure_is_retried_with_backoff_not_hammered():
    a, b = make_engines(1, None, dict(psk=b"another-secret-key"))
    net = SimNet({A_ADDR: a, B_ADDR: b})
    a.start(net.now)
    net.run(60)
    attempts = len(of(net, A_ADDR, ev.AuthFailed))
    assert 2 <= attempts <= 5     # 5 s, 10 s, 20 s, 40 s back-off (with jitter)


def test_remote_identity_mismatch_is_refused():
    net = up(a_kw=dict(remote_id=Identity.parse("c.example.net")), run=3)
    assert of(net, B_ADDR, ev.AuthFailed)
    assert not of(net, B_ADDR, ev.IkeSaUp)


@pytest.mark.parametrize("a_id,b_id", [
    ("192.0.2.1", "192.0.2.2"),
    ("2001:db8::a", "2001:db8::b"),
    ("a.example.net", "b.example.net"),
    ("alice@example.net", "bob@example.net"),
    ("C=CH, O=Isthmus, CN=a", "C=CH, O=Isthmus, CN=b"),
])
def test_identity_types(a_id, b_id):
    ia, ib = Identity.parse(a_id), Identity.parse(b_id)
    net = up(a_kw=dict(local_id=ia, remote_id=ib), b_kw=dict(local_id=ib, remote_id=ia))
    assert installed_pair_ok(net) == []
    (ua,) = of(net, A_ADDR, ev.IkeSaUp)
    assert ua.remote_id == str(ib)


def test_responder_without_remote_id_accepts_any_identity():
    net = up(b_kw=dict(remote_id=None))
    assert installed_pair_ok(net) == []
    assert of(net, B_ADDR, ev.IkeSaUp)[0].remote_id == "a.example.net"


def test_ts_unacceptable_in_ike_auth_keeps_the_ike_sa():
    net = up(a_kw=dict(local_ts=("10.1.0.0/16",), remote_ts=("10.2.0.0/16",)),
             b_kw=dict(local_ts=("10.9.0.0/16",), remote_ts=("10.1.0.0/16",)), run=3)
    assert of(net, A_ADDR, ev.IkeSaUp) and of(net, A_ADDR, ev.ChildSaFailed)
    assert "TS_UNACCEPTABLE" in of(net, A_ADDR, ev.ChildSaFailed)[0].reason
    assert not of(net, A_ADDR, ev.ChildSaInstalled)


def test_traffic_selectors_are_narrowed_by_the_responder():
    net = up(b_kw=dict(local_ts=("10.2.0.0/16",), remote_ts=("0.0.0.0/0",)))
    assert installed_pair_ok(net) == []
    sa = net.engines[A_ADDR].current_sa("to-b")
    (child,) = sa.children
    assert [str(t) for t in child.ts_r] == ["10.2.0.0/16"]
    assert [str(t) for t in child.ts_i] == ["0.0.0.0/0"]


# ------------------------------------------------------------------ rekeying


def _rekey_child(net: SimNet, ip: str, name: str) -> None:
    net.engines[ip].rekey_child(name, net.now)
    net.run(10)


@pytest.mark.parametrize("side", [A_ADDR, B_ADDR])
def test_child_rekey_make_before_break(side):
    net = up()
    (old,) = of(net, A_ADDR, ev.ChildSaInstalled)
    _rekey_child(net, side, "to-b" if side == A_ADDR else "to-a")
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
    assert net.traffic_gaps == 0
    other = B_ADDR if side == A_ADDR else A_ADDR
    assert kinds(net, side)[2:] == ["ChildSaInstalled", "ChildSaRekeyed", "ChildSaOutboundRemoved",
                                    "ChildSaDeleted"]
    assert kinds(net, other)[2:] == ["ChildSaInstalled", "ChildSaRekeyed", "ChildSaOutboundInstalled",
                                     "ChildSaDeleted"]
    new_inst = of(net, other, ev.ChildSaInstalled)[1]
    assert not new_inst.outbound and new_inst.if_id == 42
    (rk,) = of(net, A_ADDR, ev.ChildSaRekeyed)
    assert (rk.old_spi_in, rk.old_spi_out) == (old.spi_in, old.spi_out)
    (dl,) = of(net, A_ADDR, ev.ChildSaDeleted)
    assert (dl.spi_in, dl.spi_out) == (old.spi_in, old.spi_out)


def test_child_rekey_with_pfs():
    net = up(a_kw=dict(esp="aes256gcm16-x25519"), b_kw=dict(esp="aes256gcm16-x25519"))
    sa = net.engines[A_ADDR].current_sa("to-b")
    first_keys = sa.children[0].keys
    _rekey_child(net, A_ADDR, "to-b")
    assert installed_pair_ok(net) == []
    (child,) = net.engines[A_ADDR].current_sa("to-b").children
    assert any(t.type == 4 and t.id == 31 for t in child.proposal.transforms)   # DH x25519 negotiated
    assert child.keys.ei != first_keys.ei


def test_child_rekey_pfs_group_mismatch_is_resolved_with_invalid_ke():
    net = up(a_kw=dict(esp="aes256gcm16-x25519-ecp256"), b_kw=dict(esp="aes256gcm16-ecp256"))
    _rekey_child(net, A_ADDR, "to-b")
    assert installed_pair_ok(net) == []
    (child,) = net.engines[A_ADDR].current_sa("to-b").children
    assert any(t.type == 4 and t.id == 19 for t in child.proposal.transforms)


@pytest.mark.parametrize("side", [A_ADDR, B_ADDR])
def test_ike_rekey_moves_the_child_sa(side):
    net = up()
    old_ike = net.engines[A_ADDR].current_sa("to-b")
    old_spis = (old_ike.spi_i, old_ike.spi_r)
    net.engines[side].rekey_ike("to-b" if side == A_ADDR else "to-a", net.now)
    net.run(10)
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
    assert kinds(net, A_ADDR)[2:] == ["IkeSaRekeyed"] and kinds(net, B_ADDR)[2:] == ["IkeSaRekeyed"]
    (rk,) = of(net, A_ADDR, ev.IkeSaRekeyed)
    assert (rk.old_spi_i, rk.old_spi_r) == old_spis
    new = net.engines[A_ADDR].current_sa("to-b")
    assert (new.spi_i, new.spi_r) == (rk.new_spi_i, rk.new_spi_r)
    assert new.initiator == (side == A_ADDR)
    # the new IKE SA works: rekey the child over it
    _rekey_child(net, B_ADDR, "to-a")
    assert installed_pair_ok(net) == []


def test_lifetimes_drive_rekeys_with_jitter():
    kw = dict(child_lifetime=600, ike_lifetime=1800)
    net = up(a_kw=kw, b_kw=dict(kw))
    net.run(4000)
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
    assert net.traffic_gaps == 0
    n_child = len(of(net, A_ADDR, ev.ChildSaRekeyed))
    n_ike = len(of(net, A_ADDR, ev.IkeSaRekeyed))
    assert n_child >= 6 and n_ike >= 2
    assert not of(net, A_ADDR, ev.IkeSaDown) and not of(net, A_ADDR, ev.PeerDead)


# ------------------------------------------------------------------ delete


def test_terminate_deletes_everything_and_does_not_reconnect():
    net = up()
    net.engines[A_ADDR].terminate("to-b", net.now)
    net.run(60)
    for ip in (A_ADDR, B_ADDR):
        assert kinds(net, ip)[2:] == ["ChildSaDeleted", "IkeSaDown"]
        assert net.engines[ip].sas() == []
        assert net.planes[ip].inbound == {} and net.planes[ip].outbound == {}


def test_peer_deleting_the_ike_sa_makes_the_initiator_reconnect():
    net = up()
    net.engines[B_ADDR].terminate("to-a", net.now)
    net.run(60)
    assert kinds(net, A_ADDR)[2:4] == ["ChildSaDeleted", "IkeSaDown"]
    # A (start=True) comes back; B accepts it as responder
    assert kinds(net, A_ADDR)[4:] == ["IkeSaUp", "ChildSaInstalled"]
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []


def test_simultaneous_ike_sa_deletes():
    net = up()
    net.engines[A_ADDR].terminate("to-b", net.now)
    net.engines[B_ADDR].terminate("to-a", net.now)
    net.run(60)
    for ip in (A_ADDR, B_ADDR):
        assert kinds(net, ip)[2:] == ["ChildSaDeleted", "IkeSaDown"]
        assert net.engines[ip].sas() == []


# ------------------------------------------------------------------ DPD


def _partition(net: SimNet, start: float, end: float) -> None:
    net.faults.drop = lambda d, n: start <= net.now < end


@pytest.mark.parametrize("action", ["restart", "clear", "hold"])
def test_dpd_detects_a_dead_peer(action):
    dpd = DpdConfig(interval=10, timeout=30, action=action)
    net = up(a_kw=dict(dpd=dpd))
    t0 = net.now
    _partition(net, t0, t0 + 60)
    net.run(40)
    (pd,) = of(net, A_ADDR, ev.PeerDead)
    assert pd.action == action
    assert kinds(net, A_ADDR)[2:5] == ["PeerDead", "ChildSaDeleted", "IkeSaDown"]
    net.run(200)
    if action == "restart":
        # A re-initiated; once the path is back, B takes the new IKE SA (INITIAL_CONTACT
        # replaces its stale one) and both end with one IKE SA and one pair.
        assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
        assert of(net, B_ADDR, ev.IkeSaDown)
    else:
        assert net.engines[A_ADDR].sas() == []
        net.engines[A_ADDR].connect("to-b", net.now)
        net.run(30)
        assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []


def test_dpd_probe_is_an_empty_informational():
    net = up(a_kw=dict(dpd=DpdConfig(interval=10, timeout=30)), run=3)
    n = len(net.delivered)
    net.run(9)
    assert exchanges(net)[n:] == [("INFORMATIONAL", "request", 2), ("INFORMATIONAL", "response", 2)]
    assert not of(net, A_ADDR, ev.PeerDead)


# ------------------------------------------------------------------ reliability (§2.1-2.4)


def test_lost_ike_sa_init_is_retransmitted_with_back_off():
    sent: list[float] = []

    def drop(d, n):
        h = M.parse_header(d.data)
        if h.exchange_type == ExchangeType.IKE_SA_INIT and not h.is_response:
            sent.append(net.now)
            return len(sent) <= 3
        return False

    a, b = make_engines()
    net = SimNet({A_ADDR: a, B_ADDR: b}, Faults(drop=drop))
    a.start(net.now)
    net.run(60)
    gaps = [round(y - x, 2) for x, y in zip(sent, sent[1:])]
    assert gaps == [4.0, 7.2, 12.96]
    assert installed_pair_ok(net) == []


def test_give_up_after_the_retransmission_limit():
    a, b = make_engines()
    net = SimNet({A_ADDR: a, B_ADDR: b}, Faults(drop=lambda d, n: d.dst[0] == B_ADDR))
    a.start(net.now)
    net.run(4 * (1 + 1.8 + 1.8**2 + 1.8**3 + 1.8**4 + 1.8**5) - 1)
    assert not of(net, A_ADDR, ev.IkeSaFailed)
    net.run(2)
    (f,) = of(net, A_ADDR, ev.IkeSaFailed)
    assert "retransmissions" in f.reason
    sends = [t for t, d in net.delivered]  # nothing delivered: all dropped
    assert sends == []


def test_retransmitted_request_is_answered_from_the_cache():
    # duplicate every datagram: each request arrives twice
    net = up(faults=Faults([(2, 0.0)] * 4))
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
    assert kinds(net, B_ADDR) == ["IkeSaUp", "ChildSaInstalled"]
    auth_responses = [d.data for _t, d in net.delivered
                      if M.parse_header(d.data).exchange_type == ExchangeType.IKE_AUTH
                      and M.parse_header(d.data).is_response]
    assert len(auth_responses) >= 2 and len(set(auth_responses)) == 1


def test_response_without_a_request_is_dropped():
    net = up()
    # replay B's IKE_AUTH response to A later: A has no request outstanding with that ID
    resp = next(d for _t, d in net.delivered if M.parse_header(d.data).exchange_type == ExchangeType.IKE_AUTH
                and M.parse_header(d.data).is_response)
    before = list(net.events[A_ADDR])
    net.engines[A_ADDR].receive_datagram(resp.data, resp.src, resp.dst, net.now)
    net.run(1)
    assert net.events[A_ADDR] == before and net.engines[A_ADDR].datagrams_to_send() == []


def test_half_open_sa_expires():
    a, b = make_engines()
    net = SimNet({A_ADDR: a, B_ADDR: b}, Faults(drop=lambda d, n: n > 0 and d.dst[0] == B_ADDR))
    a.start(net.now)
    net.run(1)
    assert len(b.sas()) == 1
    net.run(31)
    assert b.sas() == []
    assert of(net, B_ADDR, ev.IkeSaFailed)


def test_unsupported_critical_payload_is_answered():
    b = IkeEngine([tunnel("b")], random=__import__("random").Random(3).randbytes)
    msg = M.Message(b"I" * 8, bytes(8), ExchangeType.IKE_SA_INIT, 0, False, True,
                    [M.Unknown(200, False, b"x")])
    data = bytearray(M.encode_message(msg))
    data[M.IKE_HEADER_LEN + 1] = 0x80
    b.receive_datagram(bytes(data), (A_ADDR, 500), (B_ADDR, 500), 0.0)
    (d,) = b.datagrams_to_send()
    reply, _ = M.parse_message(d.data)
    n = reply.notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD)
    assert n is not None and n.data == bytes([200]) and reply.is_response


def test_newer_major_version_is_answered():
    b = IkeEngine([tunnel("b")], random=__import__("random").Random(3).randbytes)
    msg = M.Message(b"I" * 8, bytes(8), ExchangeType.IKE_SA_INIT, 0, False, True, [])
    data = bytearray(M.encode_message(msg))
    data[17] = 0x30
    b.receive_datagram(bytes(data), (A_ADDR, 500), (B_ADDR, 500), 0.0)
    (d,) = b.datagrams_to_send()
    reply, _ = M.parse_message(d.data)
    assert reply.notify(NotifyType.INVALID_MAJOR_VERSION) is not None


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_datagrams_never_raise_out_of_the_engine(data):
    net = up()
    originals = [d for _t, d in net.delivered]
    d = data.draw(st.sampled_from(originals))
    raw = bytearray(d.data)
    for _ in range(data.draw(st.integers(1, 5))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    net.engines[d.dst[0]].receive_datagram(bytes(raw), d.src, d.dst, net.now)
    net.run(5)
    assert installed_pair_ok(net) == []


def test_no_secret_in_reprs():
    net = up()
    sa = net.engines[A_ADDR].current_sa("to-b")
    texts = [repr(e) for e in net.events[A_ADDR]] + [repr(sa.keys), repr(sa.children[0]),
                                                      repr(tunnel("a"))]
    secrets = [sa.keys.SK_d, sa.keys.SK_ei, sa.children[0].keys.ei]
    for t in texts:
        assert PSK.decode() not in t
        for s in secrets:
            assert s.hex() not in t and repr(s) not in t


# ------------------------------------------------------------------ NAT detection (§2.23)


def test_nat_detection_floats_to_4500_and_encapsulates():
    import random as _r

    private, public = "10.0.0.1", "198.51.100.1"
    ta = tunnel("a", local_addr=private)
    tb = tunnel("b", remote_addr=public)
    a = IkeEngine([ta], random=_r.Random(1).randbytes)
    b = IkeEngine([tb], random=_r.Random(2).randbytes)
    nat = {(private, 500): (public, 40500), (private, 4500): (public, 41500)}
    net = SimNet({private: a, B_ADDR: b}, nat=nat)
    a.start(net.now)
    net.run(5)
    (ca,), (cb,) = of(net, private, ev.ChildSaInstalled), of(net, B_ADDR, ev.ChildSaInstalled)
    assert ca.udp_encap and cb.udp_encap
    assert (ca.local_addr, ca.local_port, ca.remote_addr, ca.remote_port) == (private, 4500, B_ADDR, 4500)
    assert (cb.local_addr, cb.local_port, cb.remote_addr, cb.remote_port) == (B_ADDR, 4500, public, 41500)
    sa_a, sa_b = a.current_sa("to-b"), b.current_sa("to-a")
    assert (sa_a.nat_local, sa_a.nat_remote) == (True, False)
    assert (sa_b.nat_local, sa_b.nat_remote) == (False, True)
    # IKE_SA_INIT on 500, everything after on 4500
    ports = [(M.parse_header(d.data).exchange_type, d.dst[1]) for _t, d in net.delivered]
    assert ports[:2] == [(ExchangeType.IKE_SA_INIT, 500)] * 2
    assert all(p in (4500, 41500) for _x, p in ports[2:])
    # a rekey keeps working through the NAT
    b.rekey_child("to-a", net.now)
    net.run(5)
    assert len(of(net, private, ev.ChildSaRekeyed)) == 1


def test_no_nat_no_encapsulation():
    net = up()
    (ca,) = of(net, A_ADDR, ev.ChildSaInstalled)
    assert not ca.udp_encap and ca.remote_port == 500


def test_initiator_retries_with_the_cookie_it_is_given():
    """§2.6: a responder under load answers IKE_SA_INIT with a COOKIE; the initiator repeats its
    request with that COOKIE as the first payload."""
    import random as _r

    a = IkeEngine([tunnel("a")], random=_r.Random(1).randbytes)
    a.start(0.0)
    (first,) = a.datagrams_to_send()
    req, _ = M.parse_message(first.data)
    cookie = M.Message(req.spi_i, bytes(8), ExchangeType.IKE_SA_INIT, 0, True, False,
                       [M.Notify(NotifyType.COOKIE, data=b"C" * 16)])
    a.receive_datagram(M.encode_message(cookie), first.dst, first.src, 0.1)
    (second,) = a.datagrams_to_send()
    again, _ = M.parse_message(second.data)
    assert again.message_id == 0 and again.spi_i == req.spi_i
    assert isinstance(again.payloads[0], M.Notify) and again.payloads[0].notify_type == NotifyType.COOKIE
    assert again.payloads[0].data == b"C" * 16
    assert [type(p) for p in again.payloads[1:4]] == [M.SA, M.KE, M.Nonce]
