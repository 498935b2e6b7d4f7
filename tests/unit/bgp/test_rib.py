"""bgp/rib.py: best path step by step, ECMP, instant withdraw, transit, max-prefix actions,
reconfiguration, stale sweeping, and what show routes / show bgp get."""

from __future__ import annotations

import pytest
from netaddr import IPAddress, IPNetwork

from bgp.policy import PolicyEngine
from bgp.rib import FibEntry, Rib
from bgp.route import Origin
from tests.unit.bgp.util import make_config, route, tunnel_yaml

N = IPNetwork


def tunnels(out3="out3", in_all="in"):
    return (tunnel_yaml("t1", 1, 65002, in_all, "out")
            + tunnel_yaml("t2", 2, 65003, in_all, "out")
            + tunnel_yaml("t3", 3, 65004, in_all, out3)
            + tunnel_yaml("t4", 4, 65001, in_all, "out"))          # iBGP


BGP = """
asn: 65001
announce: [10.1.0.0/16]
{extra}
policies:
  in: {{prefixes: [{{prefix: 10.0.0.0/8, le: 24}}, {{prefix: 'fd00::/8', le: 48}}]}}
  lp200: {{prefixes: [{{prefix: 10.0.0.0/8, le: 24}}], local_pref: 200}}
  out: {{prefixes: [10.1.0.0/16]}}
  out3: {{transit: [t1]}}
  stop10: {{prefixes: [{{prefix: 10.0.0.0/8, le: 24}}], max_prefix: {{limit: 3, action: stop}}}}
  warn10: {{prefixes: [{{prefix: 10.0.0.0/8, le: 24}}], max_prefix: {{limit: 3, action: warn}}}}
  restart10: {{prefixes: [{{prefix: 10.0.0.0/8, le: 24}}],
              max_prefix: {{limit: 3, action: restart, restart_delay: 2m}}}}
"""


def build(extra="", tun=None):
    cfg = make_config(tun or tunnels(), BGP.format(extra=extra))
    rib = Rib(cfg.bgp, cfg.tunnels, PolicyEngine(cfg.bgp, cfg.tunnels))
    for t in ("t1", "t2", "t3", "t4"):
        rib.neighbor_up(t, 0)
    return cfg, rib


def fib(rib):
    return {str(e.prefix): [(t, str(a)) for t, a in e.next_hops] for e in rib.best()}


P = "10.2.0.0/16"


def hops(*tunnels):
    return [(t, f"169.254.{t[1]}.2") for t in tunnels]


# --- best path, one step at a time ---------------------------------------------------------

def test_local_pref_wins_over_as_path_length():
    cfg, rib = build()
    rib.update("t4", [route(P, "t4", as_path=(65010, 65011, 65012), local_pref=200, ebgp=False)], [], 1)
    rib.update("t1", [route(P, "t1", as_path=(65002,))], [], 1)
    assert fib(rib)[P] == hops("t4")


def test_local_pref_set_by_import_policy():
    tun = tunnels().replace("import: in, export: out3", "import: lp200, export: out3")
    cfg, rib = build(tun=tun)
    rib.update("t1", [route(P, "t1", as_path=(65002,))], [], 1)
    rib.update("t3", [route(P, "t3", as_path=(65004, 1, 2))], [], 1)
    assert fib(rib)[P] == hops("t3")
    assert rib.loc_rib()[0]["routes"][0]["why"] == "lower local-pref (100 < 200)"


def test_shorter_as_path_wins():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1", as_path=(65002, 65100))], [], 1)
    rib.update("t2", [route(P, "t2", as_path=(65003,))], [], 1)
    assert fib(rib)[P] == hops("t2")
    why = {r["neighbor"]: r["why"] for r in rib.loc_rib()[0]["routes"]}
    assert why["t1"] == "longer AS path (2 > 1)" and why["t2"].startswith("best path")


