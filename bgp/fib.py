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
import struct
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
        self._batch: RtBatch | None = None
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
        if self._batch is not None:
            self._batch.close()
            self._batch = None

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

    def apply(self, sets: list[tuple[IPNetwork, Iterable[NextHop]]], removes: list[IPNetwork]) -> list[str]:
        """Many changes at once (RtBatch): removals, then installs/replacements (unchanged ones
        skipped); returns the kernel's refusals."""
        if self._batch is None:
            self._batch = RtBatch(self.netns)
        kw = dict(table=self.table, proto=self.proto, metric=self.metric)
        msgs: list[tuple[bytes, object]] = []
        for p in removes:
            self.installed.pop(p, None)
            msgs.append((self._batch.message(RTM_DELROUTE, p, [], **kw), ("del", p)))
        installed = self.installed
        wanted: list[tuple[IPNetwork, frozenset[NextHop]]] = []
        message = self._batch.message
        for p, hops in sets:
            hops = frozenset(hops)
            if not hops:
                installed.pop(p, None)
                msgs.append((message(RTM_DELROUTE, p, [], **kw), ("del", p)))
            elif installed.get(p) != hops:
                wanted.append((p, hops))
                ordered = list(hops) if len(hops) == 1 else sorted(hops, key=lambda h: (h[0], int(h[1])))
                msgs.append((message(RTM_NEWROUTE, p, ordered, **kw), ("set", p)))
        if not msgs:
            return []
        errors = self._batch.run(msgs)
        self.writes += len(msgs)
        refused = {p for what, p in errors if what == "set"} if errors else ()
        for p, hops in wanted:
            if refused and p in refused:
                installed.pop(p, None)
            else:
                installed[p] = hops
        out = []
        for (what, p), code in errors.items():
            if what == "del" and code in (errno.ESRCH, errno.ENOENT):
                continue
            verb = "the kernel refused the route" if what == "set" else "the kernel refused to remove the route"
            out.append(f"{p}: {verb}: {os.strerror(code)} ({errno.errorcode.get(code, code)})")
        return out

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
        sets = [(p, h) for p, h in want.items() if have.get(p) != h]
        removes = [p for p in have if p not in want]
        report.kept = len(want) - len(sets)
        report.errors = self.apply(sets, removes)
        report.replaced, report.removed = len(sets), len(removes)
        return report

    def flush(self) -> int:
        """Remove every route of ours (shutdown)."""
        have = list(self.dump())
        errors = self.apply([], have)
        self.installed.clear()
        return len(have) - len(errors)


# ---------------------------------------------------------------------- batched rtnetlink
# pyroute2 costs ~0.4 ms per request (its Python framework, one request and one ACK at a time):
# 40 s for 100,000 routes. Route changes are therefore packed here by hand (struct rtmsg and
# rtattrs, include/uapi/linux/rtnetlink.h) and sent BATCH at a time on one NETLINK_ROUTE socket,
# each with NLM_F_ACK, the ACKs read back per batch and matched by sequence number.
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
NLMSG_ERROR = 2
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 6, 9, 15
RTN_UNICAST, RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 1, 0, 255
BATCH = 256
CLONE_NEWNET = 0x40000000


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _addr(a: IPAddress) -> bytes:
    return int(a).to_bytes(4 if a.version == 4 else 16, "big")


class RtBatch:
    """One raw NETLINK_ROUTE socket (opened in `netns` if given) for batched route changes."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = self._open(netns)
        self.seq = 0

    @staticmethod
    def _open(netns: str | None) -> socket.socket:
        if not netns:
            return _nl_socket()
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {netns}")
            try:
                return _nl_socket()
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(own)
            os.close(target)

    def close(self) -> None:
        self.sock.close()

    def message(self, cmd: int, prefix: IPNetwork, hops: list[NextHop], *, table: int, proto: int,
                metric: int) -> bytes:
        fam = _family(prefix)
        if cmd == RTM_NEWROUTE:
            flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE
            rt = struct.pack("=BBBBBBBBI", fam, prefix.prefixlen, 0, 0, table if table < 256 else 252, proto,
                             RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
        else:
            flags = NLM_F_REQUEST | NLM_F_ACK
            rt = struct.pack("=BBBBBBBBI", fam, prefix.prefixlen, 0, 0, table if table < 256 else 252, proto,
                             RT_SCOPE_NOWHERE, 0, 0)
        body = rt + _attr(RTA_TABLE, struct.pack("=I", table)) + _attr(RTA_PRIORITY, struct.pack("=I", metric))
        if prefix.prefixlen:
            body += _attr(RTA_DST, prefix.first.to_bytes(4 if fam == socket.AF_INET else 16, "big"))
        if cmd == RTM_NEWROUTE:
            if len(hops) == 1:
                body += _attr(RTA_OIF, struct.pack("=i", hops[0][0])) + _attr(RTA_GATEWAY, _addr(hops[0][1]))
            else:
                mp = b""
                for idx, gw in hops:
                    gattr = _attr(RTA_GATEWAY, _addr(gw))
                    mp += struct.pack("=HBBi", 8 + len(gattr), 0, 0, idx) + gattr
                body += _attr(RTA_MULTIPATH, mp)
        self.seq += 1
        return struct.pack("=IHHII", 16 + len(body), cmd, flags, self.seq, 0) + body

    def run(self, messages: list[tuple[bytes, object]]) -> dict[object, int]:
        """Send (message, key) pairs BATCH at a time; returns key -> errno for the refused ones."""
        errors: dict[object, int] = {}
        for i in range(0, len(messages), BATCH):
            chunk = messages[i:i + BATCH]
            want = {}
            for data, key in chunk:
                want[struct.unpack_from("=I", data, 8)[0]] = key
            self.sock.sendall(b"".join(d for d, _ in chunk))
            while want:
                buf = self.sock.recv(1 << 20)
                off = 0
                while off + 16 <= len(buf):
                    ln, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", buf, off)
                    if kind == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", buf, off + 16)[0]
                        key = want.pop(seq, None)
                        if err and key is not None:
                            errors[key] = err
                    off += (ln + 3) & ~3
                    if ln == 0:
                        break
        return errors


def _nl_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.bind((0, 0))
    return s
