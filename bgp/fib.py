"""The BGP winners in the kernel FIB (pyroute2 rtnetlink), and only ours.

* Our routes carry routing protocol number :data:`RTPROT_ISTHMUS_BGP` (74; ``proto 74`` in
  ``ip route``): the static routes of ``tunnels.X.routes`` use 73 (appliance/static_routes.py),
  and iproute2's ``rt_protos`` names none of them (FRR's bgp is 186, BIRD 12, zebra 11, babel
  42, ...). Every dump, delete and reconcile looks at protocol 74 only: a route someone else
  made is never touched.
* They sit in the main table at metric :data:`BGP_METRIC` (2000). A static route of the same
  prefix has metric 0 (IPv4) or 1024 (IPv6, the kernel's default): the kernel prefers the lower
  metric, so **static routes win over BGP by default**; the BGP route stays installed behind
  it and takes over when the static one goes (its tunnel down).
* Next hop: the neighbor's address on the tunnel's interface; several equal best paths are one
  multipath route (``nexthop via A dev xfrm-a nexthop via B dev xfrm-b``).
* A change is one ``RTM_NEWROUTE`` with ``NLM_F_REPLACE``: the prefix is never absent between
  the old and the new next hops. A withdraw is one ``RTM_DELROUTE`` (protocol and metric given,
  so only ours matches).
* :meth:`Fib.reconcile` dumps our routes, compares with the wanted set and fixes the
  difference (replace what differs, delete what is not wanted): at start and after an ExaBGP
  restart, nothing is flushed first.

One Fib belongs to one thread (pyroute2's IPRoute); the route manager uses it from its loop.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from netaddr import IPAddress, IPNetwork
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("isthmus.bgp.fib")

RTPROT_ISTHMUS_BGP = 74
BGP_METRIC = 2000
RT_TABLE_MAIN = 254

NextHop = tuple[int, IPAddress]          # (ifindex, gateway)


@dataclass
class ReconcileReport:
    kept: int = 0
    replaced: int = 0
    removed: int = 0
    errors: list[str] | None = None


def _family(p: IPNetwork) -> int:
    return socket.AF_INET6 if p.version == 6 else socket.AF_INET


def _strerror(e: NetlinkError) -> str:
    return f"{os.strerror(e.code)} ({errno.errorcode.get(e.code, e.code)})"


class Fib:
    def __init__(self, netns: str | None = None, *, table: int = RT_TABLE_MAIN, metric: int = BGP_METRIC,
                 proto: int = RTPROT_ISTHMUS_BGP) -> None:
        self.netns, self.table, self.metric, self.proto = netns, table, metric, proto
        self._ipr: IPRoute | None = None
        self.installed: dict[IPNetwork, frozenset[NextHop]] = {}     # what we believe the kernel holds
        self.writes = 0

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def ifindex(self, ifname: str) -> int | None:
        idx = self.ipr.link_lookup(ifname=ifname)
        return idx[0] if idx else None

    # ------------------------------------------------------------------ reading
    def dump(self) -> dict[IPNetwork, frozenset[NextHop]]:
        """Our routes in the kernel: prefix -> next hops."""
        out: dict[IPNetwork, frozenset[NextHop]] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in self.ipr.route("dump", family=family):
                if r["proto"] != self.proto or (r.get("table") or r["table"]) != self.table:
                    continue
                if (r.get("priority") or 0) != self.metric:
                    continue
                dst = r.get("dst") or ("0.0.0.0" if family == socket.AF_INET else "::")
                prefix = IPNetwork(f"{dst}/{r['dst_len']}")
                mp = r.get("multipath")
                if mp:
                    hops = frozenset((nh["oif"], IPAddress(nh.get("gateway"))) for nh in mp if nh.get("gateway"))
                elif r.get("gateway"):
                    hops = frozenset({(r.get("oif") or 0, IPAddress(r.get("gateway")))})
                else:
                    hops = frozenset()
                out[prefix] = out.get(prefix, frozenset()) | hops
        return out

    # ------------------------------------------------------------------ writing
    def _kw(self, prefix: IPNetwork) -> dict:
        return {"dst": str(prefix.cidr), "family": _family(prefix), "proto": self.proto, "priority": self.metric,
                "table": self.table}

    def set(self, prefix: IPNetwork, next_hops: Iterable[NextHop]) -> str | None:
        """Install or replace `prefix` with exactly `next_hops`; None, or the kernel's refusal."""
        hops = frozenset(next_hops)
        if not hops:
            return self.remove(prefix)
        if self.installed.get(prefix) == hops:
            return None
        kw = self._kw(prefix)
        ordered = sorted(hops, key=lambda h: (h[0], int(h[1])))
        if len(ordered) == 1:
            kw.update(oif=ordered[0][0], gateway=str(ordered[0][1]))
        else:
            kw["multipath"] = [{"oif": i, "gateway": str(g)} for i, g in ordered]
        try:
            self.ipr.route("replace", **kw)
        except NetlinkError as e:
            self.installed.pop(prefix, None)
            return f"{prefix}: the kernel refused the route: {_strerror(e)}"
        self.writes += 1
        self.installed[prefix] = hops
        return None

    def remove(self, prefix: IPNetwork) -> str | None:
        self.installed.pop(prefix, None)
        try:
            self.ipr.route("del", **self._kw(prefix))
            self.writes += 1
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                return f"{prefix}: the kernel refused to remove the route: {_strerror(e)}"
        return None

    def reconcile(self, wanted: Mapping[IPNetwork, Iterable[NextHop]]) -> ReconcileReport:
        """Make our routes in the kernel exactly `wanted` (read back first; no flush)."""
        report = ReconcileReport(errors=[])
        have = self.dump()
        self.installed = dict(have)
        want = {p: frozenset(h) for p, h in wanted.items() if h}
        for p, hops in want.items():
            if have.get(p) == hops:
                report.kept += 1
                continue
            err = self.set(p, hops)
            if err:
                report.errors.append(err)
            else:
                report.replaced += 1
        for p in have:
            if p not in want:
                err = self.remove(p)
                if err:
                    report.errors.append(err)
                else:
                    report.removed += 1
        return report

    def flush(self) -> int:
        """Remove every route of ours (shutdown)."""
        n = 0
        for p in self.dump():
            if self.remove(p) is None:
                n += 1
        self.installed.clear()
        return n
