"""Issue 12, part A: defects 1, 2, 3, 4 and 11 of the review, each driven through the engines'
public API (receive_datagram, handle_timer, datagrams_to_send, next_event, get_timer, commands).

RFC 7296 §2.21: only a message whose integrity check verifies may change state. Every test
here failed on 50dafe3.
"""

from __future__ import annotations

import logging
import struct

import pytest

from appliance.ike import events as ev
from appliance.ike import message as M
from appliance.ike.constants import ExchangeType, IdType, NotifyType, PayloadType, ProtocolId
from appliance.ike.engine import IkeEngine
from appliance.ike.policy import DpdConfig, Identity
from appliance.ike.proposals import Proposal, parse_proposals
from tests.unit.ike.simnet import (
    A_ADDR,
    B_ADDR,
    SimNet,
    installed_pair_ok,
    make_engines,
    one_ike_sa_each,
    tunnel,
)

ATTACKER = ("203.0.113.9", 500)
T0 = 1000.0


def _up(seed: int = 1, a_kw=None, b_kw=None, run: float = 3) -> SimNet:
    a, b = make_engines(seed, a_kw, b_kw)
    net = SimNet({A_ADDR: a, B_ADDR: b}, now=T0)
    a.start(net.now)
    b.start(net.now)
    net.run(run)
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
    return net


def _of(net: SimNet, ip: str, cls) -> list:
    return [e for e in net.events[ip] if isinstance(e, cls)]


def _drain(engine: IkeEngine) -> list:
    out = []
    while (e := engine.next_event()) is not None:
        out.append(e)
    return out


def _forge(spi_i: bytes, spi_r: bytes, xchg: int, mid: int, *, response: bool,
           from_initiator: bool, body: bytes) -> bytes:
    """A datagram anyone who saw the SPIs can send: IKE header + SK payload holding `body`
    (no keys needed)."""
    flags = (0x20 if response else 0) | (0x08 if from_initiator else 0)
    sk = struct.pack("!BBH", 0, 0, 4 + len(body)) + body
    return spi_i + spi_r + struct.pack("!BBBBII", PayloadType.SK, 0x20, xchg, flags, mid,
                                       M.IKE_HEADER_LEN + len(sk)) + sk


def _ike_sa_init_only(a_kw=None, b_kw=None):
    """A and B after IKE_SA_INIT; A's IKE_AUTH request is returned, not delivered."""
    a, b = make_engines(1, a_kw, b_kw)
    a.start(T0)
    (init,) = a.datagrams_to_send()
    b.receive_datagram(init.data, init.src, init.dst, T0)
    (init_r,) = b.datagrams_to_send()
    a.receive_datagram(init_r.data, init_r.src, init_r.dst, T0)
    (auth,) = a.datagrams_to_send()
    assert M.parse_header(auth.data).exchange_type == ExchangeType.IKE_AUTH
    return a, b, auth


def _finish(a: IkeEngine, b: IkeEngine, held) -> SimNet:
    """Deliver the held datagram and let the genuine conversation run on."""
    net = SimNet({A_ADDR: a, B_ADDR: b}, now=T0)
    net.engines[held.dst[0]].receive_datagram(held.data, held.src, held.dst, net.now)
    net.run(5)
    return net


# ------------------------------------------------------------------ defect 1: forged responses


@pytest.mark.parametrize("body", [b"", bytes(8), bytes(23)], ids=["empty", "8", "23"])
def test_1_forged_short_sk_response_leaves_the_pending_exchange_alone(body):
    """A header + a too-short SK body matching our outstanding request's message ID must be
    dropped like an ICV failure: no PeerDead, no IkeSaDown, the exchange still completes."""
    net = _up()
    a, b = net.engines[A_ADDR], net.engines[B_ADDR]
    a.rekey_child("to-b", net.now)
    (req,) = a.datagrams_to_send()
    h = M.parse_header(req.data)
    timer = a.get_timer()
    a.receive_datagram(_forge(h.spi_i, h.spi_r, h.exchange_type, h.message_id, response=True,
                              from_initiator=False, body=body), (B_ADDR, 500), (A_ADDR, 500), net.now)
    assert _drain(a) == [] and a.datagrams_to_send() == [] and a.get_timer() == timer
    b.receive_datagram(req.data, req.src, req.dst, net.now)
    net.run(5)
    assert len(_of(net, A_ADDR, ev.ChildSaRekeyed)) == 1
    assert not _of(net, A_ADDR, ev.PeerDead) and not _of(net, A_ADDR, ev.IkeSaDown)
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []


def test_1_forged_short_sk_ike_auth_response_does_not_fail_the_initiator():
    a, b, auth = _ike_sa_init_only()
    h = M.parse_header(auth.data)
    a.receive_datagram(_forge(h.spi_i, h.spi_r, ExchangeType.IKE_AUTH, 1, response=True,
                              from_initiator=False, body=bytes(8)), (B_ADDR, 500), (A_ADDR, 500), T0)
    assert _drain(a) == [] and a.datagrams_to_send() == []
    net = _finish(a, b, auth)
    assert [type(e).__name__ for e in net.events[A_ADDR]] == ["IkeSaUp", "ChildSaInstalled"]
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []


# ------------------------------------------------------------------ defect 2: forged requests


@pytest.mark.parametrize("body", [b"", bytes(8)], ids=["empty", "8"])
def test_2_forged_short_sk_requests_change_nothing(body):
    """No INVALID_SYNTAX to the forged source, no message ID consumed, no liveness credit:
    the peer's next genuine requests still get through."""
    net = _up(b_kw=dict(dpd=DpdConfig(interval=10, timeout=30, action="restart")))
    a, b = net.engines[A_ADDR], net.engines[B_ADDR]
    (sa,) = b.sas()
    timer = b.get_timer()
    for mid in (2, 3):
        b.receive_datagram(_forge(sa.spi_i, sa.spi_r, ExchangeType.INFORMATIONAL, mid, response=False,
                                  from_initiator=True, body=body), ATTACKER, (B_ADDR, 500), net.now + 1)
    assert b.datagrams_to_send() == [] and _drain(b) == []
    assert b.get_timer() == timer        # the DPD probe is not put off (no last_heard refresh)
    a.rekey_child("to-b", net.now)
    net.run(5)
    assert len(_of(net, A_ADDR, ev.ChildSaRekeyed)) == 1 and len(_of(net, B_ADDR, ev.ChildSaRekeyed)) == 1
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []


def test_2_forged_short_sk_ike_auth_request_does_not_take_the_genuine_ones_place():
    a, b, auth = _ike_sa_init_only()
    h = M.parse_header(auth.data)
    b.receive_datagram(_forge(h.spi_i, h.spi_r, ExchangeType.IKE_AUTH, 1, response=False,
                              from_initiator=True, body=bytes(8)), ATTACKER, (B_ADDR, 500), T0)
    assert b.datagrams_to_send() == [] and _drain(b) == []
    net = _finish(a, b, auth)
    assert [type(e).__name__ for e in net.events[B_ADDR]] == ["IkeSaUp", "ChildSaInstalled"]
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []


def test_2_authentic_but_malformed_request_still_gets_invalid_syntax():
    """The other side of the separation: after the ICV verified, a malformed plaintext is
    answered with INVALID_SYNTAX (§2.21.2) and consumes its message ID."""
    net = _up()
    a, b = net.engines[A_ADDR], net.engines[B_ADDR]
    sa_a = a.current_sa("to-b")
    bad = M.Message(sa_a.spi_i, sa_a.spi_r, ExchangeType.INFORMATIONAL, 2, False, True,
                    [M.Nonce(b"x")], encrypted=True)     # a 1-octet nonce: fails only once decrypted
    b.receive_datagram(M.encode_message(bad, sa_a.cipher_out, bytes(sa_a.cipher_out.iv_size)),
                       (A_ADDR, 500), (B_ADDR, 500), net.now)
    (d,) = b.datagrams_to_send()
    hdr = M.parse_header(d.data)
    outer, enc = M.parse_message(d.data)
    reply = M.decrypt_message(d.data, outer, enc, sa_a.cipher_in)
    assert hdr.is_response and hdr.message_id == 2
    assert reply.notify(NotifyType.INVALID_SYNTAX) is not None


