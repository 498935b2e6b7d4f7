"""Exchange collisions (RFC 7296 §2.8.1, §2.8.2, §2.25) and the field failures other
implementations had with them, reproduced with two engines and a scripted network."""

from __future__ import annotations

import pytest

from appliance.ike import events as ev
from appliance.ike import informational
from appliance.ike import message as M
from appliance.ike.constants import ExchangeType
from appliance.ike.message import TrafficSelector
from tests.unit.ike.simnet import (
    A_ADDR,
    B_ADDR,
    Faults,
    SimNet,
    installed_pair_ok,
    make_engines,
    one_ike_sa_each,
)


def up(seed: int = 1, a_kw=None, b_kw=None) -> SimNet:
    a, b = make_engines(seed, a_kw, b_kw)
    net = SimNet({A_ADDR: a, B_ADDR: b})
    a.start(net.now)
    b.start(net.now)
    net.run(5)
    assert installed_pair_ok(net) == []
    return net


def of(net, ip, cls):
    return [e for e in net.events[ip] if isinstance(e, cls)]


def sa_of(net, ip):
    return net.engines[ip].current_sa("to-b" if ip == A_ADDR else "to-a")


def is_(d, xchg, response, src):
    h = M.parse_header(d.data)
    return h.exchange_type == xchg and h.is_response == response and d.src[0] == src


class Script:
    """Drop or delay chosen datagrams: rules are (predicate, action) applied to the k-th match."""

    def __init__(self, net: SimNet) -> None:
        self.net = net
        self.rules: list[list] = []   # [pred, nth, action, seen]
        net.faults = Faults()
        net.faults.decide = self._decide   # type: ignore[method-assign]

    def drop(self, pred, nth: int = 0) -> "Script":
        self.rules.append([pred, nth, ("drop",), 0])
        return self

    def delay(self, pred, seconds: float, nth: int = 0) -> "Script":
        self.rules.append([pred, nth, ("delay", seconds), 0])
        return self

    def _decide(self, d):
        for r in self.rules:
            pred, nth, action, seen = r
            if pred(d):
                r[3] += 1
                if seen == nth:
                    return [] if action[0] == "drop" else [0.01 + action[1]]
        return [0.01]


def settle(net: SimNet, seconds: float = 400) -> None:
    net.run(seconds)
    problems = installed_pair_ok(net) + one_ike_sa_each(net)
    assert problems == [], "\n".join(problems + [f"{t:.2f} {s}->{d} {m}" for t, s, d, m in net.trace[-30:]])


def both_rekey_child(net: SimNet) -> None:
    net.engines[A_ADDR].rekey_child("to-b", net.now)
    net.engines[B_ADDR].rekey_child("to-a", net.now)


# ------------------------------------------------------------------ §2.8.1 Child SA rekey collision


@pytest.mark.parametrize("seed", range(1, 9))
def test_child_rekey_collision_leaves_one_pair(seed):
    net = up(seed)
    both_rekey_child(net)
    settle(net)
    # (a fresh pair's responder sends before the initiator has its answer: one round trip
    # without a matching SA is inherent while a tunnel has no pair at all)
    assert net.planes[A_ADDR].sending_on().spi in net.planes[B_ADDR].inbound
    # both rekeys succeeded; one new pair was redundant and deleted again
    for ip in (A_ADDR, B_ADDR):
        assert len(of(net, ip, ev.ChildSaInstalled)) == 3
        assert len(of(net, ip, ev.ChildSaDeleted)) == 2
    summaries = [m for _t, _s, _d, m in net.trace]
    assert sum("N(REKEY_SA)" in m for m in summaries) == 2
    # §2.8.1: the exchange holding the lowest of the four nonces made the redundant pair
    xa, xb = _exchange_nonces_and_spis(net, ExchangeType.CREATE_CHILD_SA)
    winner = xa if min(xa[0]) > min(xb[0]) else xb
    (a_in,) = net.planes[A_ADDR].inbound
    (b_in,) = net.planes[B_ADDR].inbound
    assert {a_in, b_in} == winner[1]


