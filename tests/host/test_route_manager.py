"""The route manager (bgp/) against real BGP peers: FRR 8.4 bgpd, BIRD 2.0.12 and GoBGP 3.10, each
in its own network namespace, eBGP over a veth standing in for the tunnel's XFRM interface.

Proved here, with the peers' own tools on their side and `ip route` on ours: routes each peer
announces arrive in the appliance namespace's FIB (proto 74, via the peer's inside address on the
tunnel interface); our bgp.announce reaches each peer's RIB; a tunnel going down takes its routes
out of the FIB at once (timed and printed) and the session comes back with the tunnel; the
guards and max-prefix actions; reload changes one neighbor only.
"""

from __future__ import annotations

import time

import pytest

from tests.host.route_manager_env import Appliance, tunnel_yaml
from tests.peers.bird import Bird
from tests.peers.daemon import BgpNeighbor
from tests.peers.frr import Frr
from tests.peers.gobgp import GoBgp


OURS = "10.1.0.0/16"


def config(tunnels: str, policies: str, announce: str = OURS, extra: str = "") -> str:
    return ("appliance: {name: a, router_id: 10.255.0.1}\ntunnels:\n" + tunnels +
            f"bgp:\n  asn: 65001\n  announce: [{announce}]\n{extra}  policies:\n" + policies)


POLICIES = ("    from-peer: {prefixes: [{prefix: 10.2.0.0/16, le: 24}]}\n"
            "    to-peer: {prefixes: [{prefix: 10.1.0.0/16}]}\n")


def start_peer(kind: str, app: Appliance, tunnel: str, workdir, announce: list[str], asn: int = 65002):
    p = app.peers[tunnel]
    nb = [BgpNeighbor(p.app_address, 65001, local_address=p.address, hold_time=3)]
    if kind == "frr":
        peer = Frr(workdir / "frr", p.name, router_id=p.address, local_as=asn, announce=announce, neighbors=nb)
        learned = lambda: peer.learned_from(p.app_address)          # noqa: E731
    elif kind == "bird":
        peer = Bird(workdir / "bird", p.name, router_id=p.address, local_as=asn, announce=announce, neighbors=nb)
        learned = lambda: peer.learned(0)                            # noqa: E731
    else:
        peer = GoBgp(workdir / "gobgp", p.name, router_id=p.address, local_as=asn, announce=announce, neighbors=nb)
        learned = lambda: peer.learned_from(p.app_address)          # noqa: E731
    peer.start()
    return peer, learned


@pytest.mark.parametrize("kind", ["frr", "bird", "gobgp"])
def test_routes_both_ways_and_instant_withdraw(kind, tmp_path):
    text = config(tunnel_yaml("to-b", 1, 65002, imp="from-peer", exp="to-peer"), POLICIES)
    with Appliance(tmp_path, text, [("to-b", 1)]) as app:
        peer, learned = start_peer(kind, app, "to-b", tmp_path, ["10.2.0.0/16", "10.2.7.0/24"])
        try:
            app.start()
            assert app.fib() == {}
            app.tunnel_up("to-b")
            want = {"10.2.0.0/16": {("169.254.21.2", "xfrm-b")}, "10.2.7.0/24": {("169.254.21.2", "xfrm-b")}}
            t0 = time.monotonic()
            app.wait_fib(want)
            print(f"\n{kind}: session up and routes in the FIB {time.monotonic() - t0:.2f} s after tunnel up")
            # our announcement, as the peer's own tool shows it
            app.wait(lambda: learned() == {OURS}, 15, f"{kind} learned {OURS}")
            n = app.neighbor("to-b")
            assert n["state"] == "established" and n["hold_time"] == 3
            # FRR sends our own prefix back (no sender-side loop check): received, refused (AS loop)
            assert n["prefixes_received"] in (2, 3)
            assert (n["prefixes_accepted"], n["prefixes_advertised"]) == (2, 1)
            routes = {(r["prefix"], r["tunnel"], r["installed"]) for r in app.call(app.mgr.show_routes)}
            assert routes == {("10.2.0.0/16", "to-b", True), ("10.2.7.0/24", "to-b", True)}
            assert app.events_of("bgp_session_up", "to-b")

            # the tunnel dies: the routes leave the FIB now, not after the hold timer
            t0 = time.monotonic()
            in_call = app.tunnel_down("to-b")
            app.wait(lambda: app.fib() == {}, 2, "FIB empty after tunnel down", interval=0.005)
            seen = time.monotonic() - t0
            print(f"{kind}: tunnel down -> routes out of the kernel FIB: {in_call * 1000:.1f} ms in the manager, "
                  f"{seen * 1000:.1f} ms seen from outside")
            assert seen < 1.0
            assert app.events_of("bgp_session_down", "to-b")
            app.wait(lambda: learned() == set(), 15, f"{kind} lost {OURS} (session shut down)")

            # the tunnel comes back: so does the session and every route
            app.tunnel_up("to-b")
            app.wait_fib(want)
            app.wait(lambda: learned() == {OURS}, 15, f"{kind} learned {OURS} again")
        finally:
            peer.close()


