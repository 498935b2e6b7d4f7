"""Issue 12, part B: defects 5-10 of the review, each driven through the engine's public API
(`receive_datagram`, `handle_timer`, `datagrams_to_send`, `next_event`, commands) in simnet."""

from __future__ import annotations

import logging
import random as _random
import time
import tracemalloc

import pytest

from appliance.ike import crypto
from appliance.ike import events as ev
from appliance.ike import message as M
from appliance.ike.constants import ExchangeType, NotifyType, ProtocolId
from appliance.ike.engine import IkeEngine
from appliance.ike.policy import DosProtection, Identity
from appliance.ike.proposals import Proposal, Transform, parse_proposals
from tests.unit.ike.simnet import (
    A_ADDR,
    B_ADDR,
    Faults,
    SimNet,
    decode,
    installed_pair_ok,
    make_engines,
    one_ike_sa_each,
    tunnel,
)

ZERO = bytes(8)


def of(net: SimNet, ip: str, cls):
    return [e for e in net.events[ip] if isinstance(e, cls)]


def drain(engine: IkeEngine) -> list:
    out = []
    while (e := engine.next_event()) is not None:
        out.append(e)
    return out


def up(seed: int = 1, a_kw=None, b_kw=None, faults=None, run: float = 30) -> SimNet:
    a, b = make_engines(seed, a_kw, b_kw)
    net = SimNet({A_ADDR: a, B_ADDR: b}, faults)
    a.start(net.now)
    b.start(net.now)
    net.run(run)
    return net


def init_request(spi_i: bytes, *, ike: str = "aes256gcm16-prfsha384-x25519", ke: bytes | None = None,
                 nonce: bytes = b"N" * 32, extra: list | None = None, proposals=None) -> bytes:
    """An IKE_SA_INIT request as any host on the internet can send it."""
    props = proposals if proposals is not None else [
        Proposal(ProtocolId.IKE, p.transforms, n) for n, p in enumerate(parse_proposals(ike, "ike"), 1)]
    if ke is None:
        ke = crypto.KeyExchange.generate(31, _random.Random(spi_i).randbytes).public_bytes
    payloads = list(extra or []) + [M.SA(props), M.KE(31, ke), M.Nonce(nonce)]
    return M.encode_message(M.Message(spi_i, ZERO, ExchangeType.IKE_SA_INIT, 0, False, True, payloads))


class DhCounter:
    """Counts key exchange computations (KeyExchange.generate) made by the code under test."""

    def __init__(self, monkeypatch) -> None:
        self.n = 0
        real = crypto.KeyExchange.generate.__func__

        def generate(cls, dh_id, random):
            self.n += 1
            return real(cls, dh_id, random)

        monkeypatch.setattr(crypto.KeyExchange, "generate", classmethod(generate))


# ------------------------------------------------------------------ 5: a tunnel's IKE proposals


def _hub(a_ike: str) -> SimNet:
    """B has two tunnels for peers at A's address: `strict` (A's identity, ecp521 only) and
    `other` (another identity, aes128-sha256-modp2048)."""
    strict = tunnel("b", name="strict", start=False, ike="aes256gcm16-prfsha512-ecp521")
    other = tunnel("b", name="other", start=False, remote_id=Identity.parse("other.example.net"),
                   ike="aes128-sha256-modp2048")
    a = IkeEngine([tunnel("a", ike=a_ike)], random=_random.Random(5).randbytes)
    b = IkeEngine([other, strict], random=_random.Random(6).randbytes)
    net = SimNet({A_ADDR: a, B_ADDR: b})
    a.start(net.now)
    net.run(3)
    return net


