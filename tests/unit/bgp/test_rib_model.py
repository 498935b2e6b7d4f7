"""The incremental RIB against a from-scratch model, after any sequence of updates, withdrawals,
neighbour downs/ups and reloads (hypothesis).

After every step, three views must agree:
* the RIB's own state (``best()``, ``adj_rib_out()``);
* the state a consumer builds by applying only the RibChanges it was handed (FIB writer, speaker);
* a recomputation from scratch, written here independently: every received route judged again
  by the policy, best path by RFC 4271 §9.1.2.2 elimination, exports by the policy's export rule.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netaddr import IPAddress, IPNetwork

from bgp.policy import DEFAULT_LOCAL_PREF, PolicyEngine
from bgp.rib import Rib
from bgp.route import NO_ADVERTISE, NO_EXPORT, Origin, Route
from tests.unit.bgp.util import make_config, route, tunnel_yaml

TUNNELS = {"t1": 65002, "t2": 65003, "t3": 65004, "t4": 65001}
PREFIXES = ["10.2.0.0/16", "10.3.0.0/24", "10.1.0.0/16", "fd00:2::/32", "10.5.0.0/16"]

_TUN = (tunnel_yaml("t1", 1, 65002, "in", "out") + tunnel_yaml("t2", 2, 65003, "in", "out")
        + tunnel_yaml("t3", 3, 65004, "in", "out3") + tunnel_yaml("t4", 4, 65001, "in4", "out4"))
_A = """
asn: 65001
announce: [10.1.0.0/16]
policies:
  in: {prefixes: [{prefix: 10.0.0.0/8, le: 24}, {prefix: 'fd00::/8', le: 48}]}
  in4: {}
  out: {prefixes: [10.1.0.0/16]}
  out3: {transit: [t1, t2, t4]}
  out4: {transit: [t1]}
"""
_B = """
asn: 65001
announce: [10.1.0.0/16, 10.5.0.0/16]
multipath: false
policies:
  in: {prefixes: [{prefix: 10.3.0.0/24, action: deny}, {prefix: 10.0.0.0/8, le: 24}], local_pref: 120}
  in4: {local_pref: 90}
  out: {prefixes: [10.1.0.0/16], prepend: 1}
  out3: {transit: [t2]}
  out4: {transit: [t1, t3]}