def test_lower_origin_wins():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1", origin=Origin.INCOMPLETE)], [], 1)
    rib.update("t2", [route(P, "t2", as_path=(65003,), origin=Origin.EGP)], [], 1)
    assert fib(rib)[P] == hops("t2")
    rib.update("t1", [route(P, "t1", origin=Origin.IGP)], [], 2)
    assert fib(rib)[P] == hops("t1")


def test_med_compared_only_between_routes_from_the_same_neighbor_as():
    cfg, rib = build()
    # t1 and t3 both carry routes whose neighbour AS is 65100 (the first AS of their paths)
    rib.update("t1", [route(P, "t1", as_path=(65100, 65200), med=50)], [], 1)
    rib.update("t3", [route(P, "t3", as_path=(65100, 65200), med=10)], [], 1)
    assert fib(rib)[P] == hops("t3")
    why = {r["neighbor"]: r["why"] for r in rib.loc_rib()[0]["routes"]}
    assert why["t1"].startswith("higher MED (50)")
    # a route from another neighbour AS with a high MED is not compared by MED: equal -> ECMP
    rib.update("t2", [route(P, "t2", as_path=(65003, 65200), med=1000)], [], 2)
    assert fib(rib)[P] == hops("t2", "t3")


def test_med_step_comes_before_ebgp_over_ibgp():
    """RFC 4271 §9.1.2.2: an iBGP route with a lower MED removes an eBGP route from the same
    neighbour AS before the eBGP/iBGP step is reached."""
    cfg, rib = build()
    rib.update("t1", [route(P, "t1", as_path=(65100,), med=5)], [], 1)
    rib.update("t4", [route(P, "t4", as_path=(65100,), med=1, ebgp=False)], [], 1)
    assert fib(rib)[P] == hops("t4")


def test_missing_med_is_zero():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1", as_path=(65100,), med=1)], [], 1)
    rib.update("t3", [route(P, "t3", as_path=(65100,))], [], 1)
    assert fib(rib)[P] == hops("t3")


def test_ebgp_over_ibgp():
    cfg, rib = build()
    rib.update("t4", [route(P, "t4", as_path=(65002,), ebgp=False)], [], 1)
    rib.update("t1", [route(P, "t1", as_path=(65002,))], [], 1)
    assert fib(rib)[P] == hops("t1")
    assert {r["neighbor"]: r["why"] for r in rib.loc_rib()[0]["routes"]}["t4"] == "iBGP route, an eBGP route exists"


def test_lowest_router_id_then_neighbor_address_when_multipath_is_off():
    cfg, rib = build("multipath: false")
    rib.update("t2", [route(P, "t2", as_path=(65003,), router_id="10.0.0.1")], [], 1)
    rib.update("t1", [route(P, "t1", as_path=(65002,), router_id="10.0.0.2")], [], 1)
    assert fib(rib)[P] == hops("t2")
    cfg, rib = build("multipath: false")
    rib.update("t2", [route(P, "t2", as_path=(65003,), router_id="10.0.0.1")], [], 1)
    rib.update("t1", [route(P, "t1", as_path=(65002,), router_id="10.0.0.1")], [], 1)
    assert fib(rib)[P] == hops("t1")            # same router id: lower neighbour address 169.254.1.2


def test_best_path_does_not_depend_on_arrival_order():
    routes = [route(P, "t1", as_path=(65100,), med=5), route(P, "t2", as_path=(65003,), med=1),
              route(P, "t3", as_path=(65100,), med=3), route(P, "t4", as_path=(65100,), med=9, ebgp=False)]
    import itertools
    seen = set()
    for order in itertools.permutations(routes):
        cfg, rib = build()
        for r in order:
            rib.update(r.neighbor, [r], [], 1)
        seen.add(tuple(map(tuple, fib(rib)[P])))
    assert seen == {tuple(hops("t2", "t3"))}


