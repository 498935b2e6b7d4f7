"""Static routes over a tunnel (config ``tunnels.X.routes``): in the kernel while the tunnel's
Child SA is up, gone the moment it goes down.

The routes are ours by their routing protocol number (``proto 73`` in ``ip route``), so a
restarted daemon finds and removes what an earlier run left (:meth:`StaticRoutes.flush_ours`)
and never touches a route someone else made: adding a prefix that already has a route in the
main table is refused, not replaced.

Static routes and BGP routes for the same prefix coexist, the kernel choosing by metric: the BGP
routes (bgp/fib.py) sit at metric 2000. With ``bgp.prefer_static: true`` (the default) static
routes get the kernel's default metric (0 for IPv4, 1024 for IPv6) and win; with ``false`` they
are installed at :data:`STATIC_METRIC_BEHIND_BGP` (3000), behind BGP's best path, and carry the
traffic only while BGP has no route for the prefix (:func:`static_metric`). A reload that flips
the setting moves the installed routes (:meth:`StaticRoutes.set_metric`): the new one is added
before the old one goes, so the prefix is never without a route.

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

#: Metric of static routes with ``bgp.prefer_static: false``: above BGP's (bgp/fib.py, 2000).
STATIC_METRIC_BEHIND_BGP = 3000
#: The kernel's metric for a route added without one (IPv4, IPv6).
KERNEL_DEFAULT_METRIC = {4: 0, 6: 1024}


def static_metric(prefer_static: bool) -> int | None:
    """The metric static routes are installed at (None: the kernel's default, ahead of BGP)."""
    return None if prefer_static else STATIC_METRIC_BEHIND_BGP


@dataclass(frozen=True)
class RouteProblem:
    prefix: IPNetwork
    message: str

    def __str__(self) -> str:
        return f"{self.prefix}: {self.message}"


class StaticRoutes:
    """Our routes in the network namespace the process runs in."""

    def __init__(self, netns: str | None = None, metric: int | None = None) -> None:
        self.netns = netns
        self.metric = metric             # static_metric(bgp.prefer_static)
        self._ipr: IPRoute | None = None

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
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
        return self._add(ifindex, prefixes, self.metric)

    def _add(self, ifindex: int, prefixes: Iterable[IPNetwork], metric: int | None) -> list[RouteProblem]:
        problems = []
        for p in prefixes:
            kw = {"dst": str(p), "oif": ifindex, "proto": RTPROT_ISTHMUS, "family": _family(p)}
            if p.version == 4:
                kw["scope"] = RT_SCOPE_LINK
            if metric is not None:
                kw["priority"] = metric
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

    def set_metric(self, metric: int | None, installed: Iterable[tuple[int, Iterable[IPNetwork]]]) -> list[RouteProblem]:
        """From now on install at `metric`; the routes in `installed` ((ifindex, prefixes) that
        are in the kernel now) move to it: added at the new metric, then removed at the old one
        (the prefix always has a route; for IPv4 a delete at metric 0 takes the lowest of ours,
        which is the old one then)."""
        old, self.metric = self.metric, metric
        problems: list[RouteProblem] = []
        if old == metric:
            return problems
        for ifindex, prefixes in installed:
            prefixes = list(prefixes)
            added = self._add(ifindex, prefixes, metric)
            problems += added
            failed = {x.prefix for x in added}
            for p in prefixes:
                if p in failed:
                    continue        # the old route stays: better one at the old metric than none
                try:
                    self._del(p, ifindex, KERNEL_DEFAULT_METRIC[p.version] if old is None else old)
                except NetlinkError as e:
                    if e.code not in (errno.ESRCH, errno.ENOENT):
                        problems.append(RouteProblem(p, f"the kernel refused to remove the route at the old "
                                                        f"metric: {_strerror(e)}"))
        return problems

    def _del(self, prefix: IPNetwork, oif: int, metric: int | None = None) -> None:
        kw = {"dst": str(prefix), "proto": RTPROT_ISTHMUS, "family": _family(prefix)}
        if oif:
            kw["oif"] = oif
        if metric is not None:
            kw["priority"] = metric
            if prefix.version == 4:
                kw["scope"] = RT_SCOPE_LINK     # with a metric, the kernel matches the scope too
        self.ipr.route("del", **kw)


def _family(p: IPNetwork) -> int:
    return socket.AF_INET6 if p.version == 6 else socket.AF_INET


def _strerror(e: NetlinkError) -> str:
    import os
    return f"{os.strerror(e.code)} ({errno.errorcode.get(e.code, e.code)})"
