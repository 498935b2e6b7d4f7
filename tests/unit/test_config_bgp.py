"""Config: every key under bgp: (top level, per tunnel, policies) for the route manager (issue 9)."""

from __future__ import annotations

from ipaddress import IPv6Address

import pytest

from appliance.config import load_config
from appliance.config.model import AsPathFilter, Dampening, Guards, MaxPrefix
from tests.unit.config_util import issues_of, line_of, one_issue, write_config, write_psk

FULL = """\
appliance: {router_id: 10.255.0.1}
tunnels:
  to-b:
    remote: 198.51.100.2
    auth: {psk_file: secrets/to-b.psk}
    interface: {address: 169.254.21.1/30, address6: 'fd00:21::1/126'}
    bgp:
      peer_as: 65002
      peer_address: 169.254.21.2
      peer_address6: 'fd00:21::2'
      hold_time: 9s
      import: from-b
      export: to-b
      graceful_restart: true
      passive: true
      dampening: true
  to-c:
    remote: 198.51.100.3
    auth: {psk_file: secrets/to-b.psk}
    interface: {address: 169.254.22.1/30}
    bgp: {peer_as: 65003, peer_address: 169.254.22.2, import: from-c, export: to-c, graceful_restart: 300s}
bgp:
  asn: 65001
  announce: [10.1.0.0/16, '2001:db8:1::/48']
  multipath: false
  max_paths: 4
  prefer_static: false
  dampening: {half_life: 10m, reuse: 500, suppress: 3000, max_suppress: 40m}
  policies:
    from-b:
      prefixes: [{prefix: 10.2.0.0/16, le: 24}, {prefix: 10.2.99.0/24, action: deny}]
      max_prefix: {limit: 50, action: restart, restart_delay: 5m}
      as_path: {contains: [65002], deny: [64666, 64667], max_length: 10}
      match_communities: ['65002:1']
      deny_communities: [no-advertise]
      remove_communities: ['65002:666:1']
      communities: ['65001:2']
      local_pref: 200
      guards: {default_route: false, max_length: 28, max_length6: 64}
    to-b:
      prefixes: [10.1.0.0/16]
      prepend: 2
      med: 50
      transit: [to-c]
    from-c: {max_prefix: 10}
    to-c: {prefixes: [10.1.0.0/16]}
"""


def load(tmp_path, text=FULL):
    write_psk(tmp_path)
    return load_config(write_config(tmp_path, text))


def test_every_bgp_key(tmp_path):
    cfg = load(tmp_path)
    b = cfg.tunnels["to-b"].bgp
    assert b.peer_address6 == IPv6Address("fd00:21::2") and b.hold_time == 9 and b.keepalive == 3
    assert (b.graceful_restart, b.passive, b.dampening) == (120, True, True)
    c = cfg.tunnels["to-c"].bgp
    assert (c.graceful_restart, c.passive, c.dampening, c.peer_address6) == (300, False, False, None)
    s = cfg.bgp
    assert (s.multipath, s.max_paths, s.prefer_static) == (False, 4, False)
    assert s.dampening == Dampening(half_life=600, reuse=500, suppress=3000, max_suppress=2400)
    p = s.policies["from-b"]
    assert [x.action for x in p.prefixes] == ["permit", "deny"]
    assert p.max_prefix == MaxPrefix(50, "restart", 300)
    assert p.as_path == AsPathFilter(contains=(65002,), deny=(64666, 64667), max_length=10)
    assert (p.match_communities, p.deny_communities, p.remove_communities, p.communities) == \
        (("65002:1",), ("no-advertise",), ("65002:666:1",), ("65001:2",))
    assert p.guards == Guards(bogons=True, default_route=False, max_length=28, max_length6=64, own_prefixes=True)
    t = s.policies["to-b"]
    assert (t.prepend, t.med, t.transit, t.guards) == (2, 50, ("to-c",), Guards())
    assert s.policies["from-c"].max_prefix == MaxPrefix(10, "restart", 60)