# --- ECMP ----------------------------------------------------------------------------------

def test_ecmp_when_equal_and_max_paths():
    cfg, rib = build("max_paths: 2")
    ch = rib.update("t1", [route(P, "t1", router_id="10.0.0.3")], [], 1)
    assert ch.fib_set == [FibEntry(N(P), (("t1", IPAddress("169.254.1.2")),))]
    ch = rib.update("t2", [route(P, "t2", as_path=(65003,), router_id="10.0.0.2")], [], 1)
    assert [len(e.next_hops) for e in ch.fib_set] == [2]
    rib.update("t3", [route(P, "t3", as_path=(65004,), router_id="10.0.0.1")], [], 1)
    assert fib(rib)[P] == hops("t2", "t3")      # the two lowest router ids, listed by tunnel
    why = {r["neighbor"]: r["why"] for r in rib.loc_rib()[0]["routes"]}
    assert why["t1"] == "equal, beyond max_paths 2"


def test_multipath_off_gives_one_next_hop():
    cfg, rib = build("multipath: false")
    rib.update("t1", [route(P, "t1")], [], 1)
    rib.update("t2", [route(P, "t2", as_path=(65003,))], [], 1)
    assert len(fib(rib)[P]) == 1


def test_no_ecmp_between_ebgp_and_ibgp():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1")], [], 1)
    rib.update("t4", [route(P, "t4", as_path=(65005,), ebgp=False)], [], 1)
    assert fib(rib)[P] == hops("t1")


# --- withdraw, neighbour down: instant failover ------------------------------------------------

def test_neighbor_down_moves_to_the_next_best_at_once():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1"), route("10.3.0.0/16", "t1")], [], 1)
    rib.update("t2", [route(P, "t2", as_path=(65003, 65100))], [], 1)
    assert fib(rib)[P] == hops("t1")
    ch = rib.neighbor_down("t1", 2)
    assert ch.fib_set == [FibEntry(N(P), (("t2", IPAddress("169.254.2.2")),))]
    assert ch.fib_remove == [N("10.3.0.0/16")]
    assert rib.adj_rib_in("t1") == [] and rib.neighbor_stats("t1")["up"] is False
    # back up: routes come back with the next update
    rib.neighbor_up("t1", 3)
    rib.update("t1", [route(P, "t1")], [], 3)
    assert fib(rib)[P] == hops("t1")


def test_ecmp_shrinks_then_grows():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1")], [], 1)
    rib.update("t2", [route(P, "t2", as_path=(65003,))], [], 1)
    ch = rib.update("t1", [], [N(P)], 2)
    assert ch.fib_set == [FibEntry(N(P), (("t2", IPAddress("169.254.2.2")),))] and not ch.fib_remove
    ch = rib.update("t2", [], [N(P)], 3)
    assert ch.fib_remove == [N(P)] and not ch.fib_set
    assert rib.best() == []


def test_withdraw_of_unknown_prefix_is_harmless():
    cfg, rib = build()
    assert not rib.update("t1", [], [N("10.77.0.0/16")], 1)


def test_update_from_a_neighbor_that_is_not_up_is_ignored():
    cfg, rib = build()
    rib.neighbor_down("t1", 1)
    ch = rib.update("t1", [route(P, "t1")], [], 1)
    assert ch.events == [{"type": "bgp_update_ignored", "tunnel": "t1", "reason": "neighbor not up"}]
    assert rib.best() == []


def test_unknown_neighbor_is_reported_not_raised():
    cfg, rib = build()
    for ch in (rib.update("nope", [route(P, "nope")], [], 1), rib.neighbor_up("nope", 1),
               rib.neighbor_down("nope", 1)):
        assert ch.events == [{"type": "bgp_unknown_neighbor", "tunnel": "nope"}]
    assert rib.neighbor_stats("nope") == {"tunnel": "nope", "configured": False}


