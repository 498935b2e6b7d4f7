"""bgp/policy.py: import guards, RFC 8212, prefix lists, AS_PATH and community filters, actions,
and the export rules (transit, split horizon, NO_EXPORT/NO_ADVERTISE, prepend, next hop self)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netaddr import IPAddress, IPNetwork

from bgp.policy import (BOGONS_V4, BOGONS_V6, PolicyEngine, PolicyError, format_community, parse_community)
from bgp.route import NO_ADVERTISE, NO_EXPORT, Origin
from tests.unit.bgp.util import make_config, route, tunnel_yaml

TUNNELS = (tunnel_yaml("t1", 1, 65002, "in1", "out1")
           + tunnel_yaml("t2", 2, 65003, None, None)
           + tunnel_yaml("t3", 3, 65001, None, None)          # iBGP
           + tunnel_yaml("t4", 4, 65004, "in4", "out4")
           + tunnel_yaml("t5", 5, 65001, "in5", "out5"))      # iBGP with policies

BGP = """
asn: 65001
announce: [10.1.0.0/16, 'fd01::/48']
policies:
  in1:
    prefixes:
      - {prefix: 10.9.9.0/24, action: deny}
      - {prefix: 10.9.0.0/16, le: 24}
      - {prefix: 10.2.0.0/16}
      - {prefix: 10.3.0.0/16, ge: 20, le: 22}
      - {prefix: 10.4.0.0/16, ge: 23}
      - {prefix: 10.5.0.0/16, le: 18}
      - {prefix: 'fd02::/32', le: 48}
      - {prefix: 0.0.0.0/0, le: 32, action: deny}
    local_pref: 150
  out1:
    prefixes: [10.1.0.0/16, 'fd01::/48', {prefix: 10.0.0.0/8, le: 24}]
    prepend: 2
    med: 7
    communities: ['65001:1', '65001:9:9']
  in4:
    prefixes: [{prefix: 10.0.0.0/8, le: 24}, {prefix: 0.0.0.0/0}]
    as_path: {deny: [64666], contains: [65004, 65104], max_length: 3}
    deny_communities: ['65004:666', '65004:1:666']
    match_communities: ['65004:100', '65004:1:100', no-export]
    remove_communities: ['65004:100']
    communities: ['65001:4', '65001:4:4']
    med: 44
    guards: {default_route: false, max_length: 28, own_prefixes: false}
  out4:
    transit: [t1, t3, t5]
  in5: {guards: {bogons: false, max_length6: 64}, local_pref: 300}
  out5: {transit: [t1, t3]}