# ------------------------------------------------------------------ defect 3: before IKE_AUTH


def _ike_proposal(spi: bytes) -> Proposal:
    (p,) = parse_proposals(["aes256gcm16-prfsha384-x25519"], "ike")
    return Proposal(ProtocolId.IKE, p.transforms, 1, spi)


def _esp_proposal(spi: bytes) -> Proposal:
    (p,) = parse_proposals(["aes256gcm16"], "esp")
    return Proposal(ProtocolId.ESP, p.transforms, 1, spi)


_ANY = [M.TrafficSelector.any(4)]
_EARLY_REQUESTS = {
    "ike-rekey": (ExchangeType.CREATE_CHILD_SA,
                  lambda: [M.SA([_ike_proposal(b"R" * 8)]), M.Nonce(b"n" * 32), M.KE(31, b"k" * 32)]),
    "new-child": (ExchangeType.CREATE_CHILD_SA,
                  lambda: [M.SA([_esp_proposal(b"ESP1")]), M.Nonce(b"n" * 32), M.TSi(_ANY), M.TSr(_ANY)]),
    "delete-ike": (ExchangeType.INFORMATIONAL, lambda: [M.Delete(ProtocolId.IKE, [])]),
    "empty-informational": (ExchangeType.INFORMATIONAL, lambda: []),
}


@pytest.mark.parametrize("kind", list(_EARLY_REQUESTS))
def test_3_responder_refuses_requests_other_than_ike_auth_before_it(kind):
    """With IKE_SA_INIT done (anyone can do that with a tunnel open to any address), an
    encrypted request other than IKE_AUTH raises nothing, gets no answer and the half-open SA
    of the peer that broke the protocol is dropped (strongSwan: "received CREATE_CHILD_SA
    request for unestablished IKE_SA, rejected", IKE SA destroyed)."""
    a, b, _auth = _ike_sa_init_only()
    (sa_a,) = a.sas()
    xchg, payloads = _EARLY_REQUESTS[kind]
    msg = M.Message(sa_a.spi_i, sa_a.spi_r, xchg, 1, False, True, payloads(), encrypted=True)
    data = M.encode_message(msg, sa_a.cipher_out, bytes(sa_a.cipher_out.iv_size))
    b.receive_datagram(data, (A_ADDR, 500), (B_ADDR, 500), T0)
    assert b.datagrams_to_send() == []
    assert b.sas() == []
    assert not [e for e in _drain(b) if isinstance(e, (ev.IkeSaUp, ev.ChildSaInstalled))]


def test_3_initiator_ignores_requests_before_its_ike_auth_completes():
    a, b, auth = _ike_sa_init_only()
    (sa_b,) = b.sas()
    msg = M.Message(sa_b.spi_i, sa_b.spi_r, ExchangeType.INFORMATIONAL, 0, False, False,
                    [M.Delete(ProtocolId.IKE, [])], encrypted=True)
    a.receive_datagram(M.encode_message(msg, sa_b.cipher_out, bytes(sa_b.cipher_out.iv_size)),
                       (B_ADDR, 500), (A_ADDR, 500), T0)
    assert a.datagrams_to_send() == [] and _drain(a) == []
    net = _finish(a, b, auth)
    assert [type(e).__name__ for e in net.events[A_ADDR]] == ["IkeSaUp", "ChildSaInstalled"]
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []


@pytest.mark.parametrize("who", ["responder", "initiator"])
def test_3_a_half_open_sa_is_terminated_without_a_delete(who):
    """Found in the lab (reload removing a tunnel during IKE_AUTH): the initiator ignores
    requests before IKE_AUTH, so a DELETE for a half-open SA is never answered and the side
    that sent it kept a "deleting" SA retransmitting, its tunnel never down. Before IKE_AUTH
    completes there is nothing the peer could delete: the SA goes at once, silently (as in
    strongSwan), and the genuine IKE_AUTH that arrives afterwards changes nothing."""
    a, b, auth = _ike_sa_init_only()
    side, name = (b, "to-a") if who == "responder" else (a, "to-b")
    side.terminate(name, T0)
    assert side.datagrams_to_send() == []
    assert side.sas() == []
    assert [e for e in _drain(side) if isinstance(e, (ev.IkeSaUp, ev.ChildSaInstalled))] == []
    assert side.sas(name) == []
    net = SimNet({A_ADDR: a, B_ADDR: b}, now=T0)
    if who == "responder":
        b.receive_datagram(auth.data, auth.src, auth.dst, net.now)
    net.run(120)
    assert net.planes[A_ADDR].inbound == {} and net.planes[B_ADDR].inbound == {}
    assert b.sas() == [] or who == "initiator"
    assert not _of(net, A_ADDR, ev.ChildSaInstalled) and not _of(net, B_ADDR, ev.ChildSaInstalled)


def test_3_reload_between_ike_sa_init_and_ike_auth_completes_on_the_new_configuration():
    """Found in the lab (both sides reload a changed tunnel at once): the responder's half-open
    SA is not bound to a tunnel yet, so removing and re-adding the tunnel keeps it and its
    IKE_AUTH is matched against the tunnel as configured now (here: a new ESP proposal)."""
    a, b, auth = _ike_sa_init_only(a_kw=dict(esp="aes128gcm16"), b_kw=dict(esp="aes256gcm16"))
    b.remove_tunnel("to-a", T0)
    b.add_tunnel(tunnel("b", esp="aes128gcm16"))
    assert b.datagrams_to_send() == [] and len(b.sas()) == 1
    net = _finish(a, b, auth)
    assert [type(e).__name__ for e in net.events[A_ADDR]] == ["IkeSaUp", "ChildSaInstalled"]
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []


def test_3_removing_the_tunnel_of_a_half_open_responder_sa_refuses_its_ike_auth():
    a, b, auth = _ike_sa_init_only()
    b.remove_tunnel("to-a", T0)
    assert b.datagrams_to_send() == []
    b.receive_datagram(auth.data, auth.src, auth.dst, T0 + 0.1)
    (answer,) = b.datagrams_to_send()
    a.receive_datagram(answer.data, answer.src, answer.dst, T0 + 0.1)
    failed = [e for e in _drain(a) if isinstance(e, (ev.AuthFailed, ev.IkeSaFailed))]
    assert failed and a.sas() == [] and b.sas() == []