def test_identical_reannouncement_changes_nothing():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1")], [], 1)
    assert not rib.update("t1", [route(P, "t1")], [], 2)


def test_attribute_change_replaces_in_place():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1")], [], 1)
    ch = rib.update("t1", [route(P, "t1", next_hop="169.254.1.2", as_path=(65002, 7))], [], 2)
    assert ch.fib_set == [] and not ch.fib_remove       # same next hop: the FIB needs nothing
    ch = rib.update("t1", [route(P, "t1", next_hop="169.254.1.1")], [], 3)
    assert ch.fib_set == [FibEntry(N(P), (("t1", IPAddress("169.254.1.1")),))] and not ch.fib_remove


# --- filters at RIB level: what never reaches the FIB -------------------------------------------

def test_filtered_routes_stay_in_adj_rib_in_and_out_of_the_fib():
    cfg, rib = build()
    rib.update("t1", [route("127.0.0.0/8", "t1"), route("0.0.0.0/0", "t1"), route("10.9.9.9/32", "t1"),
                      route("10.1.2.0/24", "t1"), route("10.7.0.0/16", "t1", as_path=(65002, 65001)),
                      route("192.168.0.0/16", "t1"), route(P, "t1")], [], 1)
    assert list(fib(rib)) == [P]
    reasons = {str(r.prefix): v.reason for r, v in rib.adj_rib_in("t1")}
    assert reasons == {"0.0.0.0/0": "default route", "10.1.2.0/24": "own prefix",
                       "10.2.0.0/16": "accepted", "10.7.0.0/16": "as-path loop (own AS 65001)",
                       "10.9.9.9/32": "too specific (/32 > /24)", "127.0.0.0/8": "bogon (inside 127.0.0.0/8)",
                       "192.168.0.0/16": "prefix-list in: no entry matches"}
    st = rib.neighbor_stats("t1")
    assert (st["received"], st["accepted"], st["filtered"]) == (7, 1, 6)


def test_route_that_becomes_filtered_leaves_the_fib():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1")], [], 1)
    ch = rib.update("t1", [route(P, "t1", as_path=(65002, 65001))], [], 2)
    assert ch.fib_remove == [N(P)]


# --- transit ------------------------------------------------------------------------------

def test_routes_from_one_peer_never_reach_another_without_transit():
    cfg, rib = build()
    ch = rib.update("t1", [route(P, "t1")], [], 1)
    assert "t2" not in ch.announce and "t4" not in ch.announce
    assert [str(r.prefix) for r in rib.adj_rib_out("t2")] == ["10.1.0.0/16"]
    # t3's export policy names t1: the route is re-exported there, our AS prepended
    assert [(str(r.prefix), r.as_path) for r in ch.announce["t3"]] == [(P, (65001, 65002))]
    ch = rib.update("t2", [route("10.5.0.0/16", "t2", as_path=(65003,))], [], 1)
    assert not ch.announce                      # t2 is not named by any transit


def test_transit_follows_the_best_path():
    cfg, rib = build()
    rib.update("t2", [route(P, "t2", as_path=(65003,))], [], 1)
    assert [str(r.prefix) for r in rib.adj_rib_out("t3")] == ["10.1.0.0/16"]
    ch = rib.update("t1", [route(P, "t1", as_path=(65002,), router_id="1.1.1.1")], [], 2)
    # now ECMP t1+t2; the best (lowest router id: t1, t2 has none) is t1's: exported to t3
    assert [r.neighbor for r in ch.announce["t3"]] == ["t1"]
    ch = rib.neighbor_down("t1", 3)
    assert ch.withdraw == {"t3": [N(P)]}


def test_transit_neighbor_up_gets_the_permitted_table():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1"), route("10.3.0.0/16", "t1")], [], 1)
    rib.update("t2", [route("10.5.0.0/16", "t2", as_path=(65003,))], [], 1)
    rib.neighbor_down("t3", 2)
    ch = rib.neighbor_up("t3", 3)
    assert sorted(str(r.prefix) for r in ch.announce["t3"]) == ["10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16"]
    assert rib.neighbor_stats("t3")["advertised"] == 3