GUARD_POLICIES = ("    from-peer: {prefixes: [{prefix: 0.0.0.0/0, le: 32}]}\n"     # everything: the guards decide
                  "    narrow: {prefixes: [{prefix: 10.2.0.0/16, le: 24}]}\n"
                  "    to-peer: {prefixes: [{prefix: 10.1.0.0/16}]}\n")


def test_guards_keep_bogons_default_too_specific_and_our_own_out(tmp_path):
    text = config(tunnel_yaml("to-b", 1, 65002, imp="from-peer", exp="to-peer") +
                  tunnel_yaml("to-c", 2, 65003, imp="narrow", exp="to-peer"), GUARD_POLICIES)
    bad_b = ["0.0.0.0/0", "127.5.0.0/16", "224.1.0.0/16", "240.7.0.0/16", "10.2.9.9/32", OURS, "10.1.5.0/24"]
    bad_c = ["10.9.9.9/32", "10.3.0.0/16"]          # outside the prefix list of "narrow"
    with Appliance(tmp_path, text, [("to-b", 1), ("to-c", 2)]) as app:
        b, _ = start_peer("gobgp", app, "to-b", tmp_path / "b", ["10.2.0.0/16", *bad_b])
        c, _ = start_peer("gobgp", app, "to-c", tmp_path / "c", ["10.2.4.0/24", *bad_c], asn=65003)
        try:
            app.start()
            app.tunnel_up("to-b")
            app.tunnel_up("to-c")
            app.wait(lambda: app.neighbor("to-b")["prefixes_received"] == 8 and
                     app.neighbor("to-c")["prefixes_received"] == 3, 20, "every prefix received")
            assert app.fib() == {"10.2.0.0/16": {("169.254.21.2", "xfrm-b")},
                                 "10.2.4.0/24": {("169.254.22.2", "xfrm-c")}}
            nb, nc = app.neighbor("to-b"), app.neighbor("to-c")
            assert (nb["prefixes_accepted"], nb["prefixes_filtered"]) == (1, 7)
            assert (nc["prefixes_accepted"], nc["prefixes_filtered"]) == (1, 2)
            reasons = {str(r.prefix): v.reason for r, v in app.call(lambda: app.mgr.rib.adj_rib_in("to-b"))}
            print("\nwhy each was refused:", reasons)
            assert "default" in reasons["0.0.0.0/0"]
            for p in ("127.5.0.0/16", "224.1.0.0/16", "240.7.0.0/16"):
                assert "bogon" in reasons[p] or "martian" in reasons[p], reasons[p]
            assert "specific" in reasons["10.2.9.9/32"]
            assert "own" in reasons[OURS] and "own" in reasons["10.1.5.0/24"]
        finally:
            b.close()
            c.close()


