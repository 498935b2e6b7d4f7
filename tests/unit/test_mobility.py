"""appliance/mobility.py without a kernel: which rtnetlink messages count as an address change,
and the source address chosen towards a peer (never through one of our XFRM interfaces)."""

from __future__ import annotations

import ipaddress
import struct

from appliance.mobility import (IFA_F_SECONDARY, IFA_F_TENTATIVE, RTM_DELADDR, RTM_DELLINK, RTM_NEWADDR,
                                RTM_NEWLINK, RTM_NEWROUTE,
                                Address, Route, choose_source, relevant)

ETH0, ETH1, XFRM = 2, 3, 9


def _route(dst, oif, prefsrc=None, gateway=None, priority=0):
    return Route(ipaddress.ip_network(dst), oif, prefsrc, gateway, priority)


def _nlmsg(kind: int, body: bytes) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, 0, 0, 0) + body + b"\0" * (-length % 4)


def _rtmsg(protocol: int) -> bytes:
    # family dst_len src_len tos table protocol scope type flags
    return struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 254, protocol, 0, 1, 0)


def test_address_messages_and_foreign_routes_are_relevant_our_own_routes_are_not():
    assert relevant(_nlmsg(RTM_NEWADDR, b"\0" * 8))
    assert relevant(_nlmsg(RTM_DELADDR, b"\0" * 8))
    assert relevant(_nlmsg(RTM_NEWROUTE, _rtmsg(4)))            # static, by the operator
    assert not relevant(_nlmsg(RTM_NEWROUTE, _rtmsg(74)))       # our BGP routes
    assert not relevant(_nlmsg(RTM_NEWROUTE, _rtmsg(73)) + _nlmsg(RTM_NEWROUTE, _rtmsg(74)))
    assert relevant(_nlmsg(RTM_NEWROUTE, _rtmsg(74)) + _nlmsg(RTM_DELADDR, b"\0" * 8))
    assert not relevant(b"\x01\x02")                            # truncated: nothing to act on


