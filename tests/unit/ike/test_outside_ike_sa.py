"""Unauthenticated answers that keep no state (RFC 7296 §1.5, §2.6): INVALID_IKE_SPI for
encrypted requests naming no IKE SA of ours (rate-limited), INVALID_KE_PAYLOAD answered without
a half-open SA, and the COOKIE switch logged once each way."""

from __future__ import annotations

import logging
import random as _random
import re
import struct

import pytest

from appliance.ike import events as ev
from appliance.ike import message as M
from appliance.ike.constants import ExchangeType, NotifyType, PayloadType
from appliance.ike.engine import IkeEngine
from appliance.ike.policy import DosProtection, PolicyError
from tests.unit.ike.simnet import A_ADDR, B_ADDR, SimNet, make_engines, tunnel
from tests.unit.ike.test_review_part_b import SPOOF_KE, DhCounter, init_request

SRC = ("198.51.100.9", 500)
DST = (B_ADDR, 500)


def encrypted_request(spi_i: bytes, spi_r: bytes, *, mid: int = 7, exchange: int = ExchangeType.INFORMATIONAL,
                      initiator: bool = True, response: bool = False, first: int = PayloadType.SK) -> bytes:
    """What an encrypted request looks like on the wire, to someone without its keys."""
    flags = (0x08 if initiator else 0) | (0x20 if response else 0)
    body = struct.pack("!BBH", 0, 0, 4 + 48) + bytes(48)         # SK: IV, ciphertext, ICV
    return spi_i + spi_r + struct.pack("!BBBBII", first, 0x20, exchange, flags, mid, 28 + len(body)) + body


def responder(**dos) -> IkeEngine:
    return IkeEngine([tunnel("b", remote_addr=None, remote_id=None)], random=_random.Random(3).randbytes,
                     dos=DosProtection(**dos))


def answers(engine: IkeEngine) -> list[M.Message]:
    out = []
    for d in engine.datagrams_to_send():
        msg, enc = M.parse_message(d.data)
        assert enc is None
        out.append((d, msg))
    return out


@pytest.mark.parametrize("initiator", [True, False])
def test_an_encrypted_request_for_an_unknown_spi_gets_invalid_ike_spi_and_no_state(initiator):
    b = responder()
    data = encrypted_request(b"I" * 8, b"R" * 8, mid=5, exchange=ExchangeType.CREATE_CHILD_SA, initiator=initiator)
    b.receive_datagram(data, SRC, DST, 10.0)
    ((d, msg),) = answers(b)
    assert (d.src, d.dst) == (DST, SRC)
    # §1.5: SPIs, exchange type and Message ID copied; a response; our own Initiator flag
    assert (msg.spi_i, msg.spi_r, msg.exchange_type, msg.message_id) == (b"I" * 8, b"R" * 8,
                                                                        ExchangeType.CREATE_CHILD_SA, 5)
    assert msg.is_response and msg.is_initiator is (not initiator) and not msg.encrypted
    assert [(p.notify_type, p.data) for p in msg.payloads] == [(NotifyType.INVALID_IKE_SPI, b"")]
    assert b.sas() == [] and b.half_open_count == 0 and b.next_event() is None
    assert b.dos_counters["invalid_ike_spi_sent"] == 1


@pytest.mark.parametrize("what", ["response", "unencrypted", "ike_sa_init", "fragment"])
def test_what_is_not_answered(what):
    b = responder()
    if what == "response":
        data = encrypted_request(b"I" * 8, b"R" * 8, response=True)
    elif what == "unencrypted":
        data = M.encode_message(M.Message(b"I" * 8, b"R" * 8, ExchangeType.INFORMATIONAL, 3, False, True,
                                          [M.Notify(NotifyType.INITIAL_CONTACT)]))
    elif what == "ike_sa_init":
        data = encrypted_request(b"I" * 8, b"R" * 8, mid=0, exchange=ExchangeType.IKE_SA_INIT)
    else:    # an encrypted fragment (RFC 7383) is a request as well: answered
        data = encrypted_request(b"I" * 8, b"R" * 8, first=PayloadType.SKF)
    b.receive_datagram(data, SRC, DST, 10.0)
    assert len(answers(b)) == (1 if what == "fragment" else 0)
    assert b.sas() == []


def test_invalid_ike_spi_answers_are_rate_limited():
    b = responder(invalid_ike_spi_rate=10)
    for i in range(1000):   # a burst from forged addresses: 10 answered
        b.receive_datagram(encrypted_request((i + 1).to_bytes(8, "big"), b"R" * 8), (f"10.0.{i >> 8}.{i & 255}", 500),
                           DST, 100.0)
    assert len(answers(b)) == 10
    assert b.dos_counters == {**b.dos_counters, "invalid_ike_spi_sent": 10, "invalid_ike_spi_limited": 990}
    b.receive_datagram(encrypted_request(b"x" * 8, b"R" * 8), SRC, DST, 100.5)   # half a second: 5 more
    for i in range(20):
        b.receive_datagram(encrypted_request(b"y" * 7 + bytes([i]), b"R" * 8), SRC, DST, 100.5)
    assert len(answers(b)) == 5
    b.receive_datagram(encrypted_request(b"z" * 8, b"R" * 8), SRC, DST, 3600.0)   # refilled, to the burst only
    assert len(answers(b)) == 1
    assert b.invalid_ike_spi_limit.tokens == 9