def test_split_horizon_with_transit():
    cfg, rib = build()
    rib.update("t3", [route(P, "t3", as_path=(65004,))], [], 1)
    assert [str(r.prefix) for r in rib.adj_rib_out("t3")] == ["10.1.0.0/16"]


# --- max-prefix ---------------------------------------------------------------------------

def many(t, n, start=0):
    return [route(f"10.{10 + t}.{i}.0/24", f"t{t}", as_path=(65001 + t,)) for i in range(start, start + n)]


def test_max_prefix_warn_keeps_everything_and_says_so_once():
    cfg, rib = build(tun=tunnels().replace("t1:\n", "t1:\n", 1).replace(
        "peer_as: 65002, peer_address: 169.254.1.2, peer_address6: 'fd00:1::2', import: in",
        "peer_as: 65002, peer_address: 169.254.1.2, peer_address6: 'fd00:1::2', import: warn10"))
    ch = rib.update("t1", many(1, 5), [], 1)
    assert ch.events == [{"type": "bgp_max_prefix", "tunnel": "t1", "action": "warn", "count": 4, "limit": 3}]
    assert len(rib.best()) == 5 and not ch.restart_neighbor
    assert not rib.update("t1", many(1, 1, start=9), [], 2).events       # still over: not again


def _with_import(policy):
    return tunnels().replace("peer_as: 65002, peer_address: 169.254.1.2, peer_address6: 'fd00:1::2', import: in",
                             f"peer_as: 65002, peer_address: 169.254.1.2, peer_address6: 'fd00:1::2', "
                             f"import: {policy}")


def test_max_prefix_stop_drops_the_excess_and_keeps_the_session():
    cfg, rib = build(tun=_with_import("stop10"))
    ch = rib.update("t1", many(1, 5), [], 1)
    assert ch.events == [{"type": "bgp_max_prefix", "tunnel": "t1", "action": "stop", "count": 4, "limit": 3}]
    assert not ch.restart_neighbor
    assert sorted(fib(rib)) == ["10.11.0.0/24", "10.11.1.0/24", "10.11.2.0/24"]
    verdicts = {str(r.prefix): v.reason for r, v in rib.adj_rib_in("t1")}
    assert verdicts["10.11.3.0/24"] == "max-prefix 3 reached (stop)"
    st = rib.neighbor_stats("t1")
    assert (st["received"], st["accepted"], st["held"], st["up"]) == (5, 3, 2, True)
    # room again: the oldest held route comes in
    ch = rib.update("t1", [], [N("10.11.0.0/24")], 2)
    assert sorted(fib(rib)) == ["10.11.1.0/24", "10.11.2.0/24", "10.11.3.0/24"]
    assert [str(e.prefix) for e in ch.fib_set] == ["10.11.3.0/24"] and ch.fib_remove == [N("10.11.0.0/24")]
    held = rib.loc_rib()
    assert [r["routes"][0]["status"] for r in held if r["prefix"] == "10.11.4.0/24"] == ["held"]


def test_max_prefix_restart_tears_the_session_down():
    cfg, rib = build(tun=_with_import("restart10"))
    rib.update("t2", [route("10.11.0.0/24", "t2", as_path=(65003,))], [], 1)
    ch = rib.update("t1", many(1, 5), [], 1)
    assert ch.restart_neighbor == ["t1"]
    assert ch.events == [{"type": "bgp_max_prefix", "tunnel": "t1", "action": "restart", "count": 4, "limit": 3,
                          "restart_delay": 120}]
    # nothing of t1's stays: the shared prefix falls back to t2, the rest is not installed
    assert fib(rib) == {"10.11.0.0/24": hops("t2")}
    assert rib.neighbor_stats("t1")["up"] is False
    assert rib.update("t1", many(1, 1), [], 2).events[0]["type"] == "bgp_update_ignored"
    rib.neighbor_up("t1", 122)
    rib.update("t1", many(1, 3), [], 122)
    assert len(rib.best()) == 3