@pytest.mark.parametrize("action", ["warn", "stop", "restart"])
def test_max_prefix_actions(action, tmp_path):
    delay = ", restart_delay: 2s" if action == "restart" else ""
    pol = (f"    from-peer: {{prefixes: [{{prefix: 10.2.0.0/16, le: 24}}], "
           f"max_prefix: {{limit: 3, action: {action}{delay}}}}}\n"
           "    to-peer: {prefixes: [{prefix: 10.1.0.0/16}]}\n")
    text = config(tunnel_yaml("to-b", 1, 65002, imp="from-peer", exp="to-peer"), pol)
    five = [f"10.2.{i}.0/24" for i in range(5)]
    with Appliance(tmp_path, text, [("to-b", 1)]) as app:
        peer, _ = start_peer("gobgp", app, "to-b", tmp_path, five)
        try:
            app.start()
            app.tunnel_up("to-b")
            app.wait(lambda: app.events_of("bgp_max_prefix", "to-b"), 20, "a max-prefix event")
            ev = app.events_of("bgp_max_prefix", "to-b")[0]
            print(f"\nmax-prefix {action}: {ev}")
            assert ev["action"] == action
            if action == "warn":
                app.wait(lambda: len(app.fib()) == 5, 10, "all 5 routes kept")
                assert app.neighbor("to-b")["state"] == "established"
            elif action == "stop":
                app.wait(lambda: len(app.fib()) == 3, 10, "3 routes kept")
                time.sleep(1)
                assert len(app.fib()) == 3 and set(app.fib()) <= set(five)
                assert app.neighbor("to-b")["state"] == "established"
            else:
                app.wait(lambda: app.events_of("bgp_neighbor_restart", "to-b"), 10, "the neighbor restarted")
                app.wait(lambda: app.fib() == {}, 5, "its routes gone")
                assert app.neighbor("to-b")["state"].startswith("idle (max-prefix")
                app.wait(lambda: peer.neighbor_state("169.254.21.1") not in ("6", "established"), 10,
                         "GoBGP sees the session torn down")
                # after restart_delay the session comes back (and trips the limit again)
                app.wait(lambda: len(app.events_of("bgp_session_up", "to-b")) >= 2, 20, "the session again")
        finally:
            peer.close()


def test_ipv6_unicast_session_with_frr(tmp_path):
    pol = ("    from-peer: {prefixes: [{prefix: 10.2.0.0/16, le: 24}, {prefix: 'fd00:2::/32', le: 48}]}\n"
           "    to-peer: {prefixes: [{prefix: 10.1.0.0/16}, {prefix: 'fd00:1::/48'}]}\n")
    text = config(tunnel_yaml("to-b", 1, 65002, imp="from-peer", exp="to-peer", v6=True), pol,
                  announce="10.1.0.0/16, 'fd00:1::/48'")
    with Appliance(tmp_path, text, [("to-b", 1)]) as app:
        p = app.peers["to-b"]
        frr = Frr(tmp_path / "frr", p.name, router_id=p.address, local_as=65002,
                  announce=["10.2.0.0/16", "fd00:2:5::/48"],
                  neighbors=[BgpNeighbor(p.app_address, 65001, local_address=p.address, hold_time=3),
                             BgpNeighbor("fd00:21::1", 65001, local_address="fd00:21::2", hold_time=3)])
        try:
            frr.start()
            app.start()
            app.tunnel_up("to-b")
            app.wait_fib({"10.2.0.0/16": {("169.254.21.2", "xfrm-b")}, "fd00:2:5::/48": {("fd00:21::2", "xfrm-b")}})
            frr.wait_route("10.1.0.0/16", p.app_address)
            frr.wait_route("fd00:1::/48", "fd00:21::1")
            assert frr.learned_from("fd00:21::1", "ipv6") == {"fd00:1::/48"}
            assert frr.learned_from(p.app_address) == {"10.1.0.0/16"}
            app.tunnel_down("to-b")
            app.wait(lambda: app.fib() == {}, 2, "both families out of the FIB", interval=0.01)
        finally:
            frr.close()