def test_invalid_ike_spi_can_be_switched_off_and_is_validated():
    b = responder(invalid_ike_spi_rate=None)
    b.receive_datagram(encrypted_request(b"I" * 8, b"R" * 8), SRC, DST, 1.0)
    assert answers(b) == [] and b.dos_counters["invalid_ike_spi_sent"] == 0
    for bad in (0, -1, True, "10"):
        with pytest.raises(PolicyError, match="invalid_ike_spi_rate"):
            DosProtection(invalid_ike_spi_rate=bad)


def test_a_peer_that_lost_our_sa_answers_dpd_with_invalid_ike_spi_and_we_carry_on():
    """B restarts (a new engine, no state); A's liveness check reaches it: B answers
    INVALID_IKE_SPI, which A takes as no answer (unauthenticated, §2.21); A's DPD then runs its
    course and A connects again."""
    a, b = make_engines(21, a_kw={"dpd": tunnel("a").dpd.__class__(interval=10, timeout=40, action="restart")})
    net = SimNet({A_ADDR: a, B_ADDR: b})
    a.start(net.now)
    b.start(net.now)
    net.run(5)
    assert [e.tunnel for e in net.events[A_ADDR] if isinstance(e, ev.IkeSaUp)] == ["to-b"]
    b2 = IkeEngine([tunnel("b")], random=_random.Random(99).randbytes)
    net.engines[B_ADDR] = b2
    b2.start(net.now)
    net.run(120)
    spi_answers = [m for _t, ip, m in net.messages if ip == B_ADDR and m is not None
                   and m.notify(NotifyType.INVALID_IKE_SPI) is not None]
    assert spi_answers and all(m.is_response and m.exchange_type == ExchangeType.INFORMATIONAL
                               for m in spi_answers)
    assert any(isinstance(e, ev.PeerDead) for e in net.events[A_ADDR])
    assert [e.tunnel for e in net.events[A_ADDR] if isinstance(e, ev.IkeSaUp)] == ["to-b", "to-b"]
    assert b2.dos_counters["invalid_ike_spi_sent"] == len(spi_answers)


def test_invalid_ke_payload_is_answered_without_a_half_open_sa(monkeypatch):
    b = IkeEngine([tunnel("b", remote_addr=None, remote_id=None, ike="aes256gcm16-prfsha384-ecp256")],
                  random=_random.Random(4).randbytes, dos=DosProtection(cookie_threshold=None))
    dh = DhCounter(monkeypatch)
    # x25519 or ecp256 offered, an x25519 KE payload; we take ecp256 only: "send ecp256", nothing kept
    req = init_request(b"K" * 8, ike="aes256gcm16-prfsha384-x25519-ecp256", ke=SPOOF_KE)
    for _ in range(3):
        b.receive_datagram(req, SRC, DST, 5.0)
    got = answers(b)
    assert len(got) == 3
    for _d, msg in got:
        n = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
        assert n is not None and int.from_bytes(n.data, "big") == 19 and msg.spi_r == bytes(8)
        assert [type(p) for p in msg.payloads] == [M.Notify]
    assert b.sas() == [] and b.half_open_count == 0 and dh.n == 0 and b.get_timer() is None


def test_the_cookie_switch_is_logged_once_each_way(caplog):
    b = responder(cookie_threshold=20, half_open_per_source=None)
    caplog.set_level(logging.WARNING, "isthmus.ike")
    for i in range(500):
        b.receive_datagram(init_request(b"S" + i.to_bytes(7, "big"), ke=SPOOF_KE), (f"10.9.{i >> 8}.{i & 255}", 500),
                           DST, 50.0)
        b.datagrams_to_send()
    assert b.half_open_count == 20 and b.cookies_required and b.dos_counters["cookies_sent"] == 480
    on = [r for r in caplog.records if "COOKIEs required" in r.getMessage()]
    assert len(on) == 1 and "20 half-open" in on[0].getMessage()
    b.handle_timer(50.0 + 3600)            # the spoofed half-open SAs expire
    b.receive_datagram(init_request(b"T" * 8, ke=SPOOF_KE), SRC, DST, 3651.0)
    assert [r.getMessage() for r in caplog.records if "no longer" in r.getMessage()] == [
        "0 half-open IKE SAs: COOKIEs no longer required"]
    assert b.half_open_count == 1 and not b.cookies_required


def test_lines_about_refused_ike_sa_init_requests_are_rate_limited(caplog):
    """A responder with a fixed remote address gets a flood from forged sources: every request
    matches no tunnel. Its log gets 5 lines a second, not one per datagram, and says how many
    it left out."""
    b = IkeEngine([tunnel("b", start=False)], random=_random.Random(8).randbytes)
    caplog.set_level(logging.INFO, "isthmus.ike")
    for i in range(5000):
        b.receive_datagram(init_request(b"S" + i.to_bytes(7, "big"), ke=SPOOF_KE),
                           (f"10.7.{i >> 8}.{i & 255}", 500), DST, 20.0 + i / 1000)   # 5 s of flood
    lines = [r.getMessage() for r in caplog.records if "matches no tunnel" in r.getMessage()]
    assert 20 <= len(lines) <= 5 + 5 * 5 + 1
    left_out = sum(int(m.group(1)) for x in lines if (m := re.search(r"\((\d+) similar lines left out\)", x)))
    assert left_out + len(lines) >= 5000 - 200     # the ones still untold are those of the last 1/5 s
    assert b.sas() == [] and b.datagrams_to_send() == []
