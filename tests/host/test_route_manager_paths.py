"""Two peers (GoBGP 3.10, one per tunnel) announcing the same prefix: best path by local-pref,
then AS_PATH length; ECMP as one multipath kernel route when equal; killing one peer moves the
route to the other; nothing learned from one peer reaches the other unless an export policy's
`transit` says so; a reload changes one neighbor's policy without resetting the other session."""

from __future__ import annotations

import time

from tests.host.route_manager_env import Appliance, tunnel_yaml
from tests.host.test_route_manager import config
from tests.peers.daemon import BgpNeighbor
from tests.peers.gobgp import GoBgp

SAME = "10.5.0.0/16"
A_HOP = ("169.254.21.2", "xfrm-b")
B_HOP = ("169.254.22.2", "xfrm-c")


def policies(lp_c: str = "", transit: bool = False) -> str:
    out = ("    from-b: {prefixes: [{prefix: 10.0.0.0/8, le: 24}]}\n"
           f"    from-c: {{prefixes: [{{prefix: 10.0.0.0/8, le: 24}}]{lp_c}}}\n"
           "    to-c: {prefixes: [{prefix: 10.1.0.0/16}]}\n")
    if transit:
        out += "    to-b: {prefixes: [{prefix: 10.1.0.0/16}, {prefix: 10.6.0.0/16}], transit: [to-c]}\n"
    else:
        out += "    to-b: {prefixes: [{prefix: 10.1.0.0/16}, {prefix: 10.6.0.0/16}]}\n"
    return out


def text(**kw) -> str:
    return config(tunnel_yaml("to-b", 1, 65002, imp="from-b", exp="to-b") +
                  tunnel_yaml("to-c", 2, 65003, imp="from-c", exp="to-c"), policies(**kw))


def test_best_path_ecmp_failover_transit_and_reload(tmp_path):
    with Appliance(tmp_path, text(), [("to-b", 1), ("to-c", 2)]) as app:
        pa, pb = app.peers["to-b"], app.peers["to-c"]
        a = GoBgp(tmp_path / "a", pa.name, router_id=pa.address, local_as=65002, announce=[SAME],
                  neighbors=[BgpNeighbor(pa.app_address, 65001, local_address=pa.address, hold_time=3)])
        b = GoBgp(tmp_path / "b", pb.name, router_id=pb.address, local_as=65003, announce=[SAME, "10.6.0.0/16"],
                  neighbors=[BgpNeighbor(pb.app_address, 65001, local_address=pb.address, hold_time=3)])
        try:
            a.start()
            b.start()
            app.start()
            app.tunnel_up("to-b")
            app.tunnel_up("to-c")
            # equal paths (same length, no local-pref): one multipath route in the kernel
            app.wait_fib({SAME: {A_HOP, B_HOP}, "10.6.0.0/16": {B_HOP}})
            out = app.ns.run(["ip", "route", "show", SAME]).stdout
            print("\nECMP:", out)
            assert out.count("nexthop via") == 2
            # no transit: C's routes never reach B's peer (A) without an export policy naming to-c
            a.wait_route("10.1.0.0/16", pa.app_address)
            assert a.learned_from(pa.app_address) == {"10.1.0.0/16"}

            # a longer AS_PATH from C: A's path alone
            b.add(SAME, "aspath", "65099")
            app.wait_fib({SAME: {A_HOP}, "10.6.0.0/16": {B_HOP}})
            why = {r["tunnel"]: (r["status"], r["reason"]) for r in app.call(app.mgr.show_routes)
                   if r["prefix"] == SAME}
            print("why:", why)
            assert why["to-b"][0] == "best" and why["to-c"][0] != "best"

            # reload: local_pref 200 for C beats the shorter path; A's session is not reset
            a_up = a.uptime_stamp(pa.app_address)
            downs = len(app.events_of("bgp_session_down"))
            app.reload(text(lp_c=", local_pref: 200"))
            app.wait_fib({SAME: {B_HOP}, "10.6.0.0/16": {B_HOP}})
            # reload: C's routes may now leave through B's tunnel (transit: [to-c])
            app.reload(text(lp_c=", local_pref: 200", transit=True))
            a.wait_route("10.6.0.0/16", pa.app_address)
            time.sleep(1)
            assert a.uptime_stamp(pa.app_address) == a_up
            assert len(app.events_of("bgp_session_down")) == downs
            assert app.neighbor("to-b")["state"] == "established"

            # C's peer dies: its routes leave, A's path takes over
            t0 = time.monotonic()
            b.kill()
            app.wait_fib({SAME: {A_HOP}}, timeout=10)
            print(f"peer C killed -> route moved to A in {time.monotonic() - t0:.2f} s (hold time 3 s)")
            a.wait_until(lambda: "10.6.0.0/16" not in a.learned_from(pa.app_address), 10, "transit route withdrawn")
        finally:
            a.close()
            b.close()