def test_5_a_tunnel_only_ever_gets_its_own_ike_proposals():
    # A (the peer of `strict`) prefers what only `other` accepts: B must not give `strict`
    # another tunnel's proposal.
    net = _hub("aes128-sha256-modp2048,aes256gcm16-prfsha512-ecp521")
    for e in of(net, B_ADDR, ev.IkeSaUp):
        assert not (e.tunnel == "strict" and e.proposal != "aes256gcm16-prfsha512-ecp521"), e
    assert not [e for e in of(net, B_ADDR, ev.IkeSaUp) if e.tunnel == "strict"]
    assert of(net, B_ADDR, ev.AuthFailed) and of(net, A_ADDR, ev.AuthFailed)
    assert "AUTHENTICATION_FAILED" in of(net, A_ADDR, ev.AuthFailed)[0].reason
    # offering what `strict` accepts, A connects to it with that proposal
    net = _hub("aes256gcm16-prfsha512-ecp521")
    (upb,) = of(net, B_ADDR, ev.IkeSaUp)
    assert upb.tunnel == "strict" and upb.proposal == "aes256gcm16-prfsha512-ecp521"


# ------------------------------------------------------------------ 6: the COOKIE retry


def test_6_cookie_retry_keeps_every_other_payload_and_checks_the_cookie_length():
    a, b = make_engines(7)
    a.start(0.0)
    (first,) = a.datagrams_to_send()
    req, _ = M.parse_message(first.data)

    def cookie_reply(data: bytes) -> bytes:
        return M.encode_message(M.Message(req.spi_i, ZERO, ExchangeType.IKE_SA_INIT, 0, True, False,
                                          [M.Notify(NotifyType.COOKIE, data=data)]))

    # a COOKIE of 0 or 65 octets is no cookie (§2.6: 1..64): ignored, nothing sent
    for bad in (b"", b"x" * 65):
        a.receive_datagram(cookie_reply(bad), first.dst, first.src, 0.1)
        assert a.datagrams_to_send() == []
    assert not [e for e in drain(a) if isinstance(e, ev.IkeSaFailed)]
    a.receive_datagram(cookie_reply(b"C" * 64), first.dst, first.src, 0.2)
    (second,) = a.datagrams_to_send()
    again, _ = M.parse_message(second.data)
    assert again.payloads[0].notify_type == NotifyType.COOKIE and again.payloads[0].data == b"C" * 64
    # §2.6: "with all other payloads unchanged" (libreswan binds its cookie to Ni)
    assert again.payloads[1:] == req.payloads
    assert again.get(M.Nonce).data == req.get(M.Nonce).data
    assert again.get(M.KE).data == req.get(M.KE).data
    # and the conversation completes with a genuine responder (which ignores a cookie it
    # did not ask for) from the retried request on
    net = SimNet({A_ADDR: a, B_ADDR: b}, now=0.3)
    b.receive_datagram(second.data, second.src, second.dst, 0.3)
    net.run(10)
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []


def test_6_cookie_mode_responder_and_initiator_connect():
    # B asks every initiator for a cookie bound to Ni (RFC 7296 §2.6's suggestion): A's retry
    # must carry the same Ni, or it never connects.
    a, _ = make_engines(8)
    b = IkeEngine([tunnel("b")], random=_random.Random(9).randbytes,
                  dos=DosProtection(cookie_threshold=0))
    net = SimNet({A_ADDR: a, B_ADDR: b})
    a.start(net.now)
    net.run(10)
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []
    kinds = [m.summary() for _t, src, m in net.messages if m is not None][:3]
    assert "N(COOKIE)" in kinds[1] and kinds[2].startswith("IKE_SA_INIT request 0 [ N(COOKIE)")


# ------------------------------------------------------------------ 7: INVALID_KE in CREATE_CHILD_SA


def _ccsa(d, response: bool) -> bool:
    try:
        h = M.parse_header(d.data)
    except M.ParseError:
        return False
    return h.exchange_type == ExchangeType.CREATE_CHILD_SA and h.is_response == response


def _forge_invalid_ke(a: IkeEngine, response: bytes, group: int) -> bytes:
    """In place of B's answer to A's CREATE_CHILD_SA request: INVALID_KE_PAYLOAD(group),
    encrypted and integrity-protected with B's keys (a peer that means it)."""
    h = M.parse_header(response)
    sa = a.current_sa("to-b")
    msg = M.Message(sa.spi_i, sa.spi_r, ExchangeType.CREATE_CHILD_SA, h.message_id, True, False,
                    [M.Notify(NotifyType.INVALID_KE_PAYLOAD, data=group.to_bytes(2, "big"))], encrypted=True)
    return M.encode_message(msg, sa.cipher_in, bytes(sa.cipher_in.iv_size))