# --- reconfigure -----------------------------------------------------------------------------

def test_reconfigure_reevaluates_what_was_received():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1"), route("10.3.0.0/16", "t1")], [], 1)
    assert sorted(fib(rib)) == ["10.2.0.0/16", "10.3.0.0/16"]
    new = make_config(tunnels(), BGP.format(extra="").replace(
        "in: {prefixes: [{prefix: 10.0.0.0/8, le: 24}",
        "in: {prefixes: [{prefix: 10.3.0.0/16, action: deny}, {prefix: 10.0.0.0/8, le: 24}"))
    ch = rib.reconfigure(new.bgp, new.tunnels, 2)
    assert ch.fib_remove == [N("10.3.0.0/16")] and not ch.fib_set
    assert sorted(fib(rib)) == ["10.2.0.0/16"]


def test_reconfigure_removes_a_neighbor_and_changes_exports():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1")], [], 1)
    rib.update("t2", [route(P, "t2", as_path=(65003, 65100))], [], 1)
    # t1 loses its bgp block; t2's export now also announces 10.1.0.0/16 with a prepend
    tun = tunnels().split("  t2:")
    tun = tun[0].replace(", import: in, export: out", "").replace(
        "    bgp: {peer_as: 65002, peer_address: 169.254.1.2, peer_address6: 'fd00:1::2'}\n", "") + "  t2:" + tun[1]
    new = make_config(tun, BGP.format(extra="").replace("out: {prefixes: [10.1.0.0/16]}",
                                                        "out: {prefixes: [10.1.0.0/16], prepend: 1}")
                      .replace("out3: {transit: [t1]}", "out3: {transit: [t2]}"))
    assert new.tunnels["t1"].bgp is None
    ch = rib.reconfigure(new.bgp, new.tunnels, 2)
    assert fib(rib) == {P: hops("t2")}
    assert [r.as_path for r in ch.announce["t2"]] == [(65001, 65001)]
    assert [r.as_path for r in ch.announce["t3"]] == [(65001, 65003, 65100)]   # its own: unchanged
    assert rib.neighbor_stats("t1") == {"tunnel": "t1", "configured": False}


# --- stale marking (ExaBGP restart: re-learn without flushing) ----------------------------------

def test_mark_and_sweep_stale_keeps_the_fib_throughout():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1"), route("10.3.0.0/16", "t1")], [], 1)
    rib.mark_stale("t1")
    ch = rib.neighbor_up("t1", 2)               # the session again: everything re-announced to it
    assert [str(r.prefix) for r in ch.announce["t1"]] == ["10.1.0.0/16"]
    assert not rib.update("t1", [route(P, "t1")], [], 2)      # re-learned, nothing changes
    assert sorted(fib(rib)) == ["10.2.0.0/16", "10.3.0.0/16"]
    ch = rib.sweep_stale("t1", 3)
    assert ch.fib_remove == [N("10.3.0.0/16")] and fib(rib) == {P: hops("t1")}
    assert not rib.sweep_stale("t1", 4)


# --- views ---------------------------------------------------------------------------------

def test_best_is_sorted_and_complete():
    cfg, rib = build()
    rib.update("t1", [route("10.9.0.0/16", "t1"), route("10.2.0.0/16", "t1"), route("fd00:9::/32", "t1"),
                      route("10.2.0.0/24", "t1")], [], 1)
    assert [str(e.prefix) for e in rib.best()] == ["10.2.0.0/16", "10.2.0.0/24", "10.9.0.0/16", "fd00:9::/32"]


