"""bgp/exabgp.py: the rendered configuration is accepted by ExaBGP 5 itself, and the API parser
turns ExaBGP's JSON into Routes and survives every kind of bad line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from netaddr import IPAddress, IPNetwork

from appliance.config import load_config
from bgp import exabgp
from bgp.route import Origin, Route
from tests.unit.config_util import write_config, write_psk

CONFIG = """
appliance: {name: a, router_id: 10.255.0.1}
tunnels:
  to-b:
    remote: 198.51.100.2
    auth: {psk_file: secrets/to-b.psk}
    interface: {name: xfrm-b, address: 169.254.21.1/30, address6: "fd00:21::1/126"}
    bgp: {peer_as: 65002, peer_address: 169.254.21.2, peer_address6: "fd00:21::2", hold_time: 3,
          import: from-b, export: to-b, graceful_restart: 60}
  to-c:
    remote: 198.51.100.3
    auth: {psk_file: secrets/to-b.psk}
    interface: {name: xfrm-c, address: 169.254.22.1/30}
    bgp: {peer_as: 65001, peer_address: 169.254.22.2, passive: true}
  plain:
    remote: 198.51.100.4
    auth: {psk_file: secrets/to-b.psk}
    interface: {name: xfrm-p, address: 169.254.23.1/30}
bgp:
  asn: 65001
  announce: [10.1.0.0/16]
  policies:
    from-b: {prefixes: [{prefix: 10.2.0.0/16, le: 24}]}
    to-b: {prefixes: [{prefix: 10.1.0.0/16}]}
