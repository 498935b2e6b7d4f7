"""DPD (RFC 7296 §2.4): the timeout counts from the last time the peer was heard, and the
liveness request is still retransmitted inside that window (appliance/ike/liveness.py)."""

from __future__ import annotations

import pytest

from appliance.ike import events as ev
from appliance.ike import message as M
from appliance.ike.constants import ExchangeType
from appliance.ike.policy import DpdConfig
from tests.unit.ike.simnet import A_ADDR, B_ADDR, SimNet, make_engines


def up(dpd: DpdConfig, b_dpd: DpdConfig | None = None) -> SimNet:
    a, b = make_engines(7, dict(dpd=dpd), dict(dpd=b_dpd) if b_dpd else None)
    net = SimNet({A_ADDR: a, B_ADDR: b})
    a.start(net.now)
    b.start(net.now)
    net.run_until(lambda: a.current_sa("to-b") is not None and b.current_sa("to-a") is not None, 30)
    net.run(0.5)
    return net


def cut(net: SimNet) -> list[tuple[float, int]]:
    """From now on every datagram is lost; returns (time, message id) of A's INFORMATIONAL
    requests that were sent into the void."""
    lost: list[tuple[float, int]] = []

    def drop(d, _n) -> bool:
        h = M.parse_header(d.data)
        if d.src[0] == A_ADDR and not h.is_response and h.exchange_type == ExchangeType.INFORMATIONAL:
            lost.append((net.now, h.message_id))
        return True

    net.faults.drop = drop
    return lost


def dead_at(net: SimNet, limit: float = 60) -> float:
    net.run_until(lambda: any(isinstance(e, ev.PeerDead) for e in net.events[A_ADDR]), limit)
    return net.now


def test_peer_dead_timeout_after_last_heard_not_after_the_request():
    net = up(DpdConfig(interval=1, timeout=3, action="clear"))
    a = net.engines[A_ADDR]
    heard = a.current_sa("to-b").last_heard
    lost = cut(net)
    t = dead_at(net)
    # the old behaviour: request at heard + 1, dead 3 s after it (heard + 4)
    assert t == pytest.approx(heard + 3, abs=0.05)
    # §2.4: the request went out after the interval and was retransmitted (same message id)
    times = [x for x, _ in lost]
    assert times[0] == pytest.approx(heard + 1, abs=0.05)
    assert len({mid for _, mid in lost}) == 1 and len(lost) >= 3, lost
    assert all(times[0] < x < t for x in times[1:])
    (pd,) = [e for e in net.events[A_ADDR] if isinstance(e, ev.PeerDead)]
    assert pd.action == "clear" and a.sas() == []


def test_inbound_esp_reported_by_the_daemon_defers_dpd_from_when_it_was_seen():
    net = up(DpdConfig(interval=1, timeout=3, action="clear"))
    a = net.engines[A_ADDR]
    lost = cut(net)
    net.run(0.3)
    assert not lost
    # the daemon's poll at now saw the ESP counters move since its previous poll, 0.25 s ago
    seen = net.now - 0.25
    a.traffic_seen("to-b", net.now, heard_at=seen)
    assert a.current_sa("to-b").last_heard == pytest.approx(seen)
    a.traffic_seen("to-b", net.now, heard_at=net.now + 5)     # never in the future
    assert a.current_sa("to-b").last_heard == pytest.approx(net.now)
    heard = net.now
    t = dead_at(net)
    assert lost[0][0] == pytest.approx(heard + 1, abs=0.05)
    assert t == pytest.approx(heard + 3, abs=0.05)


def test_esp_heard_while_the_request_is_outstanding_moves_the_deadline():
    net = up(DpdConfig(interval=1, timeout=3, action="clear"))
    a = net.engines[A_ADDR]
    lost = cut(net)
    net.run_until(lambda: bool(lost), 5)
    net.run(1.0)
    a.traffic_seen("to-b", net.now)            # the peer still sends ESP: it is alive
    heard = net.now
    t = dead_at(net)
    assert t == pytest.approx(heard + 3, abs=0.05)
    assert len({mid for _, mid in lost}) == 1   # one request, retransmitted all along


def test_an_answer_to_a_retransmission_keeps_the_peer_alive():
    net = up(DpdConfig(interval=1, timeout=3, action="clear"))
    lost = cut(net)
    net.run_until(lambda: len(lost) >= 2, 5)   # the request and its first retransmission lost
    net.faults.drop = None                      # the path is back before the deadline
    net.run(10)
    assert not any(isinstance(e, ev.PeerDead) for e in net.events[A_ADDR])
    assert net.engines[A_ADDR].current_sa("to-b") is not None


def test_interval_above_timeout_still_gives_the_request_a_window():
    # nothing heard for 10 s > timeout: the request is sent and given MIN_WINDOW (1 s),
    # retransmitted inside it, before the peer is declared dead
    net = up(DpdConfig(interval=10, timeout=3, action="clear"))
    heard = net.engines[A_ADDR].current_sa("to-b").last_heard
    lost = cut(net)
    t = dead_at(net)
    assert lost[0][0] == pytest.approx(heard + 10, abs=0.05)
    assert t == pytest.approx(lost[0][0] + 1.0, abs=0.05)
    assert len(lost) >= 3


def test_default_dpd_timing_unchanged_in_shape():
    # interval 30, timeout 150 (the engine's defaults): request at +30, usual back-off
    # (4 s, then 7.2 s, ...) while it fits the window, dead at +150 after the last heard
    net = up(DpdConfig())
    heard = net.engines[A_ADDR].current_sa("to-b").last_heard
    lost = cut(net)
    t = dead_at(net, 400)
    assert t == pytest.approx(heard + 150, abs=0.05)
    times = [x for x, _ in lost]
    assert times[0] == pytest.approx(heard + 30, abs=0.05)
    assert times[1] - times[0] == pytest.approx(4.0, abs=0.05)
    assert times[2] - times[1] == pytest.approx(7.2, abs=0.05)