"""


@pytest.fixture(scope="module")
def cfg():
    return make_config(TUNNELS, BGP)


@pytest.fixture(scope="module")
def engine(cfg):
    return PolicyEngine(cfg.bgp, cfg.tunnels)


def imp(engine, cfg, t, prefix, **kw):
    return engine.import_route(cfg.tunnels[t], route(prefix, t, **kw))


# --- guards ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["0.0.0.0/8", "0.1.0.0/16", "127.0.0.0/8", "127.0.0.1/32", "169.254.0.0/16",
                                    "169.254.1.0/30", "192.0.0.0/24", "192.0.2.0/24", "198.51.100.0/24",
                                    "203.0.113.0/24", "224.0.0.0/4", "239.1.0.0/16", "240.0.0.0/4",
                                    "255.255.255.255/32"])
def test_bogons_v4_refused_even_when_the_prefix_list_would_permit(engine, cfg, prefix):
    v = imp(engine, cfg, "t4", prefix, as_path=(65004,), communities=[(65004, 100)])
    # t4's guards allow /28 and the default route, not bogons
    assert not v.accepted and v.route is None
    assert v.reason.startswith("bogon") or v.reason.startswith("too specific"), v.reason


@pytest.mark.parametrize("prefix", ["::/128", "::1/128", "::ffff:0:0/96", "100::/64", "2001:db8::/32",
                                    "2001:db8:1::/48", "3ffe::/16", "fe80::/10", "fe80::/64", "fec0::/10",
                                    "ff02::/16"])
def test_bogons_v6(engine, cfg, prefix):
    v = imp(engine, cfg, "t3", prefix, as_path=())
    assert not v.accepted and (v.reason.startswith("bogon") or "too specific" in v.reason), v.reason


@pytest.mark.parametrize("prefix", ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                                    "198.19.0.0/16", "fc00::/7", "fd12:3456::/32", "2001:db9::/32"])
def test_private_and_shared_space_is_not_a_bogon(engine, cfg, prefix):
    """RFC 1918, RFC 6598, benchmarking and ULA space is what VPNs carry (docs/bgp.md)."""
    assert imp(engine, cfg, "t3", prefix, as_path=()).accepted   # iBGP, no policy: only guards


def test_bogon_tables_are_normalised():
    assert all(b.cidr == b for b in BOGONS_V4 + BOGONS_V6)
    assert {b.version for b in BOGONS_V4} == {4} and {b.version for b in BOGONS_V6} == {6}


def test_default_route_refused_by_default_and_allowed_only_explicitly(engine, cfg):
    v = imp(engine, cfg, "t3", "0.0.0.0/0", as_path=())
    assert (v.accepted, v.reason) == (False, "default route")
    assert imp(engine, cfg, "t3", "::/0", as_path=()).reason == "default route"
    v4 = imp(engine, cfg, "t4", "0.0.0.0/0", as_path=(65004,), communities=[(65004, 100)])
    assert v4.accepted, v4.reason        # in4: guards.default_route false and the list permits it


@pytest.mark.parametrize("tunnel,prefix,ok,reason", [
    ("t3", "10.7.7.0/24", True, "accepted"),
    ("t3", "10.7.7.0/25", False, "too specific (/25 > /24)"),
    ("t3", "10.7.7.1/32", False, "too specific (/32 > /24)"),
    ("t3", "fd07::/48", True, "accepted"),
    ("t3", "fd07::/49", False, "too specific (/49 > /48)"),
    ("t5", "fd07::/64", True, "accepted"),                      # in5: max_length6 64
    ("t5", "fd07::/65", False, "too specific (/65 > /64)"),
    ("t4", "10.7.7.16/28", True, "accepted"),                   # in4: max_length 28 (list le 24 though)
])
def test_max_length_guard(engine, cfg, tunnel, prefix, ok, reason):
    kw = {"as_path": (65004,), "communities": [(65004, 100)]} if tunnel == "t4" else {"as_path": ()}
    v = imp(engine, cfg, tunnel, prefix, **kw)
    if tunnel == "t4" and ok:
        # the guard let it through; in4's prefix list (le 24) refuses it
        assert (v.accepted, v.reason) == (False, "prefix-list in4: no entry matches")
    else:
        assert (v.accepted, v.reason) == (ok, reason)


@pytest.mark.parametrize("prefix", ["10.1.0.0/16", "10.1.5.0/24", "fd01::/48"])
def test_own_prefixes_coming_back_are_refused(engine, cfg, prefix):
    assert imp(engine, cfg, "t3", prefix, as_path=()).reason == "own prefix"


def test_covering_aggregate_of_own_prefix_is_not_own(engine, cfg):
    assert imp(engine, cfg, "t3", "10.0.0.0/8", as_path=()).accepted


def test_own_prefix_guard_can_be_turned_off(engine, cfg):
    v = imp(engine, cfg, "t4", "10.1.0.0/16", as_path=(65004,), communities=[(65004, 100)])
    assert v.accepted, v.reason


def test_prefix_holding_a_tunnel_endpoint_is_refused(engine, cfg):
    # the tunnels' underlay addresses are 198.18.0.N (tests/unit/bgp/util.py)
    v = imp(engine, cfg, "t3", "198.18.0.0/24", as_path=())
    assert not v.accepted and v.reason == "holds tunnel t1's endpoint 198.18.0.1"
    assert imp(engine, cfg, "t3", "198.18.1.0/24", as_path=()).accepted


def test_bogon_guard_off_only_where_written(engine, cfg):
    assert imp(engine, cfg, "t5", "127.0.0.0/8", as_path=()).accepted     # in5: bogons false
    assert not imp(engine, cfg, "t3", "127.0.0.0/8", as_path=()).accepted


def test_as_path_loop_is_refused_whatever_the_policy(engine, cfg):
    for t in ("t3", "t4", "t5"):
        v = imp(engine, cfg, t, "10.7.0.0/16", as_path=(65004, 65001, 65104), communities=[(65004, 100)])
        assert (v.accepted, v.reason) == (False, "as-path loop (own AS 65001)")


def test_malformed_prefix_refused(engine, cfg):
    from dataclasses import replace
    r = replace(route("10.7.0.0/16", "t3", as_path=()), prefix=IPNetwork("10.7.0.1/16"))
    v = engine.import_route(cfg.tunnels["t3"], r)
    assert not v.accepted and "host bits" in v.reason


# --- RFC 8212 -------------------------------------------------------------------------------

def test_ebgp_without_import_policy_accepts_nothing(engine, cfg):
    v = imp(engine, cfg, "t2", "10.7.0.0/16", as_path=(65003,))
    assert (v.accepted, v.route, v.reason) == (False, None, "no import policy (RFC 8212)")


def test_ibgp_without_import_policy_accepts_within_the_guards(engine, cfg):
    v = imp(engine, cfg, "t3", "10.7.0.0/16", as_path=(), local_pref=250)
    assert v.accepted and v.route.local_pref == 250 and not v.route.ebgp and v.route.peer_as == 65001


def test_ebgp_without_export_policy_is_sent_nothing(engine, cfg):
    own = route("10.1.0.0/16", "", as_path=())
    assert engine.export_route(cfg.tunnels["t2"], own) is None


# --- prefix lists ---------------------------------------------------------------------------

@pytest.mark.parametrize("prefix,ok,reason", [
    ("10.2.0.0/16", True, None),                  # exact entry: the prefix itself
    ("10.2.1.0/24", False, "prefix-list in1 deny 0.0.0.0/0 le 32"),   # ... only
    ("10.3.0.0/19", False, "prefix-list in1 deny 0.0.0.0/0 le 32"),   # ge 20
    ("10.3.16.0/20", True, None),
    ("10.3.4.0/22", True, None),
    ("10.3.4.0/23", False, "prefix-list in1 deny 0.0.0.0/0 le 32"),   # le 22
    ("10.4.0.0/22", False, "prefix-list in1 deny 0.0.0.0/0 le 32"),   # ge 23 (le: max)
    ("10.4.2.0/23", True, None),
    ("10.4.2.0/24", True, None),
    ("10.5.0.0/16", True, None),                  # le only: from the prefix length up to le
    ("10.5.64.0/18", True, None),
    ("10.5.64.0/19", False, "prefix-list in1 deny 0.0.0.0/0 le 32"),
    ("10.9.9.0/24", False, "prefix-list in1 deny 10.9.9.0/24"),    # first match wins: deny before permit
    ("10.9.8.0/24", True, None),
    ("10.6.0.0/16", False, "prefix-list in1 deny 0.0.0.0/0 le 32"),
    ("fd02:0:1::/48", True, None),
    ("fd02:1::/48", False, "prefix-list in1: no entry matches"),   # outside fd02::/32
    ("fd03::/32", False, "prefix-list in1: no entry matches"),     # IPv6 never matches IPv4 entries
])
def test_prefix_list_ge_le_and_first_match(engine, cfg, prefix, ok, reason):
    v = imp(engine, cfg, "t1", prefix)
    assert v.accepted == ok, v.reason
    if reason:
        assert v.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(8, 24), st.integers(8, 32), st.one_of(st.none(), st.integers(0, 32)),
       st.one_of(st.none(), st.integers(0, 32)))
def test_prefix_list_matches_the_textbook_definition(addr, entry_len, plen, ge, le):
    """An entry with ge/le matches P iff P is inside the entry's prefix and ge <= len(P) <= le
    (ge defaults to the entry's length, le to 32; neither: exactly the entry's length)."""
    from appliance.config.model import BgpPolicy, PrefixMatch
    from ipaddress import IPv4Network
    from bgp.policy import CompiledPolicy
    entry = IPv4Network((addr, entry_len), strict=False)
    if ge is not None and ge < entry_len:
        ge = entry_len
    if le is not None and le < (ge or entry_len):
        le = ge or entry_len
    pol = CompiledPolicy(BgpPolicy("p", prefixes=(PrefixMatch(entry, ge, le),)))
    candidate = IPNetwork(f"{IPAddress(addr)}/{plen}").cidr
    inside = candidate.prefixlen >= entry_len and IPNetwork(f"{candidate.ip}/{entry_len}").cidr == \
        IPNetwork(str(entry))
    lo = ge if ge is not None else entry_len
    hi = le if le is not None else (32 if ge is not None else entry_len)
    expected = inside and lo <= candidate.prefixlen <= hi
    assert (pol.prefix_verdict(candidate) is None) == expected


# --- AS_PATH and communities ------------------------------------------------------------------

@pytest.mark.parametrize("as_path,communities,ok,reason", [
    ((65004,), [(65004, 100)], True, None),
    ((65004, 64666), [(65004, 100)], False, "as-path contains denied AS 64666"),
    ((65104,), [(65004, 100)], True, None),                                  # contains: any of them
    ((65005,), [(65004, 100)], False, "as-path contains none of AS 65004, 65104"),
    ((65004, 1, 2), [(65004, 100)], True, None),
    ((65004, 1, 2, 3), [(65004, 100)], False, "as-path too long (4 > 3)"),
    ((65004,), [], False, "no matching community"),
    ((65004,), [(65004, 101)], False, "no matching community"),
    ((65004,), [(65004, 100), (65004, 666)], False, "community 65004:666 denied"),
    ((65004,), [NO_EXPORT], True, None),                                    # match list names no-export
])
def test_as_path_and_community_conditions(engine, cfg, as_path, communities, ok, reason):
    v = imp(engine, cfg, "t4", "10.7.0.0/16", as_path=as_path, communities=communities)
    assert v.accepted == ok, v.reason
    if reason:
        assert v.reason == reason


def test_large_communities_match_and_deny(engine, cfg):
    assert imp(engine, cfg, "t4", "10.7.0.0/16", as_path=(65004,), large_communities=[(65004, 1, 100)]).accepted
    v = imp(engine, cfg, "t4", "10.7.0.0/16", as_path=(65004,), communities=[(65004, 100)],
            large_communities=[(65004, 1, 666)])
    assert v.reason == "community 65004:1:666 denied"


def test_import_actions(engine, cfg):
    v = imp(engine, cfg, "t4", "10.7.0.0/16", as_path=(65004,), communities=[(65004, 100), (65004, 5)],
            large_communities=[(65004, 1, 100)], med=3, local_pref=999)
    assert v.accepted
    r = v.route
    assert r.communities == ((65004, 5), (65001, 4))          # 65004:100 removed, 65001:4 added
    assert r.large_communities == ((65004, 1, 100), (65001, 4, 4))
    assert r.med == 44
    assert r.local_pref is None              # LOCAL_PREF from an eBGP neighbour is ignored (RFC 4271 §5.1.5)
    assert (r.neighbor, r.peer_as, r.ebgp) == ("t4", 65004, True)
    v1 = imp(engine, cfg, "t1", "10.2.0.0/16", local_pref=5)
    assert v1.route.local_pref == 150        # in1 sets it


def test_graceful_shutdown_community_lowers_preference(engine, cfg):
    v = imp(engine, cfg, "t5", "10.7.0.0/16", as_path=(), communities=[(0xFFFF, 0)])
    assert v.accepted and v.route.local_pref == 0          # RFC 8326, even over in5's local_pref


# --- export ---------------------------------------------------------------------------------

def own(prefix="10.1.0.0/16"):
    return route(prefix, "", as_path=(), next_hop="0.0.0.0" if ":" not in prefix else "::", peer_as=0)


def test_export_own_prefix_with_actions(engine, cfg):
    out = engine.export_route(cfg.tunnels["t1"], own())
    assert out is not None
    assert out.as_path == (65001, 65001, 65001)            # our AS once, plus prepend 2
    assert out.next_hop == IPAddress("169.254.1.1")         # next hop self: our inside address
    assert out.med == 7 and out.local_pref is None
    assert out.communities == ((65001, 1),) and out.large_communities == ((65001, 9, 9),)
    out6 = engine.export_route(cfg.tunnels["t1"], own("fd01::/48"))
    assert out6.next_hop == IPAddress("fd00:1::1")


def test_export_prefix_list_applies(engine, cfg):
    learned = engine.import_route(cfg.tunnels["t3"], route("172.16.0.0/16", "t3", as_path=())).route
    assert engine.export_route(cfg.tunnels["t1"], learned) is None   # t1's export has no transit anyway


def test_ibgp_export_without_policy_sends_own_prefixes_and_keeps_local_pref(engine, cfg):
    out = engine.export_route(cfg.tunnels["t3"], own())
    assert out.as_path == () and out.local_pref == 100 and out.next_hop == IPAddress("169.254.3.1")


def test_learned_route_is_never_re_exported_without_transit(engine, cfg):
    learned = engine.import_route(cfg.tunnels["t1"], route("10.2.0.0/16", "t1")).route
    for t in ("t1", "t2", "t3"):          # split horizon, no policy, iBGP without policy
        assert engine.export_route(cfg.tunnels[t], learned) is None
    out = engine.export_route(cfg.tunnels["t4"], learned)   # out4: transit [t1, t3, t5]
    assert out is not None and out.as_path == (65001, 65002) and out.neighbor == "t1"
    assert out.local_pref is None and out.med is None        # a MED is not passed on to another AS


def test_transit_names_the_source_exactly(engine, cfg):
    learned4 = engine.import_route(cfg.tunnels["t4"], route("10.7.0.0/16", "t4", as_path=(65004,),
                                                             communities=[(65004, 100)])).route
    assert engine.export_route(cfg.tunnels["t5"], learned4) is None   # out5 names t1, t3 only


def test_ibgp_learned_never_to_ibgp(engine, cfg):
    learned3 = engine.import_route(cfg.tunnels["t3"], route("10.7.0.0/16", "t3", as_path=())).route
    assert engine.export_route(cfg.tunnels["t5"], learned3) is None     # even though out5 names t3
    assert engine.export_route(cfg.tunnels["t4"], learned3).as_path == (65001,)
    learned1 = engine.import_route(cfg.tunnels["t1"], route("10.2.0.0/16", "t1", med=5)).route
    to_ibgp = engine.export_route(cfg.tunnels["t5"], learned1)
    assert to_ibgp.as_path == (65002,) and to_ibgp.local_pref == 150 and to_ibgp.med == 5


def test_no_export_and_no_advertise(engine, cfg):
    learned = engine.import_route(cfg.tunnels["t1"], route("10.2.0.0/16", "t1", communities=[NO_EXPORT])).route
    assert engine.export_route(cfg.tunnels["t4"], learned) is None           # eBGP: not exported
    assert engine.export_route(cfg.tunnels["t5"], learned) is not None       # iBGP: still advertised
    learned = engine.import_route(cfg.tunnels["t1"], route("10.2.0.0/16", "t1",
                                                           communities=[NO_ADVERTISE])).route
    assert engine.export_route(cfg.tunnels["t4"], learned) is None
    assert engine.export_route(cfg.tunnels["t5"], learned) is None


def test_export_without_an_inside_address_of_the_family(cfg):
    c = make_config(tunnel_yaml("t1", 1, 65002, None, "out").replace(", address6: 'fd00:1::1/126'", "")
                    .replace(", peer_address6: 'fd00:1::2'", ""),
                    "asn: 65001\nannounce: ['fd01::/48']\npolicies: {out: {}}")
    e = PolicyEngine(c.bgp, c.tunnels)
    assert e.export_route(c.tunnels["t1"], own("fd01::/48")) is None


def test_export_only_in_the_families_the_tunnel_has_sessions_for():
    # address6 on the interface, but no IPv6 session (no peer_address6): IPv6 prefixes stay home
    c = make_config(tunnel_yaml("t1", 1, 65002, None, "out").replace(", peer_address6: 'fd00:1::2'", "")
                    + tunnel_yaml("t2", 2, 65003, None, "out").replace("peer_address: 169.254.2.2, ", "")
                    .replace("peer_address6: 'fd00:2::2'", "peer_address: 'fd00:2::2'"),
                    "asn: 65001\nannounce: [10.1.0.0/16, 'fd01::/48']\npolicies: {out: {}}")
    e = PolicyEngine(c.bgp, c.tunnels)
    assert e.export_route(c.tunnels["t1"], own("fd01::/48")) is None
    assert e.export_route(c.tunnels["t1"], own()).next_hop == IPAddress("169.254.1.1")
    # an IPv6-only session carries IPv6 unicast only
    assert e.export_route(c.tunnels["t2"], own()) is None
    assert e.export_route(c.tunnels["t2"], own("fd01::/48")).next_hop == IPAddress("fd00:2::1")


# --- communities ------------------------------------------------------------------------------

def test_parse_community():
    assert parse_community("65001:100") == ("standard", (65001, 100))
    assert parse_community("65001:1:2") == ("large", (65001, 1, 2))
    assert parse_community("NO-EXPORT") == ("standard", NO_EXPORT)
    assert parse_community("70000:1:2") == ("large", (70000, 1, 2))
    with pytest.raises(PolicyError):
        parse_community("70000:1")
    assert format_community(NO_ADVERTISE) == "no-advertise" and format_community((1, 2, 3)) == "1:2:3"


def test_unknown_policy_name_is_an_error_not_a_crash(cfg):
    e = PolicyEngine(cfg.bgp, cfg.tunnels)
    with pytest.raises(PolicyError):
        e.policy("nope")


def test_origin_is_kept(engine, cfg):
    v = imp(engine, cfg, "t3", "10.7.0.0/16", as_path=(), origin=Origin.INCOMPLETE)
    assert v.route.origin is Origin.INCOMPLETE


# --- any route: a verdict, never an exception ----------------------------------------------------

_CFG = make_config(TUNNELS, BGP)
_ENGINE = PolicyEngine(_CFG.bgp, _CFG.tunnels)
_v4 = st.builds(lambda a, n: IPNetwork(f"{IPAddress(a)}/{n}").cidr, st.integers(0, 2**32 - 1), st.integers(0, 32))
_v6 = st.builds(lambda a, n: IPNetwork(f"{IPAddress(a, 6)}/{n}").cidr, st.integers(0, 2**128 - 1),
                st.integers(0, 128))
_asn = st.integers(1, 2**32 - 1)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_v4, _v6), st.lists(st.one_of(_asn, st.sampled_from([65001, 65004, 64666])), max_size=40),
       st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), max_size=5),
       st.lists(st.tuples(_asn, _asn, _asn), max_size=3), st.sampled_from(["t1", "t2", "t3", "t4", "t5"]),
       st.one_of(st.none(), st.integers(0, 2**32 - 1)), st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_any_route_gets_a_verdict_and_an_export_decision(prefix, path, comms, large, t, med, lp):
    cfg, engine = _CFG, _ENGINE
    r = route(str(prefix), t, as_path=tuple(path), communities=comms, large_communities=large, med=med,
              local_pref=lp)
    v = engine.import_route(cfg.tunnels[t], r)
    assert isinstance(v.reason, str) and v.reason
    assert v.accepted == (v.route is not None)
    if v.accepted:
        assert v.route.prefix == prefix and v.route.neighbor == t and 65001 not in v.route.as_path
        for other in ("t1", "t2", "t3", "t4", "t5"):
            out = engine.export_route(cfg.tunnels[other], v.route)
            if out is not None:
                assert other != t and out.prefix == prefix
                if cfg.tunnels[other].bgp.peer_as != 65001:       # eBGP: our AS first
                    assert out.as_path[0] == 65001 and out.local_pref is None
                else:
                    assert out.as_path == v.route.as_path and out.local_pref is not None
                assert NO_ADVERTISE not in out.communities