@pytest.mark.parametrize("what", ["child_rekey", "ike_rekey", "new_child"])
@pytest.mark.parametrize("group", [1, 0xFFFF, "supported_not_offered"])
def test_7_invalid_ke_in_create_child_sa_names_a_group_we_did_not_offer(what, group):
    # A offers ecp256 for PFS and x25519 for the IKE SA; B's (authentic) answer to A's first
    # CREATE_CHILD_SA is replaced by INVALID_KE_PAYLOAD naming an unsupported group (MODP_768,
    # 65535) or a supported one A did not offer.
    a_kw = dict(esp="aes256gcm16-ecp256")
    b_kw = dict(esp="aes256gcm16-ecp256")
    if what == "child_rekey":
        a_kw["child_lifetime"] = 300.0          # timer-driven rekey at 240-270 s
        offered = {19}
    elif what == "ike_rekey":
        a_kw["ike_lifetime"] = 600.0            # timer-driven rekey at 480-540 s
        offered = {31}
    else:   # the first Child SA is refused (TS): A creates one with CREATE_CHILD_SA later
        a_kw.update(local_ts=("10.1.0.0/16",), remote_ts=("10.2.0.0/16",))
        b_kw.update(local_ts=("10.9.0.0/16",), remote_ts=("10.1.0.0/16",))
        offered = {19}
    if group == "supported_not_offered":
        group = 19 if what == "ike_rekey" else 31
    held: list = []
    sent: list = []

    def drop(d, n):
        if d.src[0] == A_ADDR and _ccsa(d, response=False):
            sent.append(decode(b, d.data)[1])    # with B's keys of the time
        if d.src[0] == B_ADDR and _ccsa(d, response=True) and not held:
            held.append(d)
            return True      # A never sees B's first answer: it gets ours instead
        return False

    a, b = make_engines(11, a_kw, b_kw)
    net = SimNet({A_ADDR: a, B_ADDR: b}, Faults(drop=drop))
    a.start(net.now)
    net.run_until(lambda: bool(held), limit=700)
    forged = _forge_invalid_ke(a, held[0].data, group)
    a.receive_datagram(forged, (B_ADDR, 500), (A_ADDR, 500), net.now)   # must not raise
    net.run(900)
    # every request of A carries only KE payloads of groups it offers
    for msg in sent:
        assert msg is not None
        for ke in msg.get_all(M.KE):
            assert ke.dh_group in offered, (what, ke.dh_group)
    assert len(sent) >= 2, "the exchange was not retried later"
    if what == "new_child":
        assert any("INVALID_KE" in e.reason for e in of(net, A_ADDR, ev.ChildSaFailed))
        assert one_ike_sa_each(net) == []
    else:
        # B has done its half of the first exchange; whatever follows, the tunnel recovers
        assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []


# ------------------------------------------------------------------ 8: memory per spoofed offer


def _unusual_offer(seed: int, proposals: int, transforms: int) -> list[Proposal]:
    """Proposals of transforms of unknown types (refused), different for every seed."""
    return [Proposal(ProtocolId.IKE, tuple(Transform(200 + (seed % 40), (seed * 1000 + n * 64 + i) & 0xFFFF)
                                           for i in range(transforms)), n) for n in range(1, proposals + 1)]