"""
CONFIGS = [make_config(_TUN, _A), make_config(_TUN, _B), make_config(_TUN, _A.replace("announce: [10.1.0.0/16]",
                                                                                   "announce: []\nmax_paths: 2"))]


def _route(t: str, prefix: str, shape: int, med, origin, rid, lp, comm) -> Route:
    asn = TUNNELS[t]
    paths = [(asn,), (asn, 65100), (65100,), (asn, 65001), (65100, 65200)]
    ibgp = asn == 65001
    path = paths[shape]
    if ibgp and shape == 0:
        path = ()
    return route(prefix, t, as_path=path, med=med, origin=origin, router_id=rid, local_pref=lp,
                 communities=comm, peer_as=asn, ebgp=not ibgp)


# Few prefixes and mostly equal attributes, so that routes meet and tie often.
route_st = st.tuples(st.sampled_from(PREFIXES), st.sampled_from([0, 0, 1, 2, 2, 2, 3, 4]),
                     st.sampled_from([None, 5, 9]), st.sampled_from([Origin.IGP] * 4 + [Origin.INCOMPLETE]),
                     st.sampled_from([None, "1.1.1.1", "2.2.2.2"]), st.sampled_from([None, None, 200]),
                     st.sampled_from([(), (), (), (NO_EXPORT,), (NO_ADVERTISE,)]))

update_st = st.tuples(st.just("update"), st.sampled_from(sorted(TUNNELS)),
                      st.lists(route_st, max_size=4), st.lists(st.sampled_from(PREFIXES), max_size=2))
_others = [st.tuples(st.just("down"), st.sampled_from(sorted(TUNNELS))),
           st.tuples(st.just("up"), st.sampled_from(sorted(TUNNELS))),
           st.tuples(st.just("reconfigure"), st.integers(0, len(CONFIGS) - 1))]
# mostly updates: downs and reloads are rarer, so routes accumulate and compete
op_st = st.integers(0, 9).flatmap(lambda i: update_st if i < 7 else _others[i - 7])


# --- the independent model ---------------------------------------------------------------------

def _lp(r):
    return DEFAULT_LOCAL_PREF if r.local_pref is None else r.local_pref


def scratch_select(routes, settings, peer_addr):
    c = list(routes)
    if not c:
        return ()
    c = [r for r in c if _lp(r) == max(map(_lp, c))]
    c = [r for r in c if len(r.as_path) == min(len(x.as_path) for x in c)]
    c = [r for r in c if r.origin == min(x.origin for x in c)]

    def nas(r):
        return r.as_path[0] if r.as_path else 0
    c = [r for r in c if (r.med or 0) == min((x.med or 0) for x in c if nas(x) == nas(r))]
    if any(r.ebgp for r in c):
        c = [r for r in c if r.ebgp]
    c.sort(key=lambda r: (int(r.peer_router_id) if r.peer_router_id else 1 << 32, peer_addr[r.neighbor], r.neighbor))
    return tuple(c[: settings.max_paths] if settings.multipath else c[:1])


def scratch(cfg, received, up):
    policy = PolicyEngine(cfg.bgp, cfg.tunnels)
    peer_addr = {t: int(IPNetwork(str(cfg.tunnels[t].bgp.peer_address)).ip) for t in TUNNELS}
    cands: dict = {}
    for t in sorted(up):
        for prefix, r in received[t].items():
            v = policy.import_route(cfg.tunnels[t], r)
            if v.accepted:
                cands.setdefault(prefix, []).append(v.route)
    best = {p: scratch_select(rs, cfg.bgp, peer_addr) for p, rs in cands.items()}
    fib = {p: tuple(sorted((r.neighbor, str(r.next_hop)) for r in sel)) for p, sel in best.items() if sel}
    own = {IPNetwork(str(p)): Route(IPNetwork(str(p)), IPAddress("0.0.0.0" if p.version == 4 else "::"), "")
           for p in cfg.bgp.announce}
    out = {}
    for t in sorted(up):
        o = {}
        for p, r in own.items():
            e = policy.export_route(cfg.tunnels[t], r)
            if e is not None:
                o[p] = e
        for p, sel in best.items():
            if sel and p not in own:
                e = policy.export_route(cfg.tunnels[t], sel[0])
                if e is not None:
                    o[p] = e
        out[t] = o
    return fib, out


# --- the test ------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, min_size=1, max_size=40))
def test_incremental_rib_equals_recomputation(ops):
    cfg = CONFIGS[0]
    rib = Rib(cfg.bgp, cfg.tunnels, PolicyEngine(cfg.bgp, cfg.tunnels))
    up: set[str] = set(TUNNELS)
    for t in sorted(TUNNELS):
        rib.neighbor_up(t, 0)
    received = {t: {} for t in TUNNELS}
    fib_stream: dict = {}
    out_stream = {t: {r.prefix: r for r in rib.adj_rib_out(t)} for t in TUNNELS}
    now = 0.0

    def apply(change):
        for e in change.fib_set:
            assert len(e.next_hops) >= 1
            fib_stream[e.prefix] = tuple(sorted((t, str(a)) for t, a in e.next_hops))
        for p in change.fib_remove:
            assert p in fib_stream, f"removing {p} that was never installed"
            del fib_stream[p]
        for t, routes in change.announce.items():
            assert t in up, f"announcement to {t}, which is down"
            for r in routes:
                out_stream[t][r.prefix] = r
        for t, prefixes in change.withdraw.items():
            for p in prefixes:
                assert p in out_stream[t], f"withdrawing {p} from {t} that was never announced"
                del out_stream[t][p]

    for op in ops:
        now += 1
        if op[0] == "update":
            _, t, announced, withdrawn = op
            announced = [_route(t, *params) for params in announced]
            ch = rib.update(t, announced, [IPNetwork(p) for p in withdrawn], now)
            if t in up:
                for p in withdrawn:
                    received[t].pop(IPNetwork(p), None)
                for r in announced:
                    received[t][r.prefix] = r
            else:
                assert ch.events and ch.events[0]["type"] == "bgp_update_ignored"
        elif op[0] == "down":
            ch = rib.neighbor_down(op[1], now)
            up.discard(op[1])
            received[op[1]] = {}
            out_stream[op[1]] = {}
        elif op[0] == "up":
            up.add(op[1])
            out_stream[op[1]] = {}
            ch = rib.neighbor_up(op[1], now)
        else:
            cfg = CONFIGS[op[1]]
            ch = rib.reconfigure(cfg.bgp, cfg.tunnels, now)
        apply(ch)
        assert not ch.restart_neighbor
        fib, out = scratch(cfg, received, up)
        own_fib = {e.prefix: tuple(sorted((t, str(a)) for t, a in e.next_hops)) for e in rib.best()}
        assert own_fib == fib, op
        assert fib_stream == fib, op
        for t in TUNNELS:
            assert {r.prefix: r for r in rib.adj_rib_out(t)} == out.get(t, {}), (t, op)
            assert out_stream[t] == out.get(t, {}), (t, op)
            assert {r.prefix: r for r, _ in rib.adj_rib_in(t)} == received[t]


# --- with max-prefix stop and dampening --------------------------------------------------------

_TUN2 = (tunnel_yaml("t1", 1, 65002, "stop3", "out", "dampening: true") + tunnel_yaml("t2", 2, 65003, "in", "out")
         + tunnel_yaml("t3", 3, 65004, "in", "out3") + tunnel_yaml("t4", 4, 65001, "in4", "out4"))
_C = _A.replace("policies:\n", "dampening: {half_life: 1m, reuse: 800, suppress: 1500, max_suppress: 4m}\n"
                                "policies:\n  stop3: {prefixes: [{prefix: 10.0.0.0/8, le: 24}], "
                                "max_prefix: {limit: 2, action: stop}}\n")
CFG_C = make_config(_TUN2, _C)

update1_st = st.tuples(st.just("update"), st.sampled_from(["t1", "t1", "t2"]),
                       st.lists(route_st, max_size=4), st.lists(st.sampled_from(PREFIXES), max_size=3))
_others2 = [st.tuples(st.just("tick"), st.floats(0, 300)), st.tuples(st.just("tick"), st.floats(0, 300)),
            st.tuples(st.just("down"), st.sampled_from(["t1", "t2"])),
            st.tuples(st.just("up"), st.sampled_from(["t1", "t2"]))]
op2_st = st.integers(0, 9).flatmap(lambda i: update1_st if i < 6 else _others2[i - 6])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op2_st, min_size=1, max_size=60))
def test_max_prefix_stop_and_dampening_bookkeeping(ops):
    cfg = CFG_C
    policy = PolicyEngine(cfg.bgp, cfg.tunnels)
    rib = Rib(cfg.bgp, cfg.tunnels, policy)
    up = set(TUNNELS)
    for t in sorted(TUNNELS):
        rib.neighbor_up(t, 0)
    received = {t: {} for t in TUNNELS}
    fib_stream: dict = {}
    now = 0.0
    peer_addr = {t: int(IPNetwork(str(cfg.tunnels[t].bgp.peer_address)).ip) for t in TUNNELS}
    for op in ops:
        now += 1
        if op[0] == "update":
            _, t, params, withdrawn = op
            announced = [_route(t, *p) for p in params]
            ch = rib.update(t, announced, [IPNetwork(p) for p in withdrawn], now)
            if t in up:
                for p in withdrawn:
                    received[t].pop(IPNetwork(p), None)
                for r in announced:
                    received[t][r.prefix] = r
        elif op[0] == "tick":
            now += op[1]
            ch = rib.tick(now)
        elif op[0] == "down":
            ch = rib.neighbor_down(op[1], now)
            up.discard(op[1])
            received[op[1]] = {}
        else:
            up.add(op[1])
            ch = rib.neighbor_up(op[1], now)
        for e in ch.fib_set:
            fib_stream[e.prefix] = tuple(sorted((t, str(a)) for t, a in e.next_hops))
        for p in ch.fib_remove:
            del fib_stream[p]
        # max-prefix stop on t1: at most 2 accepted; a route is held only when the limit is full,
        # and only if the policy accepts it
        entries = rib.adj_rib_in("t1")
        assert {r.prefix: r for r, _ in entries} == received["t1"]
        accepted = [v for _, v in entries if v.accepted]
        held = [r for r, v in entries if v.reason == "max-prefix 2 reached (stop)"]
        assert len(accepted) <= 2
        assert not held or len(accepted) == 2
        for r in held:
            assert policy.import_route(cfg.tunnels["t1"], r).accepted
        for r, v in entries:
            if not v.accepted and r not in held:
                assert v.reason == policy.import_route(cfg.tunnels["t1"], r).reason
        # the FIB: best path over the accepted routes that dampening does not suppress
        suppressed = {(e["neighbor"], row["prefix"]) for row in rib.loc_rib(now) for e in row["routes"]
                      if e["status"] == "suppressed"}
        cands: dict = {}
        for t in sorted(up):
            for r, v in rib.adj_rib_in(t):
                if v.accepted and (t, str(r.prefix)) not in suppressed:
                    cands.setdefault(r.prefix, []).append(v.route)
        want = {p: tuple(sorted((r.neighbor, str(r.next_hop)) for r in scratch_select(rs, cfg.bgp, peer_addr)))
                for p, rs in cands.items()}
        got = {e.prefix: tuple(sorted((t, str(a)) for t, a in e.next_hops)) for e in rib.best()}
        assert got == want == fib_stream, op