def test_loc_rib_shape():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1")], [], 1)
    rib.update("t2", [route(P, "t2", as_path=(65003, 5))], [], 1)
    (entry,) = rib.loc_rib()
    assert entry["prefix"] == P and entry["best"] == "t1"
    assert entry["next_hops"] == [{"tunnel": "t1", "via": "169.254.1.2"}]
    assert [(r["neighbor"], r["status"]) for r in entry["routes"]] == [("t1", "best"), ("t2", "lost")]
    assert entry["routes"][1]["as_path"] == [65003, 5] and entry["routes"][1]["local_pref"] == 100


# --- issue 9's acceptance points, at RIB level ------------------------------------------------

@pytest.mark.parametrize("action", ["warn", "stop", "restart"])
def test_acceptance_filtered_routes_never_reach_the_fib(action):
    """A peer announcing a bogon, a default route, a /32 outside its allowed range, our own
    prefix and more prefixes than max-prefix: none of them is installed, and the max-prefix
    action is seen to happen."""
    cfg, rib = build(tun=_with_import(f"{action}10"))
    bad = [route("127.0.0.0/8", "t1"), route("0.0.0.0/0", "t1"), route("192.168.1.1/32", "t1"),
           route("10.1.0.0/16", "t1")]
    good = many(1, 5)
    ch = rib.update("t1", bad + good, [], 1)
    installed = set(fib(rib))
    assert not installed & {"127.0.0.0/8", "0.0.0.0/0", "192.168.1.1/32", "10.1.0.0/16"}
    assert [e["action"] for e in ch.events if e["type"] == "bgp_max_prefix"] == [action]
    if action == "warn":
        assert len(installed) == 5
    elif action == "stop":
        assert len(installed) == 3 and rib.neighbor_stats("t1")["up"]
    else:
        assert installed == set() and ch.restart_neighbor == ["t1"]


def test_acceptance_two_peers_local_pref_then_as_path_then_ecmp_then_failover():
    cfg, rib = build()
    # equal: ECMP over both tunnels
    rib.update("t1", [route(P, "t1", as_path=(65002, 65100))], [], 1)
    rib.update("t2", [route(P, "t2", as_path=(65003, 65100))], [], 1)
    assert fib(rib)[P] == hops("t1", "t2")
    # shorter AS path on t2 wins
    rib.update("t2", [route(P, "t2", as_path=(65003,))], [], 2)
    assert fib(rib)[P] == hops("t2")
    # higher local-pref beats the shorter path (iBGP t4 carries its LOCAL_PREF)
    rib.update("t4", [route(P, "t4", as_path=(65100, 65200, 65300), local_pref=300, ebgp=False)], [], 3)
    assert fib(rib)[P] == hops("t4")
    # routes from one peer never reached another (no transit in their export policy "out")
    for t in ("t1", "t2", "t4"):
        assert [str(r.prefix) for r in rib.adj_rib_out(t)] == ["10.1.0.0/16"]
    # killing the preferred peer moves the prefix to the next best at once
    assert rib.neighbor_down("t4", 4).fib_set == [FibEntry(N(P), (("t2", IPAddress("169.254.2.2")),))]


def test_ipv6_ecmp_and_next_hops():
    cfg, rib = build()
    rib.update("t1", [route("fd00:9::/32", "t1")], [], 1)
    rib.update("t2", [route("fd00:9::/32", "t2", as_path=(65003,))], [], 1)
    assert fib(rib)["fd00:9::/32"] == [("t1", "fd00:1::2"), ("t2", "fd00:2::2")]


def test_huge_as_path_is_handled():
    cfg, rib = build()
    path = tuple(range(100000, 100000 + 5000))
    rib.update("t1", [route(P, "t1", as_path=(65002,) + path)], [], 1)
    assert fib(rib)[P] == hops("t1")
    assert [len(r.as_path) for r in rib.adj_rib_out("t3") if str(r.prefix) == P] == [5002]  # transit, + our AS
    ch = rib.update("t2", [route(P, "t2", as_path=(65003,))], [], 2)
    assert fib(rib)[P] == hops("t2")
    assert ch.withdraw == {"t3": [N(P)]}        # the best is t2's now, and out3 names only t1