@pytest.mark.parametrize("proposals,transforms", [(31, 36), (16, 16)])
def test_8_spoofed_unusual_offers_hold_no_memory_and_log_counts(caplog, proposals, transforms):
    # 31 x 36 transforms: ~9 KB, over the offer bounds; 16 x 16: within them, but unusual
    b = IkeEngine([tunnel("b", remote_addr=None, start=False)], random=_random.Random(12).randbytes)
    tracemalloc.start()
    try:
        warm = init_request(b"W" * 8, proposals=_unusual_offer(10_000, proposals, transforms))
        b.receive_datagram(warm, ("198.51.100.1", 500), (B_ADDR, 500), 0.0)
        b.datagrams_to_send()
        base = tracemalloc.get_traced_memory()[0]
        with caplog.at_level(logging.INFO, logger="isthmus.ike"):
            for i in range(40):
                data = init_request((i + 1).to_bytes(8, "big"), proposals=_unusual_offer(i, proposals, transforms))
                b.receive_datagram(data, (f"198.51.100.{i + 2}", 500), (B_ADDR, 500), 1.0 + i)
                (d,) = b.datagrams_to_send()
                reply, _ = M.parse_message(d.data)
                assert reply.notify(NotifyType.NO_PROPOSAL_CHOSEN) is not None
            held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert b.sas() == []
    assert held < 512 * 1024, f"{held / 2**20:.1f} MiB held after 40 refused offers"
    lines = [r.getMessage() for r in caplog.records]
    assert any("no acceptable proposal" in m for m in lines)
    longest = max(len(m) for m in lines)
    assert longest < 1000, f"a {longest}-character log line for one refused offer"


def test_8_offer_counts_are_bounded_before_selection():
    # an acceptable proposal behind too many proposals or transforms is not looked for
    b = IkeEngine([tunnel("b", remote_addr=None, start=False)], random=_random.Random(13).randbytes)
    good = parse_proposals("aes256gcm16-prfsha384-x25519", "ike")[0]
    many = [Proposal(ProtocolId.IKE, (Transform(200, n),), n) for n in range(1, 64)]
    long = [Proposal(ProtocolId.IKE, tuple(Transform(200, i) for i in range(255)), n) for n in (1, 2)]
    for junk in (many, long):
        props = junk + [Proposal(ProtocolId.IKE, good.transforms, len(junk) + 1)]
        b.receive_datagram(init_request(b"J" * 8, proposals=props), ("198.51.100.9", 500), (B_ADDR, 500), 0.0)
        assert b.sas() == []
        (d,) = b.datagrams_to_send()
        reply, _ = M.parse_message(d.data)
        assert reply.notify(NotifyType.NO_PROPOSAL_CHOSEN) is not None
    # a normal offer with the same acceptable proposal is taken
    b.receive_datagram(init_request(b"K" * 8), ("198.51.100.9", 500), (B_ADDR, 500), 0.0)
    (d,) = b.datagrams_to_send()
    reply, _ = M.parse_message(d.data)
    assert reply.get(M.SA) is not None and len(b.sas()) == 1


# ------------------------------------------------------------------ 9: half-open limits


SPOOF_KE = crypto.KeyExchange.generate(31, _random.Random(1).randbytes).public_bytes


def _flood(b: IkeEngine, n: int, now: float, src=lambda i: (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 500)):
    for i in range(n):
        b.receive_datagram(init_request(b"S" + i.to_bytes(7, "big"), ke=SPOOF_KE), src(i), (B_ADDR, 500), now)
        b.datagrams_to_send()


def _half_open(b: IkeEngine) -> int:
    return len([s for s in b.sas() if not s.established])


def test_9_spoofed_flood_with_cookies_creates_no_state_and_a_genuine_peer_connects(monkeypatch):
    a, _ = make_engines(14)
    b = IkeEngine([tunnel("b", remote_addr=None, remote_id=None)], random=_random.Random(15).randbytes,
                  dos=DosProtection(half_open_max=200, half_open_per_source=5, cookie_threshold=50))
    dh = DhCounter(monkeypatch)
    t0 = time.process_time()
    _flood(b, 20_000, 1000.0)
    spent = time.process_time() - t0
    assert _half_open(b) == 50            # up to the cookie threshold; then only cookies
    assert dh.n == 50                     # one DH per half-open SA, none for the refused
    assert spent < 60, f"{spent:.1f} s of CPU for 20,000 spoofed IKE_SA_INITs"
    net = SimNet({A_ADDR: a, B_ADDR: b}, now=1000.0)
    a.start(net.now)
    net.run(10)
    assert [e.tunnel for e in of(net, B_ADDR, ev.IkeSaUp)] == ["to-a"]
    assert of(net, A_ADDR, ev.ChildSaInstalled) and installed_pair_ok(net) == []
    net.run(60)                           # the spoofed half-open SAs expire
    assert _half_open(b) == 0 and len(b.sas()) == 1