def test_defaults(tmp_path):
    cfg = load(tmp_path, """\
appliance: {router_id: 10.255.0.1}
tunnels:
  to-b:
    remote: 198.51.100.2
    auth: {psk_file: secrets/to-b.psk}
    interface: {address: 169.254.21.1/30}
    bgp: {peer_as: 65002, peer_address: 169.254.21.2}
bgp: {asn: 65001}
""")
    b = cfg.tunnels["to-b"].bgp
    assert (b.hold_time, b.keepalive, b.graceful_restart, b.passive, b.dampening) == (30, 10, 0, False, False)
    assert (b.import_policy, b.export_policy, b.peer_address6) == (None, None, None)
    s = cfg.bgp
    assert (s.multipath, s.max_paths, s.prefer_static, s.policies) == (True, 8, True, {})
    # FRR's dampening defaults (bgp dampening 15 750 2000 60)
    assert s.dampening == Dampening(half_life=900, reuse=750, suppress=2000, max_suppress=3600)


def test_hold_time_zero_means_no_keepalives(tmp_path):
    cfg = load(tmp_path, FULL.replace("hold_time: 9s", "hold_time: 0"))
    assert cfg.tunnels["to-b"].bgp.keepalive == 0


@pytest.mark.parametrize("old,new,path,fragment", [
    ("peer_address6: 'fd00:21::2'", "peer_address6: 'fd00:22::2'", "tunnels.to-b.bgp.peer_address6",
     "not in the tunnel's inside network fd00:21::/126"),
    ("peer_address6: 'fd00:21::2'", "peer_address6: 'fd00:21::1'", "tunnels.to-b.bgp.peer_address6", "own"),
    ("peer_address6: 'fd00:21::2'", "peer_address6: 169.254.21.2", "tunnels.to-b.bgp.peer_address6",
     "not an IPv6 address"),
    ("graceful_restart: true", "graceful_restart: 5000s", "tunnels.to-b.bgp.graceful_restart", "1..4095"),
    ("graceful_restart: true", "graceful_restart: sometimes", "tunnels.to-b.bgp.graceful_restart",
     "expected true, false or a restart time"),
    ("passive: true", "passive: 1", "tunnels.to-b.bgp.passive", "expected true or false"),
    ("dampening: true", "dampenin: true", "tunnels.to-b.bgp.dampenin", "did you mean 'dampening'?"),
    ("max_paths: 4", "max_paths: 65", "bgp.max_paths", "allowed: 1..64"),
    ("multipath: false", "multipath: 2", "bgp.multipath", "expected true or false"),
    ("prefer_static: false", "prefer_static: bgp", "bgp.prefer_static", "expected true or false"),
    ("reuse: 500", "reuse: 5000", "bgp.dampening.reuse", "must be below suppress 3000"),
    ("half_life: 10m", "half_life: 50m", "bgp.dampening.half_life", "allowed: 1m..45m"),
    ("max_suppress: 40m", "max_suppress: 5m", "bgp.dampening.max_suppress", "shorter than half_life 10m"),
    ("dampening: {half_life: 10m, reuse: 500, suppress: 3000, max_suppress: 40m}", "dampening: yes",
     "bgp.dampening", "switched on per tunnel"),
    ("max_suppress: 40m", "max_supress: 40m", "bgp.dampening.max_supress", "did you mean 'max_suppress'?"),
    ("restart_delay: 5m", "restart_delay: 0", "bgp.policies.from-b.max_prefix.restart_delay", "allowed: 1s..24h"),
    ("action: restart, restart_delay", "action: warn, restart_delay", "bgp.policies.from-b.max_prefix.restart_delay",
     "only with action: restart"),
    ("contains: [65002]", "contains: [0]", "bgp.policies.from-b.as_path.contains[0]", "1..4294967295"),
    ("deny: [64666, 64667]", "deny: [64666, 65002]", "bgp.policies.from-b.as_path", "AS 65002 is both"),
    ("max_length: 10}", "max_length: 0}", "bgp.policies.from-b.as_path.max_length", "1..255"),
    ("max_length: 10}", "max_len: 10}", "bgp.policies.from-b.as_path.max_len", "did you mean 'max_length'?"),
    ("match_communities: ['65002:1']", "match_communities: ['65002:1:x']",
     "bgp.policies.from-b.match_communities[0]", "not a community"),
    ("deny_communities: [no-advertise]", "deny_communities: no-advertise",
     "bgp.policies.from-b.deny_communities", "expected a list"),
    ("max_length: 28", "max_length: 33", "bgp.policies.from-b.guards.max_length", "1..32"),
    ("default_route: false", "default_routes: false", "bgp.policies.from-b.guards.default_routes",
     "did you mean 'default_route'?"),
    ("transit: [to-c]", "transit: [to-d]", "bgp.policies.to-b.transit[0]", "did you mean 'to-c'?"),
    ("transit: [to-c]", "transit: [to-c, to-c]", "bgp.policies.to-b.transit[1]", "listed twice"),
    ("transit: [to-c]", "transit: [to-b]", "bgp.policies.to-b.transit[0]", "never sent back"),
    ("prepend: 2", "prepend: 17", "bgp.policies.to-b.prepend", "0..16"),
    ("announce: [10.1.0.0/16,", "announce: [10.1.0.0/16, 10.1.0.0/16,", "bgp.announce[1]", "listed twice"),
])
def test_errors(tmp_path, old, new, path, fragment):
    write_psk(tmp_path)
    assert old in FULL, old
    cfg = write_config(tmp_path, FULL.replace(old, new))
    issue = one_issue(cfg)
    assert issue.path == path, str(issue)
    assert fragment in issue.message, str(issue)
    # the line of the offending value (for a cross-field problem: of its mapping)
    assert issue.line == line_of(cfg, new), str(issue)