def _nla(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _ifinfomsg(index: int, kind: bytes | None) -> bytes:
    body = struct.pack("=BBHiII", 0, 0, 1, index, 0, 0)
    if kind is not None:
        body += _nla(18 | 0x8000, _nla(1, kind + b"\0"))          # IFLA_LINKINFO { IFLA_INFO_KIND }
    return body


def _ifaddrmsg(index: int) -> bytes:
    return struct.pack("=BBBBI", 2, 30, 0, 0, index)


def _route_via(protocol: int, oif: int) -> bytes:
    return _rtmsg(protocol) + _nla(4, struct.pack("=I", oif))     # RTA_OIF


def test_changes_on_xfrm_interfaces_are_not_relevant_and_the_set_follows_the_links():
    xfrm = {XFRM}
    # a Child SA's install: the interface goes up, gets its /30 and its connected route
    assert not relevant(_nlmsg(RTM_NEWLINK, _ifinfomsg(XFRM, b"xfrm")), xfrm)
    assert not relevant(_nlmsg(RTM_NEWADDR, _ifaddrmsg(XFRM)) + _nlmsg(RTM_NEWROUTE, _route_via(2, XFRM)), xfrm)
    # the same on an underlay interface is
    assert relevant(_nlmsg(RTM_NEWADDR, _ifaddrmsg(ETH0)), xfrm)
    assert relevant(_nlmsg(RTM_NEWROUTE, _route_via(2, ETH0)), xfrm)
    assert relevant(_nlmsg(RTM_NEWLINK, _ifinfomsg(ETH0, b"veth")), xfrm)
    # a new XFRM interface joins the set, its addresses then count for nothing; gone, it leaves
    assert not relevant(_nlmsg(RTM_NEWLINK, _ifinfomsg(12, b"xfrm")) + _nlmsg(RTM_NEWADDR, _ifaddrmsg(12)), xfrm)
    assert xfrm == {XFRM, 12}
    assert not relevant(_nlmsg(RTM_DELLINK, _ifinfomsg(12, b"xfrm")), xfrm)
    assert xfrm == {XFRM}
    assert relevant(_nlmsg(RTM_NEWADDR, _ifaddrmsg(12)), xfrm)
    # one relevant message in a batch of irrelevant ones is enough, and the batch is read whole
    assert relevant(_nlmsg(RTM_NEWADDR, _ifaddrmsg(ETH0)) + _nlmsg(RTM_NEWLINK, _ifinfomsg(13, b"xfrm")), xfrm)
    assert 13 in xfrm


def test_the_connected_subnet_gives_its_address():
    addrs = [Address(ETH0, "192.0.2.11", 24)]
    routes = [_route("192.0.2.0/24", ETH0)]
    assert choose_source("192.0.2.2", routes, addrs, set()) == "192.0.2.11"


def test_the_default_route_picks_the_address_on_the_gateways_subnet_or_prefsrc():
    addrs = [Address(ETH0, "10.9.0.5", 24), Address(ETH0, "198.51.100.7", 24)]
    routes = [_route("0.0.0.0/0", ETH0, gateway="198.51.100.1"), _route("198.51.100.0/24", ETH0),
              _route("10.9.0.0/24", ETH0)]
    assert choose_source("203.0.113.9", routes, addrs, set()) == "198.51.100.7"
    routes[0] = _route("0.0.0.0/0", ETH0, prefsrc="10.9.0.5", gateway="198.51.100.1")
    assert choose_source("203.0.113.9", routes, addrs, set()) == "10.9.0.5"


def test_a_route_through_our_own_xfrm_interface_is_never_chosen():
    # BGP learnt the peer's underlay /32 over the tunnel itself: following it would recurse
    addrs = [Address(ETH0, "192.0.2.11", 24), Address(XFRM, "169.254.21.1", 30)]
    routes = [_route("203.0.113.9/32", XFRM), _route("0.0.0.0/0", ETH0, gateway="192.0.2.254")]
    assert choose_source("203.0.113.9", routes, addrs, {XFRM}) == "192.0.2.11"
    assert choose_source("203.0.113.9", routes[:1], addrs, {XFRM}) is None


def test_longest_prefix_then_metric_and_only_usable_primary_addresses():
    addrs = [Address(ETH0, "192.0.2.11", 24), Address(ETH1, "198.51.100.7", 24),
             Address(ETH1, "198.51.100.8", 24, flags=IFA_F_SECONDARY),
             Address(ETH1, "198.51.100.9", 24, flags=IFA_F_TENTATIVE)]
    routes = [_route("0.0.0.0/0", ETH0, gateway="192.0.2.254", priority=100),
              _route("0.0.0.0/0", ETH1, gateway="198.51.100.1", priority=50),
              _route("192.0.2.0/24", ETH0), _route("198.51.100.0/24", ETH1)]
    assert choose_source("203.0.113.9", routes, addrs, set()) == "198.51.100.7"
    routes.append(_route("203.0.113.0/24", ETH0, gateway="192.0.2.254"))
    assert choose_source("203.0.113.9", routes, addrs, set()) == "192.0.2.11"
    # no address left on the interface of the best route: the next route that has one
    assert choose_source("203.0.113.9", routes, addrs[1:], set()) == "198.51.100.7"


def test_families_do_not_mix():
    addrs = [Address(ETH0, "192.0.2.11", 24), Address(ETH0, "2001:db8::11", 64)]
    routes = [_route("0.0.0.0/0", ETH0, gateway="192.0.2.254"), _route("::/0", ETH0, gateway="2001:db8::1")]
    assert choose_source("2001:db8:5::9", routes, addrs, set()) == "2001:db8::11"
    assert choose_source("203.0.113.9", routes, addrs, set()) == "192.0.2.11"