def test_9_global_and_per_source_caps_refuse_before_any_dh(monkeypatch):
    a, _ = make_engines(16)
    b = IkeEngine([tunnel("b", remote_addr=None, remote_id=None)], random=_random.Random(17).randbytes,
                  dos=DosProtection(half_open_max=100, half_open_per_source=5, cookie_threshold=None))
    dh = DhCounter(monkeypatch)
    # one source: 5 half-open SAs at most
    _flood(b, 50, 1000.0, src=lambda i: ("203.0.113.7", 500))
    assert _half_open(b) == 5 and dh.n == 5
    # 20,000 sources: the global cap holds, no DH for the refused ones
    _flood(b, 20_000, 1001.0)
    assert _half_open(b) == 100 and dh.n == 100
    # once they expire a genuine initiator connects (its retransmissions outlast them)
    net = SimNet({A_ADDR: a, B_ADDR: b}, now=1001.0)
    a.start(net.now)
    net.run(120)
    assert [e.tunnel for e in of(net, B_ADDR, ev.IkeSaUp)] == ["to-a"]
    assert installed_pair_ok(net) == []


def test_9_memory_per_half_open_sa_is_bounded():
    # a 60 KB IKE_SA_INIT (an acceptable offer padded with a vendor ID) is not kept
    b = IkeEngine([tunnel("b", remote_addr=None, remote_id=None)], random=_random.Random(18).randbytes)
    big = init_request(b"B" * 8, extra=[M.VendorID(b"v" * 60_000)])
    b.receive_datagram(big, ("198.51.100.5", 500), (B_ADDR, 500), 0.0)
    assert b.sas() == []
    small = init_request(b"b" * 8, extra=[M.VendorID(b"v" * 100)])
    b.receive_datagram(small, ("198.51.100.5", 500), (B_ADDR, 500), 0.0)
    assert len(b.sas()) == 1


def test_9_cookies_are_stateless_and_their_secret_rotates():
    b = IkeEngine([tunnel("b", remote_addr=None, remote_id=None)], random=_random.Random(19).randbytes,
                  dos=DosProtection(cookie_threshold=0))
    src = ("198.51.100.6", 500)

    def ask(spi: bytes, now: float, cookie: bytes | None = None, nonce: bytes = b"N" * 32, src=src):
        extra = [M.Notify(NotifyType.COOKIE, data=cookie)] if cookie is not None else []
        b.receive_datagram(init_request(spi, extra=extra, nonce=nonce), src, (B_ADDR, 500), now)
        (d,) = b.datagrams_to_send()
        return M.parse_message(d.data)[0]

    r = ask(b"1" * 8, 0.0)
    c = r.notify(NotifyType.COOKIE).data
    assert r.get(M.SA) is None and b.sas() == [] and 1 <= len(c) <= 64
    assert ask(b"1" * 8, 0.0, c, nonce=b"M" * 32).get(M.SA) is None     # bound to Ni
    assert ask(b"2" * 8, 0.0, c).get(M.SA) is None                       # and to SPIi
    assert ask(b"1" * 8, 0.0, c, src=("198.51.100.60", 500)).get(M.SA) is None   # and to IPi
    assert ask(b"1" * 8, 1.0, c).get(M.SA) is not None and len(b.sas()) == 1
    # a cookie stays good for one rotation, not for two
    r = ask(b"3" * 8, 10.0)
    c3 = r.notify(NotifyType.COOKIE).data
    assert ask(b"3" * 8, 10.0 + DosProtection().cookie_secret_lifetime + 1, c3).get(M.SA) is not None
    r = ask(b"4" * 8, 200.0)
    c4 = r.notify(NotifyType.COOKIE).data
    assert ask(b"4" * 8, 200.0 + 3 * DosProtection().cookie_secret_lifetime, c4).get(M.SA) is None


