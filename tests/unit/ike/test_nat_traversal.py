"""NAT traversal in the engine (RFC 7296 §2.23, RFC 3948), on the SimNet with a NAT in front of A:
detection and the float to port 4500, nat_traversal force / off, NAT keepalives from the side
behind the NAT only and only while idle, and a NAT rebinding followed without a rekey."""

from __future__ import annotations

import random

import pytest

from appliance.ike import events as ev
from appliance.ike import message as M
from appliance.ike import natd
from appliance.ike.constants import ExchangeType, NotifyType
from appliance.ike.engine import IkeEngine
from appliance.ike.policy import DpdConfig, PolicyError
from tests.unit.ike.simnet import B_ADDR, SimNet, make_engines, tunnel

T0 = 1000.0
PRIVATE, PUBLIC = "10.0.0.1", "198.51.100.1"
NAT = {(PRIVATE, 500): (PUBLIC, 40500), (PRIVATE, 4500): (PUBLIC, 41500)}


def _nat_net(a_kw=None, b_kw=None, nat=True, run=5.0):
    """A at PRIVATE (behind a NAT when `nat`) initiating to B."""
    a = IkeEngine([tunnel("a", local_addr=PRIVATE, **(a_kw or {}))], random=random.Random(1).randbytes)
    b = IkeEngine([tunnel("b", remote_addr=PUBLIC if nat else PRIVATE, **(b_kw or {}))],
                  random=random.Random(2).randbytes)
    net = SimNet({PRIVATE: a, B_ADDR: b}, nat=NAT if nat else None, now=T0)
    a.start(net.now)
    net.run(run)
    return net, a, b


def _events(net, ip, kind):
    return [e for e in net.events[ip] if isinstance(e, kind)]


def _sent(net, exchange, *, response):
    out = []
    for _t, d in net.delivered:
        h = M.parse_header(d.data)
        if h.exchange_type == exchange and h.is_response == response:
            out.append(d)
    return out


def _notify_types(data: bytes) -> set[int]:
    msg, _ = M.parse_message(data)
    return {n.notify_type for n in msg.notifies()}


NATD = {NotifyType.NAT_DETECTION_SOURCE_IP, NotifyType.NAT_DETECTION_DESTINATION_IP}


# ------------------------------------------------------------------ detection and the float


def test_a_nat_is_detected_and_both_sides_float_to_4500_with_udp_encapsulated_esp():
    net, a, b = _nat_net()
    sa_a, sa_b = a.current_sa("to-b"), b.current_sa("to-a")
    assert (sa_a.nat_local, sa_a.nat_remote) == (True, False)
    assert (sa_b.nat_local, sa_b.nat_remote) == (False, True)
    (auth_req,) = _sent(net, ExchangeType.IKE_AUTH, response=False)
    assert (auth_req.src, auth_req.dst) == ((PUBLIC, 41500), (B_ADDR, 4500))   # after the NAT
    (auth_resp,) = _sent(net, ExchangeType.IKE_AUTH, response=True)
    assert auth_resp.dst == (PRIVATE, 4500) and auth_resp.src == (B_ADDR, 4500)
    (ia,) = _events(net, PRIVATE, ev.ChildSaInstalled)
    (ib,) = _events(net, B_ADDR, ev.ChildSaInstalled)
    assert (ia.udp_encap, ia.local_addr, ia.local_port, ia.remote_addr, ia.remote_port) == \
        (True, PRIVATE, 4500, B_ADDR, 4500)
    assert (ib.udp_encap, ib.local_addr, ib.local_port, ib.remote_addr, ib.remote_port) == \
        (True, B_ADDR, 4500, PUBLIC, 41500)


def test_without_a_nat_the_sa_stays_on_500_and_esp_is_not_encapsulated():
    net, a, b = _nat_net(nat=False)
    assert not a.current_sa("to-b").udp_encap and not b.current_sa("to-a").udp_encap
    (auth_req,) = _sent(net, ExchangeType.IKE_AUTH, response=False)
    assert auth_req.dst == (B_ADDR, 500)
    for ip in (PRIVATE, B_ADDR):
        (i,) = _events(net, ip, ev.ChildSaInstalled)
        assert (i.udp_encap, i.local_port, i.remote_port) == (False, 500, 500)


