"""One engine with several tunnels (a hub with spokes) in the simulated network.

The engine only looks again at tunnels whose SAs changed or whose reconnect/retry time has
come (no pass over every tunnel per datagram), and finds the candidate tunnels of an
IKE_SA_INIT through an index by remote address. These tests pin what that must not change:
every tunnel comes up, a lost tunnel is brought back by itself without disturbing the others,
and candidates keep the configured tunnel order.
"""

from __future__ import annotations

import random

from appliance.ike import events as ev
from appliance.ike.engine import IkeEngine
from appliance.ike.policy import DpdConfig, Identity, TunnelConfig
from tests.unit.ike.simnet import PSK, SimNet

HUB = "192.0.2.1"
SPOKES = {"s1": "192.0.2.11", "s2": "192.0.2.12", "s3": "192.0.2.13"}


def _tunnel(name: str, local: str, remote: str | None, lid: str, rid: str | None, *, start: bool) -> TunnelConfig:
    return TunnelConfig(name=name, local_addr=local, remote_addr=remote, local_id=Identity.parse(lid),
                        remote_id=Identity.parse(rid) if rid else None, psk=PSK, if_id=7, start=start,
                        dpd=DpdConfig(interval=0, timeout=30, action="restart"))


def hub_and_spokes(seed: int = 3) -> SimNet:
    """The hub initiates to s1, answers s2 (which initiates), and answers anybody with the hub's
    identity on a catch-all tunnel (s3 comes in there)."""
    rnd = random.Random(seed)
    hub = IkeEngine([
        _tunnel("to-s1", HUB, SPOKES["s1"], "hub.example.net", "s1.example.net", start=True),
        _tunnel("to-s2", HUB, SPOKES["s2"], "hub.example.net", "s2.example.net", start=False),
        _tunnel("anyone", HUB, None, "hub.example.net", None, start=False),
    ], random=rnd.randbytes)
    spokes = {
        "s1": IkeEngine([_tunnel("to-hub", SPOKES["s1"], HUB, "s1.example.net", "hub.example.net", start=False)],
                        random=rnd.randbytes),
        "s2": IkeEngine([_tunnel("to-hub", SPOKES["s2"], HUB, "s2.example.net", "hub.example.net", start=True)],
                        random=rnd.randbytes),
        "s3": IkeEngine([_tunnel("to-hub", SPOKES["s3"], HUB, "s3.example.net", "hub.example.net", start=True)],
                        random=rnd.randbytes),
    }
    net = SimNet({HUB: hub, **{SPOKES[k]: e for k, e in spokes.items()}})
    for e in net.engines.values():
        e.start(net.now)
    net.run(60)
    return net


def up_tunnels(net: SimNet, ip: str) -> list[str]:
    return sorted(e.tunnel for e in net.events[ip] if isinstance(e, ev.IkeSaUp))


def test_every_tunnel_of_the_hub_comes_up_once():
    net = hub_and_spokes()
    assert up_tunnels(net, HUB) == ["anyone", "to-s1", "to-s2"]
    installed = [e for e in net.events[HUB] if isinstance(e, ev.ChildSaInstalled)]
    assert sorted((e.tunnel, e.remote_addr) for e in installed) == [
        ("anyone", SPOKES["s3"]), ("to-s1", SPOKES["s1"]), ("to-s2", SPOKES["s2"])]
    for ip in SPOKES.values():
        assert up_tunnels(net, ip) == ["to-hub"]
    hub = net.engines[HUB]
    assert {sa.tunnel for sa in hub.sas()} == {"anyone", "to-s1", "to-s2"} and len(hub.sas()) == 3


def test_a_lost_tunnel_comes_back_alone():
    net = hub_and_spokes()
    hub = net.engines[HUB]
    before = {t: hub.current_sa(t) for t in ("anyone", "to-s1", "to-s2")}
    mark = len(net.events[HUB])
    # s1 deletes its IKE SA and holds; the hub keeps to-s1 up (start=True) so it reconnects
    net.engines[SPOKES["s1"]].terminate("to-hub", net.now)
    net.run(120)
    later = net.events[HUB][mark:]
    assert [e.tunnel for e in later if isinstance(e, ev.IkeSaDown)] == ["to-s1"]
    assert [e.tunnel for e in later if isinstance(e, ev.IkeSaUp)] == ["to-s1"]
    assert hub.current_sa("to-s1") is not None and hub.current_sa("to-s1") is not before["to-s1"]
    assert hub.current_sa("anyone") is before["anyone"] and hub.current_sa("to-s2") is before["to-s2"]
    # the reconnect waited for the back-off instead of following the DELETE at once
    down_at = next(t for t, src, _dst, s in net.trace if src == SPOKES["s1"] and "SK{DELETE}" in s)
    init_at = max(t for t, src, dst, s in net.trace if src == HUB and dst == SPOKES["s1"] and "IKE_SA_INIT" in s)
    assert init_at - down_at >= 5.0


def test_candidates_keep_the_configured_order():
    cfgs = [_tunnel("a", HUB, "198.51.100.7", "hub.example.net", None, start=False),
            _tunnel("wild", HUB, None, "hub.example.net", None, start=False),
            _tunnel("b", HUB, "198.51.100.7", "hub.example.net", None, start=False),
            _tunnel("other", HUB, "198.51.100.8", "hub.example.net", None, start=False),
            _tunnel("elsewhere", "192.0.2.99", "198.51.100.7", "hub.example.net", None, start=False)]
    e = IkeEngine(cfgs, random=random.Random(1).randbytes)
    names = lambda local, remote: [c.name for c in e.configs_for((local, 500), (remote, 500))]  # noqa: E731
    assert names(HUB, "198.51.100.7") == ["a", "wild", "b"]
    assert names(HUB, "198.51.100.8") == ["wild", "other"]
    assert names(HUB, "203.0.113.1") == ["wild"]
    assert names("192.0.2.99", "198.51.100.7") == ["elsewhere"]
    e.add_tunnel(_tunnel("late", HUB, "198.51.100.8", "hub.example.net", None, start=False))
    assert names(HUB, "198.51.100.8") == ["wild", "other", "late"]
    e.remove_tunnel("wild", 0.0)
    assert names(HUB, "198.51.100.7") == ["a", "b"]