"""


@pytest.fixture
def config(tmp_path):
    write_psk(tmp_path)
    return load_config(write_config(tmp_path, CONFIG))


def test_neighbors_from_the_config(config):
    ns = exabgp.neighbors_for(config)
    assert set(ns) == {"to-b", "to-c"}                      # "plain" has no bgp block
    b4, b6 = ns["to-b"]
    assert (b4.peer_address, b4.local_address, b4.families) == (IPAddress("169.254.21.2"),
                                                               IPAddress("169.254.21.1"), ("ipv4 unicast",))
    assert (b6.peer_address, b6.local_address, b6.families) == (IPAddress("fd00:21::2"), IPAddress("fd00:21::1"),
                                                               ("ipv6 unicast",))
    assert b4.hold_time == 3 and b4.graceful_restart == 60 and b4.ebgp
    assert b4.router_id == IPAddress("10.255.0.1")
    (c,) = ns["to-c"]
    assert c.passive and not c.ebgp and c.graceful_restart == 0
    assert set(exabgp.neighbors_for(config, ["to-c"])) == {"to-c"}


def test_exabgp_accepts_the_rendered_config(config, tmp_path):
    specs = [s for ss in exabgp.neighbors_for(config).values() for s in ss]
    text = exabgp.render_config(specs, [sys.executable, "/x/relay.py", "/run/isthmus/bgp/api.sock"])
    assert "hold-time 3;" in text and "graceful-restart 60;" in text and "passive true;" in text
    assert "route-refresh enable;" in text and "encoder json;" in text
    assert "receive { parsed; update; notification; refresh; open; }" in text
    conf = tmp_path / "exabgp.conf"
    conf.write_text(text)
    r = subprocess.run([sys.executable, "-m", "exabgp", "validate", str(conf)], capture_output=True, text=True,
                       timeout=60, env={"exabgp_log_destination": "stderr", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text(text.replace("hold-time 3;", "hold-time banana;"))
    r = subprocess.run([sys.executable, "-m", "exabgp", "validate", str(bad)], capture_output=True, text=True,
                       timeout=60, env={"exabgp_log_destination": "stderr", "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0      # the check above is a real one


def test_relay_path_with_a_space_is_refused():
    with pytest.raises(exabgp.NeighborError):
        exabgp.render_config([], ["/usr/bin/python3", "/a dir/relay.py", "/s"])


# ---------------------------------------------------------------- API messages
def update_line(announce=None, withdraw=None, attrs=None, peer="169.254.21.2", peer_as=65002):
    upd = {}
    if attrs is not None:
        upd["attribute"] = attrs
    if announce is not None:
        upd["announce"] = announce
    if withdraw is not None:
        upd["withdraw"] = withdraw
    return json.dumps({"exabgp": "5.0.0", "time": 1.0, "host": "h", "pid": 1, "ppid": 1, "counter": 3,
                       "type": "update", "neighbor": {"address": {"local": "169.254.21.1", "peer": peer},
                                                      "asn": {"local": 65001, "peer": peer_as},
                                                      "direction": "receive",
                                                      "message": {"update": upd}}})


ATTRS = {"origin": "egp", "as-path": {"0": {"element": "as-sequence", "value": [65002, 65010]},
                                      "1": {"element": "as-set", "value": [65020]}},
         "confederation-path": [], "med": 5, "local-preference": 300, "community": [[65002, 7], [65535, 65281]],
         "large-community": [[65002, 1, 2]]}


def test_update_becomes_routes():
    m = exabgp.parse_line(update_line({"ipv4 unicast": {"169.254.21.2": [{"nlri": "10.2.0.0/16"},
                                                                         {"nlri": "10.2.7.0/24"}]},
                                       "ipv6 unicast": {"fd00:21::2": [{"nlri": "2001:db8:2::/48"}]}},
                                      {"ipv4 unicast": [{"nlri": "10.9.0.0/16"}]}, ATTRS),
                          lambda peer: "to-b")
    assert m.kind == "update" and m.peer == IPAddress("169.254.21.2")
    r = m.announced[0]
    assert r == Route(prefix=IPNetwork("10.2.0.0/16"), next_hop=IPAddress("169.254.21.2"), neighbor="to-b",
                      as_path=(65002, 65010, 65020), origin=Origin.EGP, med=5, local_pref=None,
                      communities=((65002, 7), (65535, 65281)), large_communities=((65002, 1, 2),),
                      peer_as=65002, ebgp=True)
    assert [x.prefix for x in m.announced] == [IPNetwork("10.2.0.0/16"), IPNetwork("10.2.7.0/24"),
                                               IPNetwork("2001:db8:2::/48")]
    assert m.announced[2].next_hop == IPAddress("fd00:21::2")
    assert m.withdrawn == (IPNetwork("10.9.0.0/16"),)


def test_ibgp_keeps_local_pref_and_compact_nlri():
    m = exabgp.parse_line(update_line({"ipv4 unicast": {"169.254.22.2": ["10.3.0.0/16"]}}, attrs=ATTRS,
                                      peer="169.254.22.2", peer_as=65001))
    assert m.announced[0].local_pref == 300 and not m.announced[0].ebgp
    assert m.announced[0].prefix == IPNetwork("10.3.0.0/16")


def test_state_eor_notification_open_ack():
    base = {"address": {"local": "169.254.21.1", "peer": "169.254.21.2"}, "asn": {"local": 65001, "peer": 65002}}
    up = exabgp.parse_line(json.dumps({"type": "state", "neighbor": {**base, "state": "up"}}))
    assert (up.kind, up.state) == ("state", "up")
    down = exabgp.parse_line(json.dumps({"type": "state", "neighbor": {**base, "state": "down",
                                                                       "reason": "peer reset"}}))
    assert (down.state, down.reason) == ("down", "peer reset")
    eor = exabgp.parse_line(json.dumps({"type": "update", "neighbor": {
        **base, "direction": "receive", "message": {"eor": {"afi": "ipv6", "safi": "unicast"}}}}))
    assert (eor.kind, eor.family) == ("eor", "ipv6 unicast")
    n = exabgp.parse_line(json.dumps({"type": "notification", "neighbor": {
        **base, "direction": "receive", "notification": {"code": 6, "subcode": 2, "data": "", "message": "bye"}}}))
    assert n.kind == "notification" and n.notification == {"code": 6, "subcode": 2, "message": "bye"}
    o = exabgp.parse_line(json.dumps({"type": "open", "neighbor": {
        **base, "direction": "receive", "open": {"version": 4, "asn": 65002, "hold_time": 9,
                                                 "router_id": "10.0.0.2", "capabilities": {}}}}))
    assert o.router_id == IPAddress("10.0.0.2") and o.hold_time == 9
    assert exabgp.parse_line("done\n").ok and not exabgp.parse_line(b"error\n").ok
    assert exabgp.parse_line(json.dumps({"type": "notification", "notification": "shutdown"})).kind == "shutdown"


GOOD = update_line({"ipv4 unicast": {"169.254.21.2": [{"nlri": "10.2.0.0/16"}]}}, attrs=ATTRS)


@pytest.mark.parametrize("line", [
    GOOD[: len(GOOD) // 2],                                     # truncated
    GOOD[:-1],                                                  # one byte short
    "{",
    "[1, 2, 3]",
    '"a string"',
    "\x00\xff garbage",
    json.dumps({"type": "update"}),                             # no neighbor
    json.dumps({"type": "update", "neighbor": {"address": {"peer": "not an ip"}, "message": {}}}),
    json.dumps({"type": "update", "neighbor": []}),
    json.dumps({"type": "frobnicate", "neighbor": {"address": {"peer": "169.254.21.2"}}}),   # unknown type
    json.dumps({"type": "state", "neighbor": {"address": {"peer": "169.254.21.2"}, "state": "sideways"}}),
    update_line({"ipv4 unicast": {"169.254.21.2": [{"nlri": "10.2.0.0/33"}, {"nlri": 7}, None]}}),
    update_line({"ipv4 flow": {"x": [{"nlri": "10.0.0.0/8"}]}}),                 # family we do not carry
    update_line({"ipv4 unicast": "not a dict"}),
    update_line({"ipv4 unicast": {"169.254.21.2": [{"nlri": "10.2.0.0/16"}]}}, attrs={"as-path": "x",
                                                                                      "community": "y"}),
    b"\xc3\x28 invalid utf-8",
])
def test_bad_lines_never_raise(line):
    m = exabgp.parse_line(line, lambda peer: "to-b")
    assert m is None or m.kind in ("update", "state")
    if m is not None and m.kind == "update":
        assert all(r.prefix.prefixlen <= 32 for r in m.announced)


def test_huge_as_path_is_ignored_and_counted():
    before = exabgp.STATS.huge_as_paths
    path = {"0": {"element": "as-sequence", "value": list(range(1, 100_001))}}
    m = exabgp.parse_line(update_line({"ipv4 unicast": {"169.254.21.2": [{"nlri": "10.2.0.0/16"}]}},
                                      attrs={"origin": "igp", "as-path": path}))
    assert m.announced == () and m.withdrawn == (IPNetwork("10.2.0.0/16"),)      # treat-as-withdraw
    assert exabgp.STATS.huge_as_paths == before + 1
    ok = {"0": {"element": "as-sequence", "value": list(range(1, exabgp.MAX_AS_PATH + 1))}}
    m = exabgp.parse_line(update_line({"ipv4 unicast": {"169.254.21.2": [{"nlri": "10.2.0.0/16"}]}},
                                      attrs={"origin": "igp", "as-path": ok}))
    assert len(m.announced[0].as_path) == exabgp.MAX_AS_PATH


def test_commands():
    r = Route(prefix=IPNetwork("10.1.0.0/16"), next_hop=IPAddress("169.254.21.1"), neighbor="",
              as_path=(65001, 65001), med=10, communities=((65001, 100),), large_communities=((65001, 1, 2),))
    assert exabgp.announce_command(IPAddress("169.254.21.2"), r) == (
        "neighbor 169.254.21.2 announce route 10.1.0.0/16 next-hop 169.254.21.1 origin igp as-path [ 65001 65001 ] "
        "med 10 community [ 65001:100 ] large-community [ 65001:1:2 ]")
    assert exabgp.withdraw_command(IPAddress("169.254.21.2"), IPNetwork("10.1.0.0/16")) == \
        "neighbor 169.254.21.2 withdraw route 10.1.0.0/16"
