"""bgp.prefer_static: a prefix both in a tunnel's static `routes:` and learned over BGP (a real
BIRD 2 peer in its own namespace). The kernel chooses by metric - static routes at the kernel's
default (ahead of BGP's 2000) with prefer_static: true, at 3000 (behind) with false - and
`show routes` marks the same route `active`. Both settings from the start, then flipped by a
reload (the installed static route moves to the other metric), then the BGP route withdrawn
(the static one carries the prefix whatever the setting)."""

from __future__ import annotations

import ipaddress
import json

import pytest

from appliance.config import load_config
from appliance.control_handlers import static_route_rows
from appliance.static_routes import STATIC_METRIC_BEHIND_BGP, StaticRoutes, static_metric
from appliance.tunnels import plan_tunnels
from tests.host.route_manager_env import Appliance, tunnel_yaml
from tests.peers.bird import Bird
from tests.peers.daemon import BgpNeighbor

pytestmark = pytest.mark.host

BOTH = "10.2.0.0/16"        # static on to-s and announced by the peer on to-b
BGP_ONLY = "10.3.0.0/16"
VIA_B = {("169.254.21.2", "xfrm-b")}


def config(prefer_static: bool) -> str:
    return ("appliance: {name: a, router_id: 10.255.0.1}\ntunnels:\n"
            + tunnel_yaml("to-b", 1, 65002, imp="from-peer", exp="to-peer")
            + "  to-s:\n    remote: 198.51.100.9\n    auth: {psk_file: secrets/t.psk}\n"
              f"    interface: {{name: xfrm-s, address: 169.254.29.1/30}}\n    routes: [{BOTH}]\n"
            + f"bgp:\n  asn: 65001\n  announce: [10.1.0.0/16]\n  prefer_static: {str(prefer_static).lower()}\n"
              "  policies:\n    from-peer: {prefixes: [{prefix: 10.0.0.0/8, le: 24}]}\n"
              "    to-peer: {prefixes: [{prefix: 10.1.0.0/16}]}\n")


def dev_for(app: Appliance, addr: str) -> str:
    return json.loads(app.ns.run(["ip", "-j", "route", "get", addr]).stdout)[0]["dev"]


def static_in_kernel(app: Appliance) -> list[tuple[str, int]]:
    rows = json.loads(app.ns.run(["ip", "-j", "route", "show", BOTH, "proto", "73"]).stdout or "[]")
    return [(r["dev"], r.get("metric", 0)) for r in rows]


def show_routes(app: Appliance, static: StaticRoutes, ifindex: int) -> dict[tuple[str, str, str], dict]:
    """`show routes` as isthmusd builds it (control_handlers.h_routes): the static rows from the
    plans and the kernel, merged by the route manager."""
    plans = plan_tunnels(load_config(app.config_path))
    kernel = {(str(p), i) for p, i in static.ours()}
    rows = static_route_rows(plans, kernel, {"to-s": ifindex})
    return {(r["prefix"], r["source"], r["tunnel"]): r for r in app.call(lambda: app.mgr.show_routes(rows))}


def check(app: Appliance, static: StaticRoutes, ifindex: int, prefer_static: bool) -> None:
    # the kernel: which route carries the prefix, and the static one's metric
    assert dev_for(app, "10.2.0.5") == ("xfrm-s" if prefer_static else "xfrm-b")
    assert dev_for(app, "10.3.0.5") == "xfrm-b"
    assert static_in_kernel(app) == [("xfrm-s", 0 if prefer_static else STATIC_METRIC_BEHIND_BGP)]
    assert app.fib() == {BOTH: VIA_B, BGP_ONLY: VIA_B}          # BGP's route is installed either way
    # show routes says the same
    rows = show_routes(app, static, ifindex)
    s, b = rows[(BOTH, "static", "to-s")], rows[(BOTH, "bgp", "to-b")]
    assert s["installed"] and b["installed"] and b["best"]
    assert (s["active"], b["active"]) == (prefer_static, not prefer_static), (s, b)
    loser = b if prefer_static else s
    assert "bgp.prefer_static" in loser["reason"], loser
    assert rows[(BGP_ONLY, "bgp", "to-b")]["active"]


@pytest.mark.parametrize("prefer_static", [True, False], ids=["prefer_static-true", "prefer_static-false"])
def test_prefer_static_decides_in_the_fib_and_in_show_routes(prefer_static, tmp_path):
    with Appliance(tmp_path, config(prefer_static), [("to-b", 1)]) as app:
        app.ns.run("ip link add xfrm-s type veth peer name s-peer && ip link set xfrm-s up && "
                   "ip link set s-peer up && ip addr add 169.254.29.1/30 dev xfrm-s")
        ifindex = json.loads(app.ns.run(["ip", "-j", "link", "show", "xfrm-s"]).stdout)[0]["ifindex"]
        p = app.peers["to-b"]
        peer = Bird(tmp_path / "bird", p.name, router_id=p.address, local_as=65002, announce=[BOTH, BGP_ONLY],
                    neighbors=[BgpNeighbor(p.app_address, 65001, local_address=p.address, hold_time=3)])
        peer.start()
        # what the daemon's data plane worker does when to-s's Child SA is up
        static = StaticRoutes(netns=app.ns.name, metric=static_metric(prefer_static))
        try:
            app.start()
            assert static.install(ifindex, [ipaddress.ip_network(BOTH)]) == []
            app.tunnel_up("to-b")
            app.wait_fib({BOTH: VIA_B, BGP_ONLY: VIA_B})
            check(app, static, ifindex, prefer_static)

            # a reload flips the setting: the static route moves to the other metric (added
            # there before it leaves the old one), the route manager takes the new config
            flipped = not prefer_static
            assert static.set_metric(static_metric(flipped), [(ifindex, [ipaddress.ip_network(BOTH)])]) == []
            app.reload(config(flipped))
            check(app, static, ifindex, flipped)

            # BGP's route goes: the static one carries the prefix, whatever the setting
            app.tunnel_down("to-b")
            app.wait(lambda: app.fib() == {}, 5, "BGP routes out of the FIB")
            assert dev_for(app, "10.2.0.5") == "xfrm-s"
            rows = show_routes(app, static, ifindex)
            assert rows[(BOTH, "static", "to-s")]["active"]
            assert not [k for k in rows if k[1] == "bgp"]
        finally:
            static.close()
            peer.close()
