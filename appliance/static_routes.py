"""Static routes over a tunnel (config ``tunnels.X.routes``): in the kernel while the tunnel's
Child SA is up, gone the moment it goes down.

The routes are ours by their routing protocol number (``proto 73`` in ``ip route``), so a
restarted daemon finds and removes what an earlier run left (:meth:`StaticRoutes.flush_ours`)
and never touches a route someone else made: adding a prefix that already has a route in the
main table is refused, not replaced.

Like the data plane, a StaticRoutes belongs to one thread (pyroute2's IPRoute keeps per-thread
state): the daemon uses it from its data plane thread.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("isthmus.routes")

#: rtm_protocol of our routes (include/uapi/linux/rtnetlink.h leaves values above RTPROT_STATIC
#: to routing daemons; 73 is not taken by any listed in iproute2's rt_protos).
RTPROT_ISTHMUS = 73
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class RouteProblem:
    prefix: IPNetwork
    message: str

    def __str__(self) -> str:
        return f"{self.prefix}: {self.message}"


class StaticRoutes:
    """Our routes in the network namespace the process runs in."""

    def __init__(self) -> None:
        self._ipr: IPRoute | None = None

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def ours(self) -> list[tuple[IPNetwork, int]]:
        """(prefix, ifindex) of every route with our protocol number in the main table."""
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in self.ipr.route("dump", family=family):
                if r["proto"] != RTPROT_ISTHMUS or r.get("table") not in (None, RT_TABLE_MAIN):
                    continue
                dst = r.get("dst") or ("0.0.0.0" if family == socket.AF_INET else "::")
                out.append((ipaddress.ip_network(f"{dst}/{r['dst_len']}"), r.get("oif") or 0))
        return out

    def flush_ours(self) -> int:
        """Remove every route of ours (start-up: whatever an earlier run left)."""
        n = 0
        for prefix, oif in self.ours():
            try:
                self._del(prefix, oif)
                n += 1
            except NetlinkError as e:
                if e.code not in (errno.ESRCH, errno.ENOENT):
                    raise
        return n

    def install(self, ifindex: int, prefixes: Iterable[IPNetwork]) -> list[RouteProblem]:
        """Route `prefixes` into interface `ifindex`; returns the prefixes that could not be added."""
        problems = []
        for p in prefixes:
            kw = {"dst": str(p), "oif": ifindex, "proto": RTPROT_ISTHMUS, "family": _family(p)}
            if p.version == 4:
                kw["scope"] = RT_SCOPE_LINK
            try:
                self.ipr.route("add", **kw)
            except NetlinkError as e:
                if e.code == errno.EEXIST:
                    if (p, ifindex) in self.ours():
                        continue
                    problems.append(RouteProblem(p, "a route for this prefix exists already and is not "
                                                    "Isthmus's; it was left alone (remove it, or the prefix "
                                                    "from tunnels.X.routes)"))
                else:
                    problems.append(RouteProblem(p, f"the kernel refused the route: {_strerror(e)}"))
        return problems

    def withdraw(self, ifindex: int, prefixes: Iterable[IPNetwork]) -> list[RouteProblem]:
        """Remove our routes for `prefixes` on `ifindex` (missing ones are fine)."""
        problems = []
        for p in prefixes:
            try:
                self._del(p, ifindex)
            except NetlinkError as e:
                if e.code not in (errno.ESRCH, errno.ENOENT):
                    problems.append(RouteProblem(p, f"the kernel refused to remove the route: {_strerror(e)}"))
        return problems

    def _del(self, prefix: IPNetwork, oif: int) -> None:
        kw = {"dst": str(prefix), "proto": RTPROT_ISTHMUS, "family": _family(prefix)}
        if oif:
            kw["oif"] = oif
        self.ipr.route("del", **kw)


def _family(p: IPNetwork) -> int:
    return socket.AF_INET6 if p.version == 6 else socket.AF_INET


def _strerror(e: NetlinkError) -> str:
    import os
    return f"{os.strerror(e.code)} ({errno.errorcode.get(e.code, e.code)})"
