"""IKE fragmentation (RFC 7383) through the engines' public API in the simulated network.

Big IKE_AUTH messages come from many traffic selectors (100 local networks on each side: the
initiator's TSi and the responder's narrowed TSr); small fragment sizes make many fragments.
A "path that drops IP fragments" is a Faults.drop rule dropping every datagram larger than
1280 octets of IP datagram.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.ike import events as ev
from appliance.ike import fragmentation
from appliance.ike import message as M
from appliance.ike.constants import EncrId, ExchangeType, IntegId, NotifyType, PayloadType
from appliance.ike.crypto import IntegrityError, SkCipher
from appliance.ike.engine import Datagram, IkeEngine
from appliance.ike.policy import FragmentationConfig, PolicyError
from tests.unit.ike.simnet import (
    A_ADDR,
    B_ADDR,
    Faults,
    SimNet,
    describe,
    installed_pair_ok,
    make_engines,
    one_ike_sa_each,
)

T0 = 1000.0
MANY_TS = tuple(f"10.{i}.0.0/16" for i in range(100))
IP_UDP = 20 + 8        # IPv4 header + UDP header around each datagram of the simulation
ATTACKER = ("203.0.113.9", 500)


def _frag(size: int = 1280, **kw) -> FragmentationConfig:
    return FragmentationConfig(size_ipv4=size, size_ipv6=size, **kw)


def _kw(frag: FragmentationConfig | None = None, **kw) -> dict:
    kw.setdefault("local_ts", MANY_TS)
    if frag is not None:
        kw["fragmentation"] = frag
    return kw


def _net(a_kw: dict, b_kw: dict, faults: Faults | None = None, seed: int = 1) -> SimNet:
    a, b = make_engines(seed, a_kw, b_kw)
    net = SimNet({A_ADDR: a, B_ADDR: b}, faults=faults, now=T0)
    a.start(net.now)
    b.start(net.now)
    return net


def _hdr(d: Datagram) -> M.Header:
    return M.parse_header(d.data)


def _skf(d: Datagram) -> M.EncryptedFragment | None:
    _msg, enc = M.parse_message(d.data)
    return enc if isinstance(enc, M.EncryptedFragment) else None


def _exchange(datagrams, xchg: int, response: bool) -> list[Datagram]:
    return [d for d in datagrams if _hdr(d).exchange_type == xchg and _hdr(d).is_response == response]


def _drain(engine: IkeEngine) -> list:
    out = []
    while (e := engine.next_event()) is not None:
        out.append(e)
    return out


def _drops_ip_fragments(d: Datagram, _n: int) -> bool:
    """A middle box dropping IP fragments: nothing larger than a 1280-octet IP datagram."""
    return len(d.data) + IP_UDP > 1280


def _up(net: SimNet, duration: float = 5) -> None:
    net.run(duration)
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []


# ------------------------------------------------------------------ negotiation and sending


def test_large_ike_auth_is_fragmented_both_ways_and_reassembled():
    net = _net(_kw(), _kw(), Faults(drop=_drops_ip_fragments))
    _up(net)
    sent = [d for _t, d in net.delivered]
    init = _exchange(sent, ExchangeType.IKE_SA_INIT, False) + _exchange(sent, ExchangeType.IKE_SA_INIT, True)
    assert len(init) == 2
    for d in init:   # §2.3: both announce; IKE_SA_INIT itself is never fragmented
        msg, enc = M.parse_message(d.data)
        assert enc is None and msg.notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None
    for response in (False, True):
        frags = _exchange(sent, ExchangeType.IKE_AUTH, response)
        encs = [_skf(d) for d in frags]
        assert len(frags) >= 2 and all(e is not None for e in encs)
        total = encs[0].total_fragments
        assert [e.fragment_number for e in encs] == list(range(1, total + 1))
        assert {e.total_fragments for e in encs} == {total}
        # fragment 1 names the first inner payload (IDi / IDr), the others 0 (§2.5)
        assert encs[0].first_inner == (PayloadType.IDr if response else PayloadType.IDi)
        assert all(e.first_inner == 0 for e in encs[1:])
        assert all(len(d.data) + IP_UDP <= 1280 for d in frags)
        assert {_hdr(d).message_id for d in frags} == {1}
    # what crossed is the whole message: 100 selectors each way (TSi of A, TSr narrowed by B)
    inst_b = [e for e in net.events[B_ADDR] if isinstance(e, ev.ChildSaInstalled)]
    assert len(inst_b) == 1
    for ip in (A_ADDR, B_ADDR):
        (sa,) = net.engines[ip].sas()
        (child,) = sa.children
        assert len(child.ts_i) == 100 and len(child.ts_r) == 100   # every selector arrived


def test_small_messages_are_not_fragmented():
    net = _net({}, {})
    _up(net)
    assert not any(_skf(d) for _t, d in net.delivered)


def test_create_child_sa_is_fragmented_too_and_an_ike_rekey_keeps_fragmentation():
    net = _net(_kw(_frag(600)), _kw(_frag(600)))
    _up(net)
    a = net.engines[A_ADDR]
    for step in ("child", "ike", "child"):
        n = len(net.delivered)
        if step == "child":
            a.rekey_child("to-b", net.now)
        else:
            a.rekey_ike("to-b", net.now)
        net.run(5)
        assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
        ccsa = _exchange([d for _t, d in net.delivered[n:]], ExchangeType.CREATE_CHILD_SA, False)
        if step == "child":   # SA, Nonce, 100 TSi, TSr: larger than 600 octets
            assert len(ccsa) >= 2 and all(_skf(d) is not None for d in ccsa)
    assert len([e for e in net.events[A_ADDR] if isinstance(e, ev.IkeSaRekeyed)]) == 1
    assert len([e for e in net.events[A_ADDR] if isinstance(e, ev.ChildSaRekeyed)]) == 2


@pytest.mark.parametrize("off", ["a", "b"])
def test_fragmentation_off_on_one_side_sends_whole_messages_and_fails_cleanly_on_a_bad_path(off):
    kw_off = _kw(_frag(enabled=False), retransmit=_fast_retransmit())
    kw_on = _kw(retransmit=_fast_retransmit())
    a_kw, b_kw = (kw_off, kw_on) if off == "a" else (kw_on, kw_off)
    seen: list[Datagram] = []

    def drop(d: Datagram, n: int) -> bool:
        seen.append(d)
        return _drops_ip_fragments(d, n)

    net = _net(a_kw, b_kw, Faults(drop=drop))
    net.run(60)
    assert not any(_skf(d) for d in seen)
    init_r = _exchange(seen, ExchangeType.IKE_SA_INIT, True)[0]
    assert M.parse_message(init_r.data)[0].notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is None
    if off == "a":
        init = _exchange(seen, ExchangeType.IKE_SA_INIT, False)[0]
        assert M.parse_message(init.data)[0].notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is None
    auth = _exchange(seen, ExchangeType.IKE_AUTH, False)
    assert len(auth) >= 2 and all(len(d.data) + IP_UDP > 1280 for d in auth)   # whole, retransmitted
    failed = [e for e in net.events[A_ADDR] if isinstance(e, ev.IkeSaFailed)]
    assert failed and "no response to IKE_AUTH" in failed[0].reason
    assert not [e for e in net.events[A_ADDR] + net.events[B_ADDR] if isinstance(e, ev.IkeSaUp)]


def test_fragmentation_off_on_one_side_still_connects_on_a_good_path():
    net = _net(_kw(_frag(enabled=False)), _kw())
    _up(net)
    assert not any(_skf(d) for _t, d in net.delivered)


def _fast_retransmit():
    from appliance.ike.policy import RetransmitConfig

    return RetransmitConfig(timeout=1.0, base=1.5, tries=3)


# ------------------------------------------------------------------ faults


def test_loss_duplication_and_reordering_of_fragments():
    """Deterministic random fault schedules: each datagram is dropped (8 %), duplicated (15 %)
    and delayed by up to 50 ms (reordering the fragments of a set)."""
    seen_drop = seen_dup = seen_reorder = 0
    for seed in range(30):
        rng = random.Random(seed)
        decisions = []
        for _ in range(60):
            r = rng.random()
            copies = 0 if r < 0.08 else (2 if r < 0.23 else 1)
            decisions.append((copies, rng.uniform(0, 0.05)))
        faults = Faults(decisions)
        net = _net(_kw(_frag(400)), _kw(_frag(400)), faults, seed=seed)
        net.run(200)     # one lost fragment costs a retransmission of the set (4, 7.2, 13, 23, 42 s)
        assert installed_pair_ok(net) == [], seed
        assert one_ike_sa_each(net) == [], seed
        auth = [_skf(d) for _t, d in net.delivered if _hdr(d).exchange_type == ExchangeType.IKE_AUTH]
        assert all(e is not None for e in auth)
        nums = [(e.fragment_number, e.total_fragments) for e in auth]
        seen_dup += len(nums) != len(set(nums))
        seen_reorder += any(a[0] > b[0] and a[1] == b[1] for a, b in zip(nums, nums[1:]))
        seen_drop += any(c == 0 for c, _ in decisions[2:2 + 2 * auth[0].total_fragments])
    assert seen_drop and seen_dup and seen_reorder   # the schedules did exercise all three


def test_a_retransmitted_request_is_answered_once_per_retransmission_on_fragment_1_only():
    """§2.6.1: the cached (fragmented) response goes out again only for fragment 1 of the
    retransmitted request, not once per fragment."""
    first_response_dropped = []

    def drop(d: Datagram, _n: int) -> bool:
        h = _hdr(d)
        if h.exchange_type == ExchangeType.IKE_AUTH and h.is_response:
            e = _skf(d)
            if e is not None and len(first_response_dropped) < e.total_fragments:
                first_response_dropped.append(e.fragment_number)
                return True
        return False

    net = _net(_kw(_frag(400)), _kw(_frag(400)), Faults(drop=drop))
    _up(net, 10)
    sent = [d for _t, d in net.delivered]
    req = _exchange(sent, ExchangeType.IKE_AUTH, False)
    resp = _exchange(sent, ExchangeType.IKE_AUTH, True)
    n_req, n_resp = _skf(req[0]).total_fragments, _skf(resp[0]).total_fragments
    assert n_req >= 3 and n_resp >= 3
    assert first_response_dropped == list(range(1, n_resp + 1))
    assert len(req) == 2 * n_req        # sent once, retransmitted once, all fragments each time
    assert len(resp) == n_resp          # the resend of the cached response, once, complete


# ------------------------------------------------------------------ forged fragments


def _after_ike_sa_init(a_kw: dict, b_kw: dict):
    a, b = make_engines(1, a_kw, b_kw)
    a.start(T0)
    (init,) = a.datagrams_to_send()
    b.receive_datagram(init.data, init.src, init.dst, T0)
    (init_r,) = b.datagrams_to_send()
    a.receive_datagram(init_r.data, init_r.src, init_r.dst, T0)
    frags = a.datagrams_to_send()
    assert len(frags) >= 3 and all(_skf(d) is not None for d in frags)
    return a, b, frags


def _forged_skf(like: Datagram, number: int, total: int, body: bytes, first: int = 0) -> bytes:
    """An SKF datagram with the genuine header but made without the keys."""
    h = _hdr(like)
    skf = struct.pack("!BBHHH", first, 0, 8 + len(body), number, total) + body
    return like.data[:16] + struct.pack("!BBBBII", PayloadType.SKF, 0x20, h.exchange_type, h.flags,
                                        h.message_id, M.IKE_HEADER_LEN + len(skf)) + skf


def _flipped(d: Datagram, at: int = -20) -> bytes:
    data = bytearray(d.data)
    data[at] ^= 0x01
    return bytes(data)


def test_forged_fragments_are_ignored_and_do_not_break_the_genuine_set():
    a, b, frags = _after_ike_sa_init(_kw(_frag(400)), _kw(_frag(400)))
    n = _skf(frags[0]).total_fragments
    (sa_b,) = b.sas()
    src, dst = frags[0].src, frags[0].dst
    forged = [
        # a larger Total Fragments would restart the set (§2.6.1) if it were believed
        _forged_skf(frags[0], 1, n + 5, bytes(200), PayloadType.IDi),
        # a smaller one would make the genuine fragments look stale
        _forged_skf(frags[0], 2, 2, bytes(200)),
        # each genuine fragment with one bit changed: stored first, it would make the genuine
        # one look like a duplicate
        *(_flipped(d) for d in frags),
        # changed in the authenticated header part (Fragment Number), ciphertext intact
        _flipped(frags[1], M.IKE_HEADER_LEN + 5),
        # too short for IV and ICV; Fragment Number 0; number above total
        _forged_skf(frags[0], 1, n, bytes(4)),
        _forged_skf(frags[0], 0, n, bytes(100)),
        _forged_skf(frags[0], n + 1, n, bytes(100)),
    ]
    for data in forged:
        b.receive_datagram(data, ATTACKER, dst, T0)
        assert b.datagrams_to_send() == [] and _drain(b) == []
        assert sa_b.reassembly is None     # a forged fragment occupies no state
    # the genuine set, each fragment preceded by forged copies of the others
    for i, d in enumerate(frags):
        for other in frags[i:]:
            b.receive_datagram(_flipped(other), ATTACKER, dst, T0)
        b.receive_datagram(d.data, src, dst, T0)
        out = b.datagrams_to_send()
        if i < n - 1:
            assert out == []
    # the last genuine fragment completed the set: the response (fragmented) goes out at once
    assert len(out) >= 2 and all(_hdr(d).is_response and _skf(d) is not None for d in out)
    assert [type(e).__name__ for e in _drain(b)] == ["IkeSaUp", "ChildSaInstalled"]
    for d in out:
        a.receive_datagram(d.data, d.src, d.dst, T0)
    assert [type(e).__name__ for e in _drain(a)] == ["IkeSaUp", "ChildSaInstalled"]


def test_a_fragment_is_refused_where_fragmentation_was_not_negotiated():
    """B did not announce support: an authentic SKF from A (made with A's keys) is dropped."""
    a, b = make_engines(1, _kw(), _kw(_frag(enabled=False)))
    a.start(T0)
    (init,) = a.datagrams_to_send()
    b.receive_datagram(init.data, init.src, init.dst, T0)
    (init_r,) = b.datagrams_to_send()
    a.receive_datagram(init_r.data, init_r.src, init_r.dst, T0)
    (auth,) = a.datagrams_to_send()     # whole: B did not announce support
    assert _skf(auth) is None
    (sa_a,) = a.sas()
    msg = M.decrypt_message(auth.data, *M.parse_message(auth.data), _cipher_from(b, auth))
    for d in fragmentation.encode_fragments(msg, sa_a.cipher_out, random.Random(5).randbytes, 500):
        b.receive_datagram(d, auth.src, auth.dst, T0)
    assert b.datagrams_to_send() == [] and _drain(b) == []
    b.receive_datagram(auth.data, auth.src, auth.dst, T0)    # the whole one is fine
    assert [type(e).__name__ for e in _drain(b)] == ["IkeSaUp", "ChildSaInstalled"]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_mix_of_forged_duplicated_and_reordered_fragments_reassembles_the_genuine_message(data):
    """The genuine set in any order, with duplicates, among forged fragments of any numbers
    and any bit flipped: the message is processed exactly once, when the last genuine
    fragment arrives, and the SA comes up."""
    a, b, frags = _after_ike_sa_init(_kw(_frag(400)), _kw(_frag(400)))
    n = len(frags)
    order = data.draw(st.permutations(range(n)))
    dups = data.draw(st.lists(st.integers(0, n - 1), max_size=6))
    stream = [("genuine", i) for i in order]
    for i in dups:   # a duplicate somewhere after the first copy
        first = stream.index(("genuine", i))
        stream.insert(data.draw(st.integers(first + 1, len(stream))), ("genuine", i))
    forged = data.draw(st.lists(st.one_of(
        st.tuples(st.just("flip"), st.integers(0, n - 1), st.integers(M.IKE_HEADER_LEN, 399)),
        st.tuples(st.just("made"), st.integers(0, 70), st.integers(0, 70), st.binary(max_size=120))),
        max_size=12))
    for f in forged:
        stream.insert(data.draw(st.integers(0, len(stream))), f)
    last = max(k for k, item in enumerate(stream) if item[0] == "genuine" and stream.index(item) == k)
    src, dst = frags[0].src, frags[0].dst
    answers = []
    for k, item in enumerate(stream):
        if item[0] == "genuine":
            b.receive_datagram(frags[item[1]].data, src, dst, T0)
        elif item[0] == "flip":
            d = frags[item[1]]
            if item[2] >= len(d.data):
                continue
            b.receive_datagram(_flipped(d, item[2]), ATTACKER, dst, T0)
        else:
            b.receive_datagram(_forged_skf(frags[0], item[1], item[2], item[3], PayloadType.IDi),
                               ATTACKER, dst, T0)
        out = b.datagrams_to_send()
        if out:
            answers.append((k, out))
    assert len(answers) >= 1 and answers[0][0] == last
    assert all(_hdr(d).is_response and _skf(d) is not None for _k, out in answers for d in out)
    # later duplicates of fragment 1 are retransmissions: they bring the cached response again
    assert all(stream[k] == ("genuine", 0) for k, _out in answers[1:])
    assert [type(e).__name__ for e in _drain(b)] == ["IkeSaUp", "ChildSaInstalled"]


def test_ike_sa_init_is_never_fragmented_nor_reassembled():
    """§2.5: only messages with an SK payload, IKE_AUTH and later. An IKE_SA_INIT carrying an
    SKF payload (request or response) is dropped without an answer or state."""
    a, b = make_engines(1, _kw(), _kw())
    a.start(T0)
    (init,) = a.datagrams_to_send()
    assert _skf(init) is None and M.parse_message(init.data)[0].notify(
        NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None
    h = _hdr(init)
    skf = struct.pack("!BBHHH", PayloadType.SA, 0, 8 + 40, 1, 2) + bytes(40)
    forged = init.data[:16] + struct.pack("!BBBBII", PayloadType.SKF, 0x20, ExchangeType.IKE_SA_INIT,
                                          h.flags, 0, M.IKE_HEADER_LEN + len(skf)) + skf
    b.receive_datagram(forged, ATTACKER, init.dst, T0)
    assert b.datagrams_to_send() == [] and b.sas() == []
    b.receive_datagram(init.data, init.src, init.dst, T0)
    (init_r,) = b.datagrams_to_send()
    resp = init_r.data[:16] + struct.pack("!BBBBII", PayloadType.SKF, 0x20, ExchangeType.IKE_SA_INIT,
                                          0x20, 0, M.IKE_HEADER_LEN + len(skf)) + skf
    a.receive_datagram(resp, (B_ADDR, 500), init.src, T0)
    assert a.datagrams_to_send() == [] and _drain(a) == []
    a.receive_datagram(init_r.data, init_r.src, init_r.dst, T0)   # the genuine one still works
    assert [_hdr(d).exchange_type for d in a.datagrams_to_send()] == [ExchangeType.IKE_AUTH] * 2


def _cipher_from(engine: IkeEngine, d: Datagram):
    (sa,) = engine.sas()
    return sa.cipher_in


# ------------------------------------------------------------------ limits


def test_more_fragments_than_allowed_are_refused_and_the_exchange_fails_cleanly():
    a_kw = _kw(_frag(300), retransmit=_fast_retransmit())
    net = _net(a_kw, _kw(_frag(300, max_fragments=4)))
    net.run(60)
    req = _exchange([d for _t, d in net.delivered], ExchangeType.IKE_AUTH, False)
    assert req and _skf(req[0]).total_fragments > 4
    assert not _exchange([d for _t, d in net.delivered], ExchangeType.IKE_AUTH, True)
    failed = [e for e in net.events[A_ADDR] if isinstance(e, ev.IkeSaFailed)]
    assert failed and "no response to IKE_AUTH" in failed[0].reason


def test_a_reassembled_message_larger_than_allowed_is_discarded():
    a, b, frags = _after_ike_sa_init(_kw(_frag(400)), _kw(_frag(400, max_message=600)))
    (sa_b,) = b.sas()
    kept = 0
    for d in frags:
        b.receive_datagram(d.data, d.src, d.dst, T0)
        assert b.datagrams_to_send() == []
        if sa_b.reassembly is not None:
            assert sa_b.reassembly.octets() <= 600
            kept = max(kept, sa_b.reassembly.octets())
    assert kept > 0 and _drain(b) == []


def test_an_unfinished_set_is_discarded_after_the_reassembly_timeout():
    a, b, frags = _after_ike_sa_init(_kw(_frag(400)), _kw(_frag(400, reassembly_timeout=3.0)))
    (sa_b,) = b.sas()
    for d in frags[:-1]:
        b.receive_datagram(d.data, d.src, d.dst, T0)
    assert sa_b.reassembly is not None
    assert b.get_timer() <= T0 + 3.0        # the engine's timer covers the reassembly deadline
    b.handle_timer(T0 + 3.0)
    assert sa_b.reassembly is None
    last = frags[-1]
    b.receive_datagram(last.data, last.src, last.dst, T0 + 3.1)   # alone it completes nothing
    assert b.datagrams_to_send() == [] and _drain(b) == []
    for d in frags:                                                 # A's retransmission
        b.receive_datagram(d.data, d.src, d.dst, T0 + 4)
    assert [type(e).__name__ for e in _drain(b)] == ["IkeSaUp", "ChildSaInstalled"]


def test_a_stale_set_is_discarded_when_the_next_fragment_comes_after_the_timeout():
    a, b, frags = _after_ike_sa_init(_kw(_frag(400)), _kw(_frag(400, reassembly_timeout=3.0)))
    for d in frags[:-1]:
        b.receive_datagram(d.data, d.src, d.dst, T0)
    last = frags[-1]
    b.receive_datagram(last.data, last.src, last.dst, T0 + 5)    # no timer ran in between
    assert b.datagrams_to_send() == [] and _drain(b) == []


def test_a_set_is_discarded_when_its_message_arrives_whole():
    """The peer gave up fragmenting (or another path delivered it whole): the message ID moves
    on and the half-finished set goes at once, not at the timeout."""
    net = _net({}, {})
    _up(net)
    sa_a = net.engines[A_ADDR].current_sa("to-b")
    sa_b = net.engines[B_ADDR].current_sa("to-a")
    mid = sa_b.peer_mid
    large, _small = _informational_sets(net, mid)
    _to_b(net, large[0])
    assert sa_b.reassembly is not None
    whole = M.Message(sa_a.spi_i, sa_a.spi_r, ExchangeType.INFORMATIONAL, mid, False, True,
                      [M.VendorID(bytes(range(256)) * 2)], encrypted=True)
    out = _to_b(net, M.encode_message(whole, sa_a.cipher_out, bytes(8)))
    assert _answer(net, out) == f"INFORMATIONAL response {mid} [ SK{{}} ]"
    assert sa_b.reassembly is None and sa_b.peer_mid == mid + 1
    assert _to_b(net, large[1]) == []      # the rest of the old set: a retransmission, ignored
    assert sa_b.reassembly is None


def test_fragments_leave_room_for_headers_and_the_non_esp_marker():
    assert fragmentation.overhead(("192.0.2.1", 500), ("192.0.2.2", 500)) == 28
    assert fragmentation.overhead(("192.0.2.1", 4500), ("192.0.2.2", 4500)) == 32
    assert fragmentation.overhead(("2001:db8::1", 500), ("2001:db8::2", 500)) == 48
    assert fragmentation.overhead(("2001:db8::1", 4500), ("2001:db8::2", 4500)) == 52
    # behind a NAT the SA floats to 4500: every fragment still fits 400 octets with the marker
    nat = {(A_ADDR, 500): ("198.51.100.7", 500), (A_ADDR, 4500): ("198.51.100.7", 4500)}
    a, b = make_engines(1, _kw(_frag(400)), _kw(_frag(400), remote_addr=None, start=False))
    net = SimNet({A_ADDR: a, B_ADDR: b}, now=T0, nat=nat)
    a.start(net.now)
    b.start(net.now)
    _up(net)
    auth = [d for _t, d in net.delivered if _hdr(d).exchange_type == ExchangeType.IKE_AUTH]
    assert auth and all(d.dst[1] == 4500 and _skf(d) is not None for d in auth)
    assert all(len(d.data) + IP_UDP + 4 <= 400 for d in auth)
    assert any(len(d.data) + IP_UDP + 4 > 390 for d in auth)   # the room is used


# ------------------------------------------------------------------ §2.6.1 Total Fragments


def _informational_sets(net: SimNet, mid: int):
    """One INFORMATIONAL request from A, fragmented twice: fewer larger and more smaller
    fragments (as a sender that re-fragments after a PMTU problem would)."""
    sa_a = net.engines[A_ADDR].current_sa("to-b")
    msg = M.Message(sa_a.spi_i, sa_a.spi_r, ExchangeType.INFORMATIONAL, mid, False, True,
                    [M.VendorID(bytes(range(256)) * 2)], encrypted=True)
    rnd = random.Random(mid).randbytes
    large = fragmentation.encode_fragments(msg, sa_a.cipher_out, rnd, 300)
    small = fragmentation.encode_fragments(msg, sa_a.cipher_out, rnd, 150)
    assert len(small) > len(large) >= 2
    return large, small


def _to_b(net: SimNet, data: bytes) -> list[Datagram]:
    b = net.engines[B_ADDR]
    b.receive_datagram(data, (A_ADDR, 500), (B_ADDR, 500), net.now)
    return b.datagrams_to_send()


def _answer(net: SimNet, out: list[Datagram]) -> str:
    """B's one answer, decrypted with A's keys."""
    assert len(out) == 1
    return describe(net.engines[A_ADDR], out[0].data)


def test_more_total_fragments_restart_the_set_fewer_are_dropped():
    net = _net({}, {})
    _up(net)
    sa_b = net.engines[B_ADDR].current_sa("to-a")
    mid = sa_b.peer_mid
    large, small = _informational_sets(net, mid)
    # a larger Total Fragments replaces the set being reassembled
    assert _to_b(net, large[0]) == []
    out = []
    for d in small:
        out += _to_b(net, d)
    assert _answer(net, out) == f"INFORMATIONAL response {mid} [ SK{{}} ]"   # not INVALID_SYNTAX
    # the other way round: fragments with a smaller Total Fragments are dropped
    large, small = _informational_sets(net, mid + 1)
    assert _to_b(net, small[0]) == []
    for d in large:
        assert _to_b(net, d) == []
    for d in small[1:-1]:
        assert _to_b(net, d) == []
    out = _to_b(net, small[-1])
    assert _answer(net, out) == f"INFORMATIONAL response {mid + 1} [ SK{{}} ]"


def test_duplicate_fragments_are_ignored():
    net = _net({}, {})
    _up(net)
    mid = net.engines[B_ADDR].current_sa("to-a").peer_mid
    large, _small = _informational_sets(net, mid)
    for d in large[:-1]:
        for _ in range(3):
            assert _to_b(net, d) == []
    out = _to_b(net, large[-1])
    assert _answer(net, out) == f"INFORMATIONAL response {mid} [ SK{{}} ]"
    # a retransmission of the request: only its fragment 1 brings the cached response (§2.6.1)
    assert _to_b(net, large[1]) == []
    assert _to_b(net, large[0]) == out


# ------------------------------------------------------------------ codec


def _ciphers():
    return [SkCipher(EncrId.AES_GCM_16, 256, None, bytes(range(36))),
            SkCipher(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128, bytes(range(16)), bytes(range(32)))]


_inner = st.one_of(
    st.builds(M.VendorID, st.binary(min_size=1, max_size=300)),
    st.builds(M.Notify, st.integers(1, 65535), st.just(0), st.just(b""), st.binary(max_size=200)),
    st.builds(M.Nonce, st.binary(min_size=16, max_size=256)),
    st.builds(M.CERT, st.integers(1, 255), st.binary(max_size=1500)),
)


@settings(max_examples=120, deadline=None)
@given(st.lists(_inner, max_size=8), st.integers(0, 1), st.integers(120, 1500),
       st.sampled_from([ExchangeType.IKE_AUTH, ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL]),
       st.integers(0, 2**32 - 1), st.booleans())
def test_codec_round_trip(payloads, which, limit, xchg, mid, response):
    cipher = _ciphers()[which]
    msg = M.Message(bytes(range(1, 9)), bytes(range(9, 17)), xchg, mid, response, not response,
                    payloads, encrypted=True)
    if fragmentation.content_per_fragment(limit, cipher) < 1:
        return
    frags = fragmentation.encode_fragments(msg, cipher, random.Random(limit).randbytes, limit)
    inner = b""
    for i, data in enumerate(frags, 1):
        assert len(data) <= limit
        hdr = M.parse_header(data)
        assert hdr.next_payload == PayloadType.SKF and hdr.message_id == mid
        outer, enc = M.parse_message(data)
        assert isinstance(enc, M.EncryptedFragment) and outer.payloads == []
        assert (enc.fragment_number, enc.total_fragments) == (i, len(frags))
        assert enc.first_inner == ((payloads[0].payload_type if payloads else 0) if i == 1 else 0)
        inner += M.open_sk(data, enc.body_start, cipher)
        # every fragment is protected on its own, Fragment Number and Total Fragments included
        for at in (M.IKE_HEADER_LEN + 5, M.IKE_HEADER_LEN + 7, len(data) - 1):
            bad = bytearray(data)
            bad[at] ^= 0x80
            with pytest.raises(IntegrityError):
                M.open_sk(bytes(bad), enc.body_start, cipher)
    first = M.parse_message(frags[0])[1].first_inner
    assert M.parse_inner(inner, first) == payloads


def test_parse_refuses_an_skf_too_short_for_its_numbers():
    h = b"\x01" * 8 + b"\x02" * 8
    data = h + struct.pack("!BBBBII", PayloadType.SKF, 0x20, ExchangeType.IKE_AUTH, 0x08, 1, 28 + 6) + \
        struct.pack("!BBH", 0, 0, 6) + b"\x00\x01"
    with pytest.raises(M.ParseError):
        M.parse_message(data)


def test_config_limits():
    with pytest.raises(PolicyError):
        FragmentationConfig(size_ipv4=100)
    with pytest.raises(PolicyError):
        FragmentationConfig(max_fragments=0)
    with pytest.raises(PolicyError):
        FragmentationConfig(reassembly_timeout=0)
    c = FragmentationConfig(size_ipv4=576)
    assert c.size_for("192.0.2.1") == 576 and c.size_for("2001:db8::1") == 1280
