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
import os
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


IFLA_LINKINFO, IFLA_INFO_KIND, RTA_OIF = 18, 1, 4


def _attrs(data: bytes, off: int, end: int):
    """(type, payload start, payload end) of the netlink attributes in data[off:end]."""
    while off + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4 or off + alen > end:
            return
        yield atype & 0x3FFF, off + 4, off + alen
        off += (alen + 3) & ~3


def _link_kind(data: bytes, off: int, end: int) -> bytes | None:
    for atype, a, b in _attrs(data, off + 16 + 16, end):        # after struct ifinfomsg
        if atype == IFLA_LINKINFO:
            for itype, c, d in _attrs(data, a, b):
                if itype == IFLA_INFO_KIND:
                    return data[c:d].rstrip(b"\0")
    return None


def relevant(data: bytes, xfrm: set[int] | None = None) -> bool:
    """Does this batch of rtnetlink messages hold something that can change our source address?
    Routes of our own protocols do not, nor anything on an XFRM interface: the source is never
    chosen through one (SourceSelector), and each Child SA's install changes its interface's
    state, addresses and connected routes (issue 13: at 200 tunnels every install made every
    mobike tunnel look its source up again). `xfrm`, the ifindexes of the XFRM interfaces, is
    kept up to date from the link messages seen here."""
    xfrm = set() if xfrm is None else xfrm
    hit = False
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        end = min(off + length, len(data))
        if kind in (RTM_NEWLINK, RTM_DELLINK) and off + 32 <= end:
            index = struct.unpack_from("=i", data, off + 16 + 4)[0]
            if index in xfrm or _link_kind(data, off, end) == b"xfrm":
                if kind == RTM_NEWLINK:
                    xfrm.add(index)
                else:
                    xfrm.discard(index)
            else:
                hit = True
        elif kind in (RTM_NEWLINK, RTM_DELLINK):
            hit = True
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            # struct ifaddrmsg: family prefixlen flags scope index(u32)
            if off + 24 > end or struct.unpack_from("=I", data, off + 16 + 4)[0] not in xfrm:
                hit = True
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and off + 16 + 6 <= end:
            protocol = data[off + 16 + 5]        # struct rtmsg: family dst_len src_len tos table protocol
            if protocol not in OUR_ROUTE_PROTOCOLS:
                oif = next((struct.unpack_from("=I", data, a)[0] for t, a, b in _attrs(data, off + 16 + 12, end)
                            if t == RTA_OIF and b - a >= 4), None)
                if oif is None or oif not in xfrm:
                    hit = True
        off += (length + 3) & ~3
    return hit


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


def xfrm_ifindexes() -> set[int]:
    """ifindexes of every XFRM interface of our network namespace: one RTM_GETLINK dump on a
    socket of its own, only the index and IFLA_INFO_KIND read."""
    out: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(10.0)
        sock.bind((0, 0))
        skip_stats = struct.pack("=HHI", 8, 29, 1 << 3)          # IFLA_EXT_MASK: RTEXT_FILTER_SKIP_STATS
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0) + skip_stats
        RTM_GETLINK, NLM_F_REQUEST, NLM_F_DUMP, NLMSG_DONE, NLMSG_ERROR = 18, 1, 0x300, 3, 2
        sock.send(struct.pack("=IHHII", 16 + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        while True:
            data = sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    return out
                end = min(off + length, len(data))
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, off + 16)
                    raise OSError(-code, f"listing interfaces: {os.strerror(-code)}")
                if kind == RTM_NEWLINK and off + 32 <= end and _link_kind(data, off, end) == b"xfrm":
                    out.add(struct.unpack_from("=i", data, off + 16 + 4)[0])
                off += (length + 3) & ~3


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

    def xfrm_ifindexes(self) -> set[int]:
        """The XFRM interfaces' ifindexes, from one link dump read here (no pyroute2 decoding:
        at start-up a 1,000-tunnel appliance has 1,000 of them)."""
        return xfrm_ifindexes()

    def lookup(self, remotes: Iterable[str]) -> tuple[set[str], dict[str, str | None]]:
        """One look at the kernel for many tunnels: our usable addresses, and the source towards
        each distinct remote (one link and one address dump, one route lookup per remote)."""
        return self._call(self._lookup, list(dict.fromkeys(remotes)))

    def _lookup(self, remotes: list[str]) -> tuple[set[str], dict[str, str | None]]:
        avoid = xfrm_ifindexes()
        addresses = self.addresses()
        routes: dict[int, list[Route]] = {}
        sources = {r: self._source(r, avoid, addresses, routes) for r in remotes}
        return {a.address for a in addresses if a.usable}, sources

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
        return self._source(remote, self.xfrm_interfaces(), self.addresses(), {})

    def _source(self, remote: str, avoid: set[int], addresses: list[Address],
                routes: dict[int, list[Route]]) -> str | None:
        try:
            (r,) = self._ipr.route("get", dst=remote)
        except Exception:  # noqa: BLE001 - unreachable: no route at all (or several answers)
            r = None
        if r is not None:
            oif, src = r.get_attr("RTA_OIF"), r.get_attr("RTA_PREFSRC")
            if oif not in avoid and src is not None and any(
                    a.address == src and a.usable and a.ifindex not in avoid for a in addresses):
                return src
        family = socket.AF_INET6 if ipaddress.ip_address(remote).version == 6 else socket.AF_INET
        if family not in routes:
            routes[family] = self.routes(family)
        return choose_source(remote, routes[family], addresses, avoid)


class AddressWatch:
    """Calls `on_change()` on the event loop DEBOUNCE s after the last relevant rtnetlink message."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None],
                 debounce: float = DEBOUNCE, xfrm_interfaces: Callable[[], set[int]] | None = None) -> None:
        self._loop = loop
        # the XFRM interfaces' ifindexes (their changes are not ours to follow): read once here
        # and again when messages were lost, followed from the link messages meanwhile
        self._xfrm_interfaces = xfrm_interfaces
        self.xfrm: set[int] = set()
        self._on_change = on_change
        self._debounce = debounce
        self._handle: asyncio.TimerHandle | None = None
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   socket.NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, GROUPS))
        if xfrm_interfaces is not None:    # after the bind: no link message falls in between
            self.xfrm = set(xfrm_interfaces())
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
                if self._xfrm_interfaces is not None:
                    try:
                        self.xfrm = set(self._xfrm_interfaces())
                    except Exception as e2:  # noqa: BLE001 - then every change counts
                        log.debug("reading the XFRM interfaces: %s", e2)
                        self.xfrm = set()
                break
            if not data:
                break
            hit = relevant(data, self.xfrm) or hit
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