# ------------------------------------------------------------------ force


@pytest.mark.parametrize("forcing", ["a", "b"])
def test_force_encapsulates_without_a_nat(forcing):
    kw = dict(nat_traversal="force")
    net, a, b = _nat_net(a_kw=kw if forcing == "a" else None, b_kw=kw if forcing == "b" else None, nat=False)
    sa_a, sa_b = a.current_sa("to-b"), b.current_sa("to-a")
    forcer, other = (sa_a, sa_b) if forcing == "a" else (sa_b, sa_a)
    # the forcing side's fake source hash makes the other one see a NAT; no one is behind one
    assert forcer.nat_fake and not forcer.nat_local and not forcer.nat_remote
    assert other.nat_remote and not other.nat_local and not other.nat_fake
    (init_req,) = _sent(net, ExchangeType.IKE_SA_INIT, response=False)
    (init_resp,) = _sent(net, ExchangeType.IKE_SA_INIT, response=True)
    forced_msg = init_req if forcing == "a" else init_resp
    msg, _ = M.parse_message(forced_msg.data)
    real = natd.payloads(msg.spi_i, msg.spi_r, forced_msg.src, forced_msg.dst)
    source = msg.notify(NotifyType.NAT_DETECTION_SOURCE_IP).data
    assert len(source) == 20 and source != real[0].data
    assert msg.notify(NotifyType.NAT_DETECTION_DESTINATION_IP).data == real[1].data
    (auth_req,) = _sent(net, ExchangeType.IKE_AUTH, response=False)
    assert (auth_req.src, auth_req.dst) == ((PRIVATE, 4500), (B_ADDR, 4500))
    for ip in (PRIVATE, B_ADDR):
        (i,) = _events(net, ip, ev.ChildSaInstalled)
        assert (i.udp_encap, i.local_port, i.remote_port) == (True, 4500, 4500)
    net.run(200)
    assert net.keepalives == []   # nobody is behind a NAT: nothing to keep open


# ------------------------------------------------------------------ off


def test_off_on_the_initiator_sends_no_nat_detection_and_never_floats():
    net, a, b = _nat_net(a_kw=dict(nat_traversal="off"))
    (init_req,) = _sent(net, ExchangeType.IKE_SA_INIT, response=False)
    (init_resp,) = _sent(net, ExchangeType.IKE_SA_INIT, response=True)
    assert not NATD & _notify_types(init_req.data)
    assert not NATD & _notify_types(init_resp.data)   # §2.23: not to a peer that sent none
    (auth_req,) = _sent(net, ExchangeType.IKE_AUTH, response=False)
    assert (auth_req.src, auth_req.dst) == ((PUBLIC, 40500), (B_ADDR, 500))
    assert a.current_sa("to-b").established and not a.current_sa("to-b").udp_encap
    assert not b.current_sa("to-a").udp_encap
    (i,) = _events(net, PRIVATE, ev.ChildSaInstalled)
    assert (i.udp_encap, i.local_port, i.remote_port) == (False, 500, 500)
    net.run(100)
    assert net.keepalives == []


def test_off_on_the_responder_ignores_the_nat_and_answers_without_nat_detection():
    net, a, b = _nat_net(b_kw=dict(nat_traversal="off"))
    (init_req,) = _sent(net, ExchangeType.IKE_SA_INIT, response=False)
    (init_resp,) = _sent(net, ExchangeType.IKE_SA_INIT, response=True)
    assert NATD <= _notify_types(init_req.data)
    assert not NATD & _notify_types(init_resp.data)
    sa_a, sa_b = a.current_sa("to-b"), b.current_sa("to-a")
    assert not sa_a.udp_encap and not sa_b.udp_encap   # A cannot detect anything: no float
    (auth_req,) = _sent(net, ExchangeType.IKE_AUTH, response=False)
    assert auth_req.dst == (B_ADDR, 500)


def test_nat_traversal_settings_are_validated():
    with pytest.raises(PolicyError, match="nat_traversal 'sometimes'"):
        tunnel("a", nat_traversal="sometimes")
    for bad in (-1, 0.5, 3601):
        with pytest.raises(PolicyError, match="nat_keepalive"):
            tunnel("a", nat_keepalive=bad)
    assert tunnel("a", nat_keepalive=0).nat_keepalive == 0