def _exchange_nonces_and_spis(net: SimNet, xchg: int):
    """For the two colliding exchanges (one initiated by each side): ((Ni, Nr), {SPIs})."""
    out = []
    for initiator in (A_ADDR, B_ADDR):
        req = next(m for _t, s, m in net.messages if m is not None and s == initiator
                   and m.exchange_type == xchg and not m.is_response and m.get(M.SA) is not None)
        resp = next(m for _t, s, m in net.messages if m is not None and s != initiator
                    and m.exchange_type == xchg and m.is_response and m.message_id == req.message_id
                    and m.get(M.SA) is not None)
        spis = {int.from_bytes(req.get(M.SA).proposals[0].spi, "big"),
                int.from_bytes(resp.get(M.SA).proposals[0].spi, "big")}
        out.append(((req.get(M.Nonce).data, resp.get(M.Nonce).data), spis))
    return out


def test_strongswan_1896_rekey_collision_with_a_lost_request_keeps_an_outbound_sa():
    """strongSwan #1896: A's rekey request is lost; A answers B's rekey; B finishes its rekey,
    answers A's retransmitted request with TEMPORARY_FAILURE and then deletes the old pair
    (its first DELETE lost too, so the retransmissions arrive in that order). A must end up
    sending on B's new pair (strongSwan installed no outbound SA)."""
    net = up(3)
    Script(net).drop(lambda d: is_(d, ExchangeType.CREATE_CHILD_SA, False, A_ADDR)) \
        .drop(lambda d: is_(d, ExchangeType.INFORMATIONAL, False, B_ADDR))
    both_rekey_child(net)
    net.run(30)
    to_a = [m for _t, s, _d, m in net.trace if s == B_ADDR]
    i_tf = next(i for i, m in enumerate(to_a) if m.startswith("CREATE_CHILD_SA response")
                and "TEMPORARY_FAILURE" in m)
    i_del = max(i for i, m in enumerate(to_a) if m.startswith("INFORMATIONAL request"))
    assert i_tf < i_del, to_a
    assert of(net, A_ADDR, ev.ChildSaOutboundInstalled)
    settle(net)
    # exactly one rekey took place: B's
    assert len(of(net, A_ADDR, ev.ChildSaInstalled)) == 2
    assert net.planes[A_ADDR].sending_on().spi in net.planes[B_ADDR].inbound
    assert net.traffic_gaps == 0


def test_strongswan_1896_variant_old_pair_already_deleted():
    """Same, but B's DELETE arrives first: the retransmitted rekey finds no pair at B
    (CHILD_SA_NOT_FOUND); A keeps B's new pair and does not rekey again."""
    net = up(3)
    Script(net).drop(lambda d: is_(d, ExchangeType.CREATE_CHILD_SA, False, A_ADDR))
    both_rekey_child(net)
    net.run(30)
    assert any("CHILD_SA_NOT_FOUND" in m for _t, _s, _d, m in net.trace)
    settle(net)
    assert len(of(net, A_ADDR, ev.ChildSaInstalled)) == 2
    assert net.traffic_gaps == 0


def test_strongswan_2477_our_rekey_refused_with_ts_unacceptable_during_a_collision():
    """strongSwan #2477: in a collision our rekey fails with TS_UNACCEPTABLE while the peer's
    succeeds; the peer's new pair must still get its outbound SA on our side."""
    net = up(5, b_kw=dict(local_ts=("10.2.0.0/16",), remote_ts=("0.0.0.0/0",)))
    # A asks for selectors on B's side that B's policy refuses (as the Cisco in #2477 did)
    a_child = sa_of(net, A_ADDR).children[0]
    bad = TrafficSelector.any(4).__class__(7, bytes([10, 99, 0, 0]), bytes([10, 99, 255, 255]))
    a_child.ts_r = [bad]
    both_rekey_child(net)
    net.run(30)
    summaries = [m for _t, s, _d, m in net.trace if s == B_ADDR]
    assert any("TS_UNACCEPTABLE" in m for m in summaries), summaries
    assert of(net, A_ADDR, ev.ChildSaOutboundInstalled)
    settle(net)
    assert len(of(net, A_ADDR, ev.ChildSaInstalled)) == 2    # only B's rekey
    assert net.traffic_gaps == 0


