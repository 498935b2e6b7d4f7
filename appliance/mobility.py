"""Our underlay address for MOBIKE tunnels (RFC 4555): learnt from netlink, chosen by route lookup.

`AddressWatch` listens on an rtnetlink socket (address, route and link groups, IPv4 and IPv6)
and calls back, debounced, when something that can change our source address happened; routes
of our own protocols (73 static, 74 BGP) are not such a thing. `SourceSelector.source_for(remote)`
then picks the address the tunnel should use: the kernel's own route lookup (`ip route get`)
and its preferred source, unless that route leaves through one of our XFRM interfaces (a route
to the peer's underlay address learnt over the tunnel itself would recurse: never chosen); then
the longest-prefix match of the main table without those interfaces (`choose_source`, pure).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

log = logging.getLogger("isthmus.daemon")

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE

RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE = 16, 17, 20, 21, 24, 25
#: route protocols of our own (static_routes.py 73, bgp/fib.py 74): they never move the underlay
OUR_ROUTE_PROTOCOLS = frozenset({73, 74})
IFA_F_SECONDARY, IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x01, 0x08, 0x40
RT_SCOPE_UNIVERSE = 0
MAIN_TABLE = 254
DEBOUNCE = 0.1   # seconds: a renumbering is several messages in a row (address, routes)


def relevant(data: bytes) -> bool:
    """Does this batch of rtnetlink messages hold something that can change our source address?
    Routes of our own protocols do not."""
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if kind in (RTM_NEWADDR, RTM_DELADDR, RTM_NEWLINK, RTM_DELLINK):
            return True
        if kind in (RTM_NEWROUTE, RTM_DELROUTE) and off + 16 + 6 <= len(data):
            protocol = data[off + 16 + 5]        # struct rtmsg: family dst_len src_len tos table protocol
            if protocol not in OUR_ROUTE_PROTOCOLS:
                return True
        off += (length + 3) & ~3
    return False


@dataclass(frozen=True)
class Route:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    oif: int
    prefsrc: str | None = None
    gateway: str | None = None
    priority: int = 0


@dataclass(frozen=True)
class Address:
    ifindex: int
    address: str
    prefixlen: int
    flags: int = 0
    scope: int = RT_SCOPE_UNIVERSE

    @property
    def usable(self) -> bool:
        return self.scope == RT_SCOPE_UNIVERSE and not self.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)

    @property
    def network(self):
        return ipaddress.ip_interface(f"{self.address}/{self.prefixlen}").network


def choose_source(remote: str, routes: Iterable[Route], addresses: Iterable[Address],
                  avoid: set[int]) -> str | None:
    """Our source address towards `remote`: the longest-prefix (then lowest metric) route of
    the family whose interface is not in `avoid` (our XFRM interfaces) and has a usable
    address; its preferred source if that is ours, else the interface's primary address on the
    gateway's (or the remote's) subnet, else its first primary address."""
    ip = ipaddress.ip_address(remote)
    addrs = [a for a in addresses if a.usable and a.ifindex not in avoid
             and ipaddress.ip_address(a.address).version == ip.version]
    on = {a.ifindex for a in addrs}
    cands = [r for r in routes if r.dst.version == ip.version and ip in r.dst and r.oif not in avoid and r.oif in on]
    if not cands:
        return None
    best = max(cands, key=lambda r: (r.dst.prefixlen, -r.priority))
    if best.prefsrc is not None and any(a.address == best.prefsrc for a in addrs):
        return best.prefsrc
    mine = sorted((a for a in addrs if a.ifindex == best.oif), key=lambda a: bool(a.flags & IFA_F_SECONDARY))
    hop = ipaddress.ip_address(best.gateway) if best.gateway else ip
    for a in mine:
        if hop in a.network:
            return a.address
    return mine[0].address if mine else None


class SourceSelector:
    """Route lookups in the daemon's network namespace. pyroute2's IPRoute belongs to one
    thread and cannot run inside an asyncio loop's thread: it lives in a thread of its own, and
    each public call waits for it there (a lookup is a few netlink round trips)."""

    def __init__(self) -> None:
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="isthmus-routes")
        self._ipr = None
        self._call(self._open)

    def _open(self) -> None:
        from pyroute2 import IPRoute

        self._ipr = IPRoute()

    def _call(self, fn, *args):
        return self._pool.submit(fn, *args).result(timeout=10)

    def close(self) -> None:
        def shut() -> None:
            if self._ipr is not None:
                self._ipr.close()
        try:
            self._call(shut)
        finally:
            self._pool.shutdown(wait=False)

    def source_for(self, remote: str) -> str | None:
        """Where our packets to `remote` should come from now (None: no usable route)."""
        return self._call(self._source_for, remote)

    def has_address(self, address: str) -> bool:
        return self._call(lambda: any(a.address == address and a.usable for a in self.addresses()))

    def xfrm_interfaces(self) -> set[int]:
        out = set()
        for link in self._ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            if info is not None and info.get_attr("IFLA_INFO_KIND") == "xfrm":
                out.add(link["index"])
        return out

    def addresses(self) -> list[Address]:
        out = []
        for m in self._ipr.get_addr():
            addr = m.get_attr("IFA_ADDRESS") if m["family"] == socket.AF_INET6 else (
                m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))
            if addr is None:
                continue
            flags = m.get_attr("IFA_FLAGS")
            out.append(Address(m["index"], addr, m["prefixlen"], flags if flags is not None else m["flags"],
                               m["scope"]))
        return out

    def routes(self, family: int) -> list[Route]:
        out = []
        for m in self._ipr.get_routes(family=family, table=MAIN_TABLE):
            if m["type"] != 1:   # RTN_UNICAST
                continue
            oif = m.get_attr("RTA_OIF")
            if oif is None:
                continue
            dst = m.get_attr("RTA_DST")
            zero = "0.0.0.0" if family == socket.AF_INET else "::"
            net = ipaddress.ip_network(f"{dst or zero}/{m['dst_len']}", strict=False)
            out.append(Route(net, oif, m.get_attr("RTA_PREFSRC"), m.get_attr("RTA_GATEWAY"),
                             m.get_attr("RTA_PRIORITY") or 0))
        return out

    def _source_for(self, remote: str) -> str | None:
        avoid = self.xfrm_interfaces()
        addresses = self.addresses()
        try:
            (r,) = self._ipr.route("get", dst=remote)
        except Exception:  # noqa: BLE001 - unreachable: no route at all (or several answers)
            r = None
        if r is not None:
            oif, src = r.get_attr("RTA_OIF"), r.get_attr("RTA_PREFSRC")
            if oif not in avoid and src is not None and any(a.address == src and a.usable for a in addresses):
                return src
        family = socket.AF_INET6 if ipaddress.ip_address(remote).version == 6 else socket.AF_INET
        return choose_source(remote, self.routes(family), addresses, avoid)


class AddressWatch:
    """Calls `on_change()` on the event loop DEBOUNCE s after the last relevant rtnetlink message."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None],
                 debounce: float = DEBOUNCE) -> None:
        self._loop = loop
        self._on_change = on_change
        self._debounce = debounce
        self._handle: asyncio.TimerHandle | None = None
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   socket.NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, GROUPS))
        loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        hit = False
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:   # ENOBUFS: messages were lost; look again to be sure
                log.debug("rtnetlink: %s", e)
                hit = True
                break
            if not data:
                break
            hit = hit or relevant(data)
        if hit:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_later(self._debounce, self._fire)

    def _fire(self) -> None:
        self._handle = None
        try:
            self._on_change()
        except Exception:  # noqa: BLE001 - a failed look-up must not stop the watch
            log.exception("acting on an address change failed")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