# ------------------------------------------------------------------ keepalives


def test_keepalives_go_every_20_s_from_the_side_behind_the_nat_only():
    net, a, b = _nat_net()
    last_ike = a.current_sa("to-b").last_sent
    net.run(100)
    assert net.keepalives, "no NAT keepalive in 100 s"
    for _t, d in net.keepalives:
        assert (d.data, d.src, d.dst) == (b"\xff", (PUBLIC, 41500), (B_ADDR, 4500))   # through the NAT
    times = [t for t, _d in net.keepalives]
    # the first one 20 s after A last sent anything (its IKE_AUTH request), then every 20 s
    assert times[0] == pytest.approx(last_ike + 20, abs=0.05)
    assert [round(y - x, 3) for x, y in zip(times, times[1:])] == [20.0] * (len(times) - 1)
    assert len(times) == 5
    assert b.current_sa("to-a").keepalives_sent == 0


def test_the_keepalive_interval_is_configurable_and_0_sends_none():
    net, _a, _b = _nat_net(a_kw=dict(nat_keepalive=7))
    net.run(70)
    times = [t for t, _d in net.keepalives]
    assert len(times) == 10 and {round(y - x, 3) for x, y in zip(times, times[1:])} == {7.0}
    net, _a, _b = _nat_net(a_kw=dict(nat_keepalive=0))
    net.run(200)
    assert net.keepalives == []


def test_keepalives_only_while_idle():
    # IKE traffic every 15 s (DPD from A) keeps the mapping: no keepalive needed
    net, a, _b = _nat_net(a_kw=dict(dpd=DpdConfig(interval=15, timeout=30, action="restart")))
    net.run(100)
    assert net.keepalives == []
    # ESP the data plane reports sending every 10 s: none either; when it stops, they start
    net, a, _b = _nat_net()
    for _ in range(10):
        a.traffic_sent("to-b", net.now)
        net.run(10)
    assert net.keepalives == []
    stopped = net.now - 10
    net.run(45)
    # (arrival times: 10 ms on the simulated wire)
    assert [t - stopped for t, _d in net.keepalives] == pytest.approx([20.01, 40.01], abs=1e-6)


def test_keepalives_continue_across_an_ike_rekey():
    net, a, _b = _nat_net()
    old = a.current_sa("to-b")
    a.rekey_ike("to-b", net.now)
    net.run(5)
    new = a.current_sa("to-b")
    assert new is not old and _events(net, PRIVATE, ev.IkeSaRekeyed) and new.nat_local
    before = len(net.keepalives)
    net.run(60)
    assert len(net.keepalives) - before == 3
    assert all(d.src == (PUBLIC, 41500) for _t, d in net.keepalives)


# ------------------------------------------------------------------ rebinding


def test_a_nat_rebinding_is_followed_without_a_rekey():
    net, a, b = _nat_net(a_kw=dict(dpd=DpdConfig(interval=30, timeout=60, action="restart")))
    installed = {ip: len(_events(net, ip, ev.ChildSaInstalled)) for ip in (PRIVATE, B_ADDR)}
    sa_b = b.current_sa("to-a")
    spis = (sa_b.spi_i, sa_b.spi_r)
    # conntrack flushed: A's packets now leave from another public port
    net.rebind((PRIVATE, 4500), (PUBLIC, 52000))
    net.run(40)   # A's next DPD request comes from the new mapping
    (moved,) = _events(net, B_ADDR, ev.IkeSaAddressesUpdated)
    assert (moved.local, moved.remote, moved.udp_encap) == ((B_ADDR, 4500), (PUBLIC, 52000), True)
    assert (moved.spi_i, moved.spi_r) == spis
    assert b.current_sa("to-a") is sa_b and sa_b.remote == (PUBLIC, 52000)
    # A is behind the NAT: it never moves (its side of the SA is unchanged)
    assert _events(net, PRIVATE, ev.IkeSaAddressesUpdated) == []
    assert a.current_sa("to-b").remote == (B_ADDR, 4500)
    # no rekey, no new Child SA, nothing else
    assert {ip: len(_events(net, ip, ev.ChildSaInstalled)) for ip in (PRIVATE, B_ADDR)} == installed
    assert _events(net, B_ADDR, ev.ChildSaRekeyed) == [] and _events(net, B_ADDR, ev.IkeSaRekeyed) == []
    # B's next request reaches A through the new mapping, and A answers it
    b.rekey_child("to-a", net.now)
    net.run(5)
    (i,) = _events(net, B_ADDR, ev.ChildSaInstalled)[installed[B_ADDR]:]
    assert (i.remote_addr, i.remote_port, i.udp_encap) == (PUBLIC, 52000, True)
    assert _events(net, B_ADDR, ev.ChildSaRekeyed)
    # keepalives now go out through the new mapping
    net.keepalives.clear()
    net.run(30)
    assert net.keepalives and all(d.src == (PUBLIC, 52000) for _t, d in net.keepalives)