def test_strongswan_1458_delete_of_the_old_pair_before_the_rekey_response():
    """strongSwan #1458: the responder of our rekey deletes the old pair itself right after
    answering, and its DELETE is processed before the CREATE_CHILD_SA response. The new pair
    must survive (strongSwan removed it)."""
    net = up(7)
    Script(net).delay(lambda d: is_(d, ExchangeType.CREATE_CHILD_SA, True, B_ADDR), 0.5)
    net.engines[A_ADDR].rekey_child("to-b", net.now)
    b = sa_of(net, B_ADDR)
    old_b = b.children[0]
    net.run_until(lambda: old_b.rekeyed_by is not None, limit=5)
    # B (like the peer in #1458) deletes the old pair at once
    informational.delete_child(b, old_b, net.now, "responder deletes the rekeyed pair")
    net.run(5)
    trace_a = [m for _t, _s, d, m in net.trace if d == A_ADDR]
    i_del = next(i for i, m in enumerate(trace_a) if m.startswith("INFORMATIONAL request") and "DELETE" in m)
    i_resp = next(i for i, m in enumerate(trace_a) if m.startswith("CREATE_CHILD_SA response"))
    assert i_del < i_resp, trace_a
    settle(net)
    new = of(net, A_ADDR, ev.ChildSaInstalled)[1]
    assert new.spi_in in net.planes[A_ADDR].inbound       # the rekeyed pair is the one in use
    assert not [e for e in of(net, A_ADDR, ev.ChildSaDeleted) if e.spi_in == new.spi_in]


def test_delete_crossing_our_rekey_of_the_same_pair():
    """The peer deletes the pair (not a rekey) while we rekey it: the peer answers our rekey
    with TEMPORARY_FAILURE or CHILD_SA_NOT_FOUND; a new pair is created from scratch."""
    net = up(9)
    b = sa_of(net, B_ADDR)
    net.engines[A_ADDR].rekey_child("to-b", net.now)
    informational.delete_child(b, b.children[0], net.now, "closing")
    settle(net, 600)


def test_simultaneous_child_sa_deletes():
    net = up(11)
    a, b = sa_of(net, A_ADDR), sa_of(net, B_ADDR)
    informational.delete_child(a, a.children[0], net.now, "closing")
    informational.delete_child(b, b.children[0], net.now, "closing")
    net.run(3)
    for ip in (A_ADDR, B_ADDR):
        assert len(of(net, ip, ev.ChildSaDeleted)) == 1
    responses = [m for _t, _s, _d, m in net.trace if m.startswith("INFORMATIONAL response")]
    assert responses and all("DELETE" not in m for m in responses)   # §1.4.1: answer without it
    settle(net, 600)   # A (start=True) creates a new pair


def test_rekey_of_an_unknown_pair_gets_child_sa_not_found():
    net = up(13)
    a = sa_of(net, A_ADDR)
    child = a.children[0]
    child.spi_in = b"\x01\x02\x03\x04"     # B knows no pair with this SPI
    net.engines[A_ADDR].rekey_child("to-b", net.now)
    net.run(3)
    assert any("CHILD_SA_NOT_FOUND" in m for _t, _s, _d, m in net.trace)


# ------------------------------------------------------------------ §2.8.2 IKE SA rekey collision