def test_3_no_assert_guards_input_dependent_state():
    import pathlib

    import appliance.ike

    root = pathlib.Path(appliance.ike.__file__).parent
    found = [f"{p.name}:{n}" for p in sorted(root.glob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if line.strip().startswith("assert ")]
    assert found == []


# ------------------------------------------------------------------ defect 4: address updates


def test_4_replayed_request_neither_moves_the_peer_nor_counts_as_liveness():
    net = _up(b_kw=dict(dpd=DpdConfig(interval=10, timeout=30, action="restart")))
    b = net.engines[B_ADDR]
    auth_req = next(d for _t, d in net.delivered
                    if M.parse_header(d.data).exchange_type == ExchangeType.IKE_AUTH
                    and not M.parse_header(d.data).is_response)
    timer = b.get_timer()
    b.receive_datagram(auth_req.data, ATTACKER, (B_ADDR, 500), net.now + 5)
    # a retransmission is answered from the cache where it came from (§2.1), nothing else
    assert [d.dst for d in b.datagrams_to_send()] == [ATTACKER]
    assert b.get_timer() == timer
    b.rekey_child("to-a", net.now + 5)
    (d,) = b.datagrams_to_send()
    assert d.dst == (A_ADDR, 500)


def test_4_dpd_fires_although_the_last_request_is_replayed():
    dpd = DpdConfig(interval=10, timeout=30, action="clear")
    net = _up(b_kw=dict(dpd=dpd))
    b = net.engines[B_ADDR]
    auth_req = next(d for _t, d in net.delivered
                    if M.parse_header(d.data).exchange_type == ExchangeType.IKE_AUTH
                    and not M.parse_header(d.data).is_response)
    net.faults.drop = lambda d, n: True          # A is gone
    for _ in range(24):                          # the replay every 5 s for 120 s
        net.run(5)
        b.receive_datagram(auth_req.data, ATTACKER, (B_ADDR, 500), net.now)
    assert _of(net, B_ADDR, ev.PeerDead)


def test_4_new_request_from_elsewhere_does_not_move_the_peer_without_a_nat():
    net = _up()
    a, b = net.engines[A_ADDR], net.engines[B_ADDR]
    a.rekey_child("to-b", net.now)
    (req,) = a.datagrams_to_send()
    b.receive_datagram(req.data, ATTACKER, req.dst, net.now)
    assert [d.dst for d in b.datagrams_to_send()] == [ATTACKER]   # §2.11: answered where asked
    b.rekey_ike("to-a", net.now)
    (d,) = b.datagrams_to_send()
    assert d.dst == (A_ADDR, 500)


def _nat_up():
    import random as _r

    private, public = "10.0.0.1", "198.51.100.1"
    a = IkeEngine([tunnel("a", local_addr=private)], random=_r.Random(1).randbytes)
    b = IkeEngine([tunnel("b", remote_addr=public)], random=_r.Random(2).randbytes)
    nat = {(private, 500): (public, 40500), (private, 4500): (public, 41500)}
    net = SimNet({private: a, B_ADDR: b}, nat=nat, now=T0)
    a.start(net.now)
    net.run(5)
    assert a.current_sa("to-b").nat_local and b.current_sa("to-a").nat_remote
    return net, a, b, private, public


def test_4_the_side_behind_a_nat_never_follows_a_new_source():
    net, a, b, private, _public = _nat_up()
    b.rekey_ike("to-a", net.now)
    (req,) = b.datagrams_to_send()
    a.receive_datagram(req.data, ("203.0.113.9", 4500), (private, 4500), net.now)
    a.datagrams_to_send()
    a.rekey_child("to-b", net.now + 1)
    out = a.datagrams_to_send()
    assert out and all(d.dst == (B_ADDR, 4500) for d in out)


def test_4_the_side_not_behind_the_nat_follows_a_new_mapping():
    net, a, b, _private, public = _nat_up()
    a.rekey_ike("to-b", net.now)
    (req,) = a.datagrams_to_send()
    b.receive_datagram(req.data, (public, 42000), req.dst, net.now)
    (resp,) = b.datagrams_to_send()
    assert resp.dst == (public, 42000)
    net.engines[public] = a   # nothing routes there; just see where B sends next
    b.rekey_child("to-a", net.now + 1)
    assert [d.dst for d in b.datagrams_to_send()] == [(public, 42000)]


# ------------------------------------------------------------------ defect 11


def _init_request(engine: IkeEngine):
    engine.start(T0)
    (init,) = engine.datagrams_to_send()
    msg, _ = M.parse_message(init.data)
    return init, msg


def _reencode(msg: M.Message, **changes) -> bytes:
    fields = dict(spi_i=msg.spi_i, spi_r=msg.spi_r, exchange_type=msg.exchange_type,
                  message_id=msg.message_id, is_response=msg.is_response,
                  is_initiator=msg.is_initiator, payloads=msg.payloads)
    fields.update(changes)
    return M.encode_message(M.Message(**fields))


@pytest.mark.parametrize("ike,nonce_len,accepted", [
    ("aes256gcm16-prfsha512-x25519", 16, False),
    ("aes256gcm16-prfsha512-x25519", 31, False),
    ("aes256gcm16-prfsha512-x25519", 32, True),
    ("aes256gcm16-prfsha384-x25519", 23, False),
    ("aes256gcm16-prfsha384-x25519", 24, True),
    ("aes128gcm16-prfsha256-x25519", 16, True),
])
def test_11a_nonce_shorter_than_half_the_prf_key_is_refused(ike, nonce_len, accepted):
    a, b = make_engines(1, dict(ike=ike), dict(ike=ike))
    init, msg = _init_request(a)
    payloads = [M.Nonce(b"N" * nonce_len) if isinstance(p, M.Nonce) else p for p in msg.payloads]
    b.receive_datagram(_reencode(msg, payloads=payloads), init.src, init.dst, T0)
    (d,) = b.datagrams_to_send()
    reply, _ = M.parse_message(d.data)
    if accepted:
        assert reply.get(M.SA) is not None and len(b.sas()) == 1
    else:
        assert reply.notify(NotifyType.INVALID_SYNTAX) is not None and reply.get(M.SA) is None
        assert b.sas() == []


def test_11a_initiator_does_not_use_a_short_nr():
    ike = "aes256gcm16-prfsha512-x25519"
    a, b = make_engines(1, dict(ike=ike), dict(ike=ike))
    init, _ = _init_request(a)
    b.receive_datagram(init.data, init.src, init.dst, T0)
    (resp,) = b.datagrams_to_send()
    msg, _ = M.parse_message(resp.data)
    payloads = [M.Nonce(b"N" * 16) if isinstance(p, M.Nonce) else p for p in msg.payloads]
    a.receive_datagram(_reencode(msg, payloads=payloads), resp.src, resp.dst, T0)
    assert [d for d in a.datagrams_to_send()
            if M.parse_header(d.data).exchange_type == ExchangeType.IKE_AUTH] == []
    assert not [e for e in _drain(a) if isinstance(e, ev.IkeSaUp)]


@pytest.mark.parametrize("kind", ["child-rekey", "new-child", "ike-rekey"])
def test_11a_short_nonce_in_create_child_sa_is_refused(kind):
    ike = "aes256gcm16-prfsha512-x25519"
    net = _up(a_kw=dict(ike=ike), b_kw=dict(ike=ike))
    a, b = net.engines[A_ADDR], net.engines[B_ADDR]
    sa_a = a.current_sa("to-b")
    short = M.Nonce(b"n" * 16)
    if kind == "ike-rekey":
        (p,) = parse_proposals([ike], "ike")
        payloads = [M.SA([Proposal(ProtocolId.IKE, p.transforms, 1, b"R" * 8)]), short, M.KE(31, b"k" * 32)]
    else:
        payloads = [M.SA([_esp_proposal(b"ESP9")]), short, M.TSi(_ANY), M.TSr(_ANY)]
        if kind == "child-rekey":
            payloads.insert(0, M.Notify(NotifyType.REKEY_SA, ProtocolId.ESP, sa_a.children[0].spi_in))
    msg = M.Message(sa_a.spi_i, sa_a.spi_r, ExchangeType.CREATE_CHILD_SA, 2, False, True, payloads,
                    encrypted=True)
    b.receive_datagram(M.encode_message(msg, sa_a.cipher_out, bytes(sa_a.cipher_out.iv_size)),
                       (A_ADDR, 500), (B_ADDR, 500), net.now)
    (d,) = b.datagrams_to_send()
    outer, enc = M.parse_message(d.data)
    reply = M.decrypt_message(d.data, outer, enc, sa_a.cipher_in)
    assert reply.notify(NotifyType.INVALID_SYNTAX) is not None and reply.get(M.SA) is None
    assert not [e for e in _drain(b) if isinstance(e, (ev.ChildSaInstalled, ev.IkeSaRekeyed))]


def test_11b_zero_spi_i_is_refused():
    a, b = make_engines()
    init, _ = _init_request(a)
    b.receive_datagram(bytes(8) + init.data[8:], init.src, init.dst, T0)
    assert b.datagrams_to_send() == [] and b.sas() == []


_EVIL = b"evil\n12:00:00.000 INFO    isthmus.ike: forged line\x1b[2J\x00\xe2\x80\xae"


def _printable(text: str) -> bool:
    return text.isprintable()


@pytest.mark.parametrize("b_remote", [None, "a.example.net"], ids=["accepted", "refused"])
def test_11c_peer_identity_is_escaped_before_any_log_line(caplog, b_remote):
    caplog.set_level(logging.DEBUG, logger="isthmus")
    evil = Identity(IdType.ID_FQDN, _EVIL)
    b_kw = dict(remote_id=Identity.parse(b_remote) if b_remote else None)
    a, b = make_engines(1, dict(local_id=evil), b_kw)
    net = SimNet({A_ADDR: a, B_ADDR: b}, now=T0)
    a.start(net.now)
    net.run(3)
    texts = [r.getMessage() for r in caplog.records]
    texts += [str(v) for e in net.events[B_ADDR] for v in vars(e).values() if isinstance(v, str)]
    bad = [t for t in texts if not _printable(t)]
    assert bad == []
    joined = "\n".join(texts)
    assert "evil?12:00:00.000 INFO    isthmus.ike: forged line?[2J??" in joined
    if b_remote is None:
        (up,) = _of(net, B_ADDR, ev.IkeSaUp)
        assert up.remote_id == "evil?12:00:00.000 INFO    isthmus.ike: forged line?[2J??"


# ------------------------------------------------------------------ leftovers of the review


def _sealed(sa, xchg: int, mid: int, *, response: bool) -> bytes:
    """An authentic message from `sa`'s side (its own keys) with an empty SK payload."""
    msg = M.Message(sa.spi_i, sa.spi_r, xchg, mid, response, sa.initiator, [], encrypted=True)
    data, *more = sa._encode_datagrams(msg)
    assert not more
    return data


def test_an_authentic_response_of_another_exchange_type_answers_nothing():
    # §1.2: the response to a CREATE_CHILD_SA request is a CREATE_CHILD_SA response; an
    # INFORMATIONAL one with the same message ID must not finish (and fail) the rekey
    net = _up()
    a, b = net.engines[A_ADDR], net.engines[B_ADDR]
    sa_a, sa_b = a.current_sa("to-b"), b.current_sa("to-a")
    a.rekey_child("to-b", net.now)
    (req,) = a.datagrams_to_send()
    assert M.parse_header(req.data).exchange_type == ExchangeType.CREATE_CHILD_SA
    forged = _sealed(sa_b, ExchangeType.INFORMATIONAL, sa_a.pending.message_id, response=True)
    a.receive_datagram(forged, req.dst, req.src, net.now)
    assert sa_a.pending is not None and not _of(net, A_ADDR, ev.ChildSaRekeyed)
    _drain(a)
    b.receive_datagram(req.data, req.src, req.dst, net.now)   # the genuine exchange goes on
    net.run(3)
    assert _of(net, A_ADDR, ev.ChildSaRekeyed) and installed_pair_ok(net) == []


def test_an_authentic_request_of_an_unknown_exchange_type_uses_up_no_message_id():
    net = _up()
    a, b = net.engines[A_ADDR], net.engines[B_ADDR]
    sa_a, sa_b = a.current_sa("to-b"), b.current_sa("to-a")
    before = sa_a.peer_mid
    odd = _sealed(sa_b, 60, sa_b.my_mid, response=False)    # 60: unassigned exchange type
    a.receive_datagram(odd, (B_ADDR, 500), (A_ADDR, 500), net.now)
    assert sa_a.peer_mid == before and a.datagrams_to_send() == []
    b.rekey_child("to-a", net.now)          # B's next genuine request carries that message ID
    net.run(3)
    assert _of(net, B_ADDR, ev.ChildSaRekeyed) and installed_pair_ok(net) == []