def test_a_keepalive_or_unauthenticated_datagram_from_a_new_port_does_not_move_the_peer():
    net, a, b = _nat_net()
    sa_b = b.current_sa("to-a")
    b.receive_datagram(b"\xff", (PUBLIC, 53000), (B_ADDR, 4500), net.now)
    (auth_req,) = _sent(net, ExchangeType.IKE_AUTH, response=False)
    b.receive_datagram(auth_req.data, (PUBLIC, 53000), (B_ADDR, 4500), net.now)   # a replay
    b.datagrams_to_send()
    assert sa_b.remote == (PUBLIC, 41500)
    assert _events(net, B_ADDR, ev.IkeSaAddressesUpdated) == []
    while (e := b.next_event()) is not None:
        assert not isinstance(e, ev.IkeSaAddressesUpdated)


def test_make_engines_without_nat_sends_no_keepalives():
    a, b = make_engines(3)
    net = SimNet({a.tunnels()[0].local_addr: a, b.tunnels()[0].local_addr: b}, now=T0)
    a.start(net.now)
    net.run(120)
    assert net.keepalives == []


# ------------------------------------------------------------------ the hand-off to the data plane


def _kernel_view(net, ip):
    from appliance.tunnels import kernel_child
    from appliance.xfrm import TunnelInterface
    from appliance.xfrm.hook import tunnel_mtu

    (inst,) = _events(net, ip, ev.ChildSaInstalled)
    child = kernel_child(inst)
    return child, tunnel_mtu(TunnelInterface("to-b", "xfrm-b"), child, 1500)


def test_the_kernel_sa_is_esp_in_udp_and_the_mtu_and_mss_lose_exactly_the_udp_header():
    from appliance.xfrm import UdpEncap

    plain, _a, _b = _nat_net(nat=False)
    natted, _a, _b = _nat_net()
    c_plain, m_plain = _kernel_view(plain, PRIVATE)
    c_nat, m_nat = _kernel_view(natted, PRIVATE)
    c_nat_b, m_nat_b = _kernel_view(natted, B_ADDR)
    assert c_plain.endpoints.encap is None
    assert c_nat.endpoints.encap == UdpEncap(4500, 4500)
    assert c_nat_b.endpoints.encap == UdpEncap(4500, 41500)   # B sends to A's public mapping
    assert str(c_nat_b.endpoints.remote) == PUBLIC
    # AES-GCM over a 1500-byte IPv4 underlay: 1446 plain, 8 bytes (RFC 768 header) less in UDP
    assert (m_plain.mtu, m_nat.mtu, m_nat_b.mtu) == (1446, 1438, 1438)
    assert (m_plain.mss4 - m_nat.mss4, m_plain.mss6 - m_nat.mss6) == (8, 8)


def test_a_rebinding_gives_the_data_plane_the_new_encapsulation_ports():
    from appliance.tunnels import endpoints_of
    from appliance.xfrm import Endpoints, UdpEncap

    net, _a, b = _nat_net(a_kw=dict(dpd=DpdConfig(interval=30, timeout=60, action="restart")))
    net.rebind((PRIVATE, 4500), (PUBLIC, 52000))
    net.run(40)
    (moved,) = _events(net, B_ADDR, ev.IkeSaAddressesUpdated)
    assert endpoints_of(moved) == Endpoints(B_ADDR, PUBLIC, UdpEncap(4500, 52000))
