"""bgp/dampening.py (RFC 2439) on its own and inside the RIB."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netaddr import IPNetwork

from appliance.config.model import Dampening
from bgp.dampening import Dampener
from bgp.policy import PolicyEngine
from bgp.rib import Rib
from tests.unit.bgp.util import make_config, route, tunnel_yaml

FRR = Dampening()          # half-life 15 min, reuse 750, suppress 2000, max-suppress 60 min
K = "10.2.0.0/16"


def test_frr_defaults():
    assert (FRR.half_life, FRR.reuse, FRR.suppress, FRR.max_suppress) == (900, 750, 2000, 3600)


def test_penalty_halves_every_half_life():
    d = Dampener(FRR)
    d.withdrawn(K, 0)
    assert d.penalty(K, 0) == 1000
    assert d.penalty(K, 900) == pytest.approx(500)
    assert d.penalty(K, 1800) == pytest.approx(250)


def test_attribute_change_is_half_a_withdrawal():
    d = Dampener(FRR)
    d.attributes_changed(K, 0)
    assert d.penalty(K, 0) == 500


def test_two_withdrawals_do_not_suppress_three_quick_ones_do():
    d = Dampener(FRR)
    assert not d.withdrawn(K, 0)
    assert not d.withdrawn(K, 1)            # ~1999 < 2000
    assert d.withdrawn(K, 2)
    assert d.is_suppressed(K)


def test_reuse_time_and_tick():
    d = Dampener(FRR)
    for t in (0, 0, 0):
        d.withdrawn(K, t)
    # 3000 decays to 750 after two half-lives
    assert d.reuse_at(K) == pytest.approx(1800)
    assert d.next_reuse() == pytest.approx(1800)
    assert d.tick(1799) == [] and d.is_suppressed(K)
    assert d.tick(1800) == [K] and not d.is_suppressed(K)
    assert d.reuse_at(K) is None and d.next_reuse() is None


def test_ceiling_bounds_suppression_by_max_suppress():
    d = Dampener(FRR)
    for i in range(50):
        d.withdrawn(K, i)
    assert d.penalty(K, 49) == pytest.approx(750 * 2 ** 4)      # 12000: reuse * 2^(60/15)
    assert d.reuse_at(K) == pytest.approx(49 + 3600)
    assert d.tick(49 + 3600 - 1) == []
    assert d.tick(49 + 3600) == [K]


def test_forgotten_below_half_reuse():
    d = Dampener(FRR)
    d.withdrawn(K, 0)
    d.tick(900)                 # 500: kept
    assert len(d) == 1
    d.tick(900 * math.log2(1000 / 374))    # below 375
    assert len(d) == 0 and d.state(K, 0) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["w", "c"]), st.floats(0, 2000)), min_size=1, max_size=30))
def test_never_suppressed_longer_than_max_suppress_after_the_last_flap(flaps):
    d = Dampener(FRR)
    now = 0.0
    for kind, gap in flaps:
        now += gap
        (d.withdrawn if kind == "w" else d.attributes_changed)(K, now)
        d.tick(now)
    if d.is_suppressed(K):
        assert d.reuse_at(K) <= now + FRR.max_suppress + 1e-6
    d.tick(now + FRR.max_suppress)
    assert not d.is_suppressed(K)


# --- in the RIB ----------------------------------------------------------------------------

def rib_with_dampening(on_t1=True):
    extra = "dampening: true" if on_t1 else ""
    cfg = make_config(tunnel_yaml("t1", 1, 65002, "in", "out", extra) + tunnel_yaml("t2", 2, 65003, "in", "out"),
                      """
asn: 65001
dampening: {half_life: 10m, reuse: 800, suppress: 2500, max_suppress: 30m}
policies:
  in: {prefixes: [{prefix: 10.0.0.0/8, le: 24}]}
  out: {}
""")
    rib = Rib(cfg.bgp, cfg.tunnels, PolicyEngine(cfg.bgp, cfg.tunnels))
    rib.neighbor_up("t1", 0)
    rib.neighbor_up("t2", 0)
    return rib


def fib(rib):
    return {str(e.prefix): [t for t, _ in e.next_hops] for e in rib.best()}


def test_flapping_route_is_suppressed_kept_in_adj_rib_in_and_reused_by_tick():
    rib = rib_with_dampening()
    rib.update("t2", [route(K, "t2", as_path=(65003, 65100))], [], 0)
    p = IPNetwork(K)
    for t in (1, 2, 3):
        rib.update("t1", [route(K, "t1")], [], t)
        rib.update("t1", [], [p], t + 0.5)
    # 3 withdrawals: ~3000 > 2500: suppressed. Announced again, it is in Adj-RIB-In but not used.
    ch = rib.update("t1", [route(K, "t1")], [], 4)
    assert not ch.fib_set and fib(rib) == {K: ["t2"]}
    assert [str(r.prefix) for r, v in rib.adj_rib_in("t1") if v.accepted] == [K]
    st = rib.neighbor_stats("t1")
    assert (st["accepted"], st["suppressed"]) == (1, 1)
    (entry,) = rib.loc_rib(now=4)
    t1 = [r for r in entry["routes"] if r["neighbor"] == "t1"][0]
    assert t1["status"] == "suppressed" and t1["dampening"]["suppressed"] is True
    assert t1["dampening"]["flaps"] == 3
    reuse = rib.next_tick()
    assert reuse is not None and 4 < reuse <= 4 + 1800
    assert not rib.tick(reuse - 1)
    ch = rib.tick(reuse)
    assert [e.prefix for e in ch.fib_set] == [p] and fib(rib) == {K: ["t1"]}


def test_attribute_changes_count_as_flaps():
    rib = rib_with_dampening()
    rib.update("t1", [route(K, "t1")], [], 0)
    for i in range(1, 7):           # 6 * 500, a little decay: > 2500
        rib.update("t1", [route(K, "t1", med=i)], [], i)
    assert fib(rib) == {}
    assert rib.neighbor_stats("t1")["suppressed"] == 1


def test_dampening_is_per_neighbor_and_off_by_default():
    rib = rib_with_dampening()
    p = IPNetwork(K)
    for t in range(10):
        rib.update("t2", [route(K, "t2", as_path=(65003,))], [], t)
        rib.update("t2", [], [p], t + 0.5)
    rib.update("t2", [route(K, "t2", as_path=(65003,))], [], 11)
    assert fib(rib) == {K: ["t2"]} and rib.next_tick() is None


def test_neighbor_down_is_not_a_flap_and_clears_the_history():
    rib = rib_with_dampening()
    p = IPNetwork(K)
    for t in (1, 2):
        rib.update("t1", [route(K, "t1")], [], t)
        rib.update("t1", [], [p], t + 0.5)
    rib.neighbor_down("t1", 3)
    rib.neighbor_up("t1", 4)
    rib.update("t1", [route(K, "t1")], [], 4)
    rib.update("t1", [], [p], 5)
    rib.update("t1", [route(K, "t1")], [], 6)
    assert fib(rib) == {K: ["t1"]}