def test_one_update_touches_only_its_prefix():
    """No full recomputation: with 3,000 prefixes in the table, a one-prefix UPDATE runs best
    path once and changes only that prefix."""
    cfg, rib = build()
    table = [route(f"10.{20 + i // 256}.{i % 256}.0/24", "t1") for i in range(3000)]
    rib.update("t1", table, [], 1)
    rib.update("t2", [route(str(r.prefix), "t2", as_path=(65003, 7)) for r in table], [], 1)
    calls = []
    real = rib._select
    rib._select = lambda cur: calls.append(1) or real(cur)
    ch = rib.update("t1", [route("10.20.5.0/24", "t1", as_path=(65002, 9, 9))], [], 2)
    assert len(calls) == 1
    assert ch.fib_set == [FibEntry(N("10.20.5.0/24"), (("t2", IPAddress("169.254.2.2")),))]
    assert not ch.fib_remove and not ch.announce
    assert ch.withdraw == {"t3": [N("10.20.5.0/24")]}   # t3's transit names t1 only


def test_reconfigure_lower_max_prefix_stop_holds_the_excess():
    cfg, rib = build()
    rib.update("t1", many(1, 5), [], 1)
    new = make_config(_with_import("stop10"), BGP.format(extra=""))
    ch = rib.reconfigure(new.bgp, new.tunnels, 2)
    assert len(rib.best()) == 3 and rib.neighbor_stats("t1")["held"] == 2
    assert [e["action"] for e in ch.events] == ["stop"]
    assert sorted(str(p) for p in ch.fib_remove) == ["10.11.3.0/24", "10.11.4.0/24"]


def test_dampening_turned_on_by_reload_keeps_routes():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1")], [], 1)
    tun = tunnels().replace("import: in, export: out}", "import: in, export: out, dampening: true}", 1)
    new = make_config(tun, BGP.format(extra=""))
    assert new.tunnels["t1"].bgp.dampening
    ch = rib.reconfigure(new.bgp, new.tunnels, 2)
    assert not ch.fib_set and not ch.fib_remove and fib(rib) == {P: hops("t1")}
    for t in (3, 4, 5):
        rib.update("t1", [], [N(P)], t)
        rib.update("t1", [route(P, "t1")], [], t + 0.5)
    assert P not in fib(rib)          # suppressed after three withdrawals


def test_reconfigure_tunnel_removed_entirely_and_stale_marks_survive():
    cfg, rib = build()
    rib.update("t1", [route(P, "t1")], [], 1)
    rib.update("t2", [route(P, "t2", as_path=(65003, 65100)), route("10.5.0.0/16", "t2", as_path=(65003,))], [], 1)
    rib.mark_stale("t2")
    tun = "".join("  t" + part for part in tunnels().split("  t")[1:] if not part.startswith("1:"))
    new = make_config(tun, BGP.format(extra="").replace("out3: {transit: [t1]}", "out3: {}"))
    assert "t1" not in new.tunnels
    ch = rib.reconfigure(new.bgp, new.tunnels, 2)
    assert ch.fib_set == [FibEntry(N(P), (("t2", IPAddress("169.254.2.2")),))]
    assert ch.withdraw == {"t3": [N(P)]}            # t1's route had been re-exported to t3
    rib.update("t2", [route(P, "t2", as_path=(65003, 65100))], [], 3)   # re-learned
    ch = rib.sweep_stale("t2", 4)                   # 10.5.0.0/16 was not announced again
    assert ch.fib_remove == [N("10.5.0.0/16")] and fib(rib) == {P: hops("t2")}