# ------------------------------------------------------------------ 10: spoofed IKE_SA_INIT responses


def test_10_spoofed_ike_sa_init_responses_do_not_fail_the_initiator():
    a, b = make_engines(20)
    a.start(0.0)
    (first,) = a.datagrams_to_send()
    req, _ = M.parse_message(first.data)
    low_order = bytes(32)          # an X25519 public value giving an all-zero secret
    spoofs = [
        [M.Notify(NotifyType.NO_PROPOSAL_CHOSEN)],
        [M.Notify(NotifyType.INVALID_SYNTAX)],
        [M.Notify(NotifyType.AUTHENTICATION_FAILED)],
        [M.SA([Proposal(ProtocolId.IKE, req.get(M.SA).proposals[0].transforms, 1)]), M.Nonce(b"r" * 32)],
        [M.SA([Proposal(ProtocolId.IKE, req.get(M.SA).proposals[0].transforms, 1)]), M.KE(31, low_order),
         M.Nonce(b"r" * 32)],
        [M.SA([Proposal(ProtocolId.IKE, parse_proposals("aes128-sha256-modp2048", "ike")[0].transforms, 1)]),
         M.KE(14, bytes(256)), M.Nonce(b"r" * 32)],
    ]
    for i, payloads in enumerate(spoofs):
        spi_r = b"R" * 7 + bytes([i]) if M.SA in map(type, payloads) else ZERO
        msg = M.Message(req.spi_i, spi_r, ExchangeType.IKE_SA_INIT, 0, True, False, payloads)
        a.receive_datagram(M.encode_message(msg), first.dst, first.src, 0.1 + i / 100)
        assert a.datagrams_to_send() == []
    assert not [e for e in drain(a) if isinstance(e, (ev.IkeSaFailed, ev.AuthFailed))]
    # the retransmission timer still runs and the genuine responder answers it
    net = SimNet({A_ADDR: a, B_ADDR: b}, now=0.2)
    net.run(30)
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []
    assert not of(net, A_ADDR, ev.IkeSaFailed)


def test_10_invalid_major_version_and_invalid_ke_still_act_at_once():
    a, _ = make_engines(21, dict(ike="aes256gcm16-prfsha384-x25519-ecp256"))
    a.start(0.0)
    (first,) = a.datagrams_to_send()
    req, _ = M.parse_message(first.data)
    msg = M.Message(req.spi_i, ZERO, ExchangeType.IKE_SA_INIT, 0, True, False,
                    [M.Notify(NotifyType.INVALID_KE_PAYLOAD, data=(19).to_bytes(2, "big"))])
    a.receive_datagram(M.encode_message(msg), first.dst, first.src, 0.1)
    (retry,) = a.datagrams_to_send()
    assert M.parse_message(retry.data)[0].get(M.KE).dh_group == 19
    msg = M.Message(req.spi_i, ZERO, ExchangeType.IKE_SA_INIT, 0, True, False,
                    [M.Notify(NotifyType.INVALID_MAJOR_VERSION)])
    a.receive_datagram(M.encode_message(msg), first.dst, first.src, 0.2)
    assert [e for e in drain(a) if isinstance(e, ev.IkeSaFailed)]


# ------------------------------------------------------------------ found on the way


def test_a_responder_selecting_our_second_proposal_is_understood():
    # §3.3.1: the response's proposal keeps the number of the one selected (here 2)
    net = up(a_kw=dict(ike="aes128gcm16-prfsha256-ecp256,aes256gcm16-prfsha384-x25519",
                       esp="aes128gcm16,aes256gcm16"),
             b_kw=dict(ike="aes256gcm16-prfsha384-x25519", esp="aes256gcm16"), run=10)
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []
    assert of(net, A_ADDR, ev.IkeSaUp)[0].proposal == "aes256gcm16-prfsha384-x25519"