def test_yaml_off_is_refused_for_booleans_with_a_clear_message(tmp_path):
    # YAML 1.1 reads 'no' as false: accepted, and means the guard is off.
    cfg = load(tmp_path, FULL.replace("default_route: false", "default_route: no"))
    assert cfg.bgp.policies["from-b"].guards.default_route is False


@pytest.mark.parametrize("policy,key,fragment", [
    ("from-b", "prepend: 1", "prepend applies to export only, but tunnel 'to-b' uses policy 'from-b' as its import"),
    ("from-b", "transit: [to-c]", "transit applies to export only"),
    ("to-b", "max_prefix: 5", "max_prefix applies to import only, but tunnel 'to-b' uses policy 'to-b' as its export"),
    ("to-b", "guards: {bogons: false}", "guards applies to import only"),
])
def test_direction_only_keys(tmp_path, policy, key, fragment):
    write_psk(tmp_path)
    marker = {"from-b": "      local_pref: 200\n", "to-b": "      med: 50\n"}[policy]
    text = FULL.replace(marker, marker + f"      {key}\n")
    cfg = write_config(tmp_path, text)
    issue = one_issue(cfg)
    assert issue.path == f"bgp.policies.{policy}.{key.split(':')[0]}" and fragment in issue.message, str(issue)
    assert issue.tunnel == "to-b" and issue.line == line_of(cfg, f"      {key}")


def test_transit_names_a_tunnel_without_bgp(tmp_path):
    write_psk(tmp_path)
    text = FULL.replace("    bgp: {peer_as: 65003, peer_address: 169.254.22.2, import: from-c, export: to-c, "
                        "graceful_restart: 300s}\n", "")
    cfg = write_config(tmp_path, text)
    issue = one_issue(cfg)
    assert issue.path == "bgp.policies.to-b.transit[0]" and "has no bgp: block" in issue.message


def test_peer_address6_next_to_ipv6_peer_address(tmp_path):
    write_psk(tmp_path)
    text = FULL.replace("peer_address: 169.254.21.2", "peer_address: 'fd00:21::2'")
    issue = one_issue(write_config(tmp_path, text))
    assert issue.path == "tunnels.to-b.bgp.peer_address6" and "already IPv6" in issue.message


def test_peer_address6_needs_address6(tmp_path):
    write_psk(tmp_path)
    text = FULL.replace(", address6: 'fd00:21::1/126'", "")
    issue = one_issue(write_config(tmp_path, text))
    assert issue.path == "tunnels.to-b.bgp.peer_address6" and "interface.address6" in issue.message


def test_several_problems_reported_together(tmp_path):
    write_psk(tmp_path)
    text = FULL.replace("max_paths: 4", "max_paths: 0").replace("prepend: 2", "prepend: -1") \
        .replace("passive: true", "passive: maybe")
    paths = [i.path for i in issues_of(write_config(tmp_path, text))]
    assert sorted(paths) == ["bgp.max_paths", "bgp.policies.to-b.prepend", "tunnels.to-b.bgp.passive"]