@pytest.mark.parametrize("seed", range(1, 7))
def test_ike_rekey_collision_leaves_one_ike_sa(seed):
    net = up(seed)
    net.engines[A_ADDR].rekey_ike("to-b", net.now)
    net.engines[B_ADDR].rekey_ike("to-a", net.now)
    settle(net)
    assert len(of(net, A_ADDR, ev.IkeSaRekeyed)) == 1 and len(of(net, B_ADDR, ev.IkeSaRekeyed)) == 1
    assert of(net, A_ADDR, ev.IkeSaRekeyed)[0] == ev.IkeSaRekeyed(
        "to-b", *[getattr(of(net, B_ADDR, ev.IkeSaRekeyed)[0], f) for f in
                  ("old_spi_i", "old_spi_r", "new_spi_i", "new_spi_r", "proposal")])
    assert not of(net, A_ADDR, ev.IkeSaDown) and not of(net, B_ADDR, ev.IkeSaDown)
    assert not of(net, A_ADDR, ev.ChildSaDeleted)
    # §2.8.2: the exchange holding the lowest nonce made the redundant IKE SA
    xa, xb = _exchange_nonces_and_spis(net, ExchangeType.CREATE_CHILD_SA)
    winner = xa if min(xa[0]) > min(xb[0]) else xb
    sa = sa_of(net, A_ADDR)
    assert {int.from_bytes(sa.spi_i, "big"), int.from_bytes(sa.spi_r, "big")} == winner[1]


def test_ike_rekey_collision_with_the_losers_delete_lost():
    net = up(2)
    Script(net).drop(lambda d: is_(d, ExchangeType.INFORMATIONAL, False, A_ADDR)) \
        .drop(lambda d: is_(d, ExchangeType.INFORMATIONAL, False, B_ADDR))
    net.engines[A_ADDR].rekey_ike("to-b", net.now)
    net.engines[B_ADDR].rekey_ike("to-a", net.now)
    settle(net)


def test_child_rekey_during_ike_rekey_gets_temporary_failure_and_retries():
    net = up(4)
    net.engines[A_ADDR].rekey_ike("to-b", net.now)
    net.engines[B_ADDR].rekey_child("to-a", net.now)
    net.run(5)
    assert any("TEMPORARY_FAILURE" in m for _t, _s, _d, m in net.trace)
    settle(net)


# ------------------------------------------------------------------ crossing streams


def test_libreswan_2184_crossing_ike_sa_initiations_leave_one_ike_sa_and_one_pair():
    """libreswan #2184: both peers initiate at once; each ends up with two Child SAs unless
    the duplicates are resolved the same way on both sides (the kernel then sends on an SA
    the peer has no inbound SA for)."""
    for seed in range(1, 9):
        a, b = make_engines(seed, None, dict(start=True))
        net = SimNet({A_ADDR: a, B_ADDR: b})
        a.start(net.now)
        b.start(net.now)
        settle(net)
        assert net.planes[A_ADDR].sending_on().spi in net.planes[B_ADDR].inbound
        assert net.planes[B_ADDR].sending_on().spi in net.planes[A_ADDR].inbound


def test_crossing_create_child_sa_requests_leave_one_pair():
    net = up(6, b_kw=dict(start=True))
    a, b = sa_of(net, A_ADDR), sa_of(net, B_ADDR)
    # both delete the pair at once; both (start=True) recreate it after the same delay
    informational.delete_child(a, a.children[0], net.now, "closing")
    informational.delete_child(b, b.children[0], net.now, "closing")
    net.run(20)
    created = [m for _t, _s, _d, m in net.trace if m.startswith("CREATE_CHILD_SA request")]
    assert len(created) == 2 and not any("REKEY_SA" in m for m in created)
    settle(net)
    # (a fresh pair's responder sends before the initiator has its answer: one round trip
    # without a matching SA is inherent while a tunnel has no pair at all)
    assert net.planes[A_ADDR].sending_on().spi in net.planes[B_ADDR].inbound
