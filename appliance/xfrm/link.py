"""XFRM interfaces (one per tunnel) and the rtnetlink facts the data plane needs.

An interface is ``kind xfrm`` with the tunnel's ``if_id`` (``IFLA_XFRM_IF_ID``); traffic routed
into it is matched to the SAs and policies carrying the same if_id. Its ``ifalias`` reads
``isthmus:<tunnel>`` so that a human (``ip link``) and reconciliation can tell whose it is; the
if_id range is what reconciliation trusts.

Requests go over our own synchronous NETLINK_ROUTE socket (:class:`appliance.xfrm.netlink.RtnlSocket`,
pyroute2's message classes, no pyroute2 IPRoute): IPRoute runs every request through an asyncio
loop of its own, which made each of the dozen rtnetlink calls of a Child SA install cost
milliseconds in the lab guest (issue 13). Many interfaces are created in a few batched round
trips (:meth:`Links.create_many`: every RTM_NEWLINK, then every alias, one dump for the indexes,
then every address), which is how a 1,000-tunnel config starts in seconds. Address reads are
dumps filtered by the kernel (strict checking), never a walk over every address of the namespace.

One :class:`Links` is used from one thread.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
from pyroute2.netlink.rtnl import (RTM_DELADDR, RTM_DELLINK, RTM_GETADDR, RTM_GETLINK, RTM_GETROUTE, RTM_NEWADDR,
                                   RTM_NEWLINK)

from appliance.xfrm.model import IF_ID_MAX, IF_ID_MIN, IPAddress, IPInterface, TunnelInterface
from appliance.xfrm.netlink import NetlinkError, Request, RtnlSocket

ALIAS_PREFIX = "isthmus:"
IFF_UP = 0x1
IFA_F_NODAD = 0x02
DEFAULT_UNDERLAY_MTU = 1500


@dataclass(frozen=True)
class LinkInfo:
    index: int
    ifname: str
    kind: str | None
    if_id: int | None          # xfrm interfaces only
    link: int | None           # underlay ifindex (xfrm), 0 = none
    mtu: int
    up: bool
    alias: str | None

    @property
    def ours(self) -> bool:
        return self.kind == "xfrm" and self.if_id is not None and IF_ID_MIN <= self.if_id <= IF_ID_MAX

    @property
    def tunnel(self) -> str | None:
        """The tunnel named in the alias, if the alias is ours."""
        if self.alias and self.alias.startswith(ALIAS_PREFIX):
            return self.alias[len(ALIAS_PREFIX):]
        return None


# rtnetlink structures (linux/rtnetlink.h, if_link.h, if_addr.h): only what the data plane reads
_IFINFO = struct.Struct("BxHiII")          # family, type, index, flags, change
_IFADDR = struct.Struct("BBBBI")           # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("BBBBBBBBI")        # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_IFSTATS = struct.Struct("BBHII")         # if_stats_msg: family, pad, pad, ifindex, filter_mask
_NLA = struct.Struct("HH")
RTM_GETSTATS = 94
IFLA_STATS_LINK_64 = 1
IFLA_STATS_FILTER_LINK_64 = 1 << (IFLA_STATS_LINK_64 - 1)
_NLMSG_HDRLEN = 16
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_STATS64, IFLA_EXT_MASK = 3, 4, 18, 20, 23, 29
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_XFRM_LINK, IFLA_XFRM_IF_ID = 1, 2
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_METRICS, RTAX_MTU = 1, 4, 8, 2
RTEXT_FILTER_SKIP_STATS = 1 << 3
_SKIP_STATS = struct.pack("HHI", 8, IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)


def _nla(atype: int, payload: bytes) -> bytes:
    n = _NLA.size + len(payload)
    return _NLA.pack(n, atype) + payload + b"\0" * (-n % 4)


def _u32(atype: int, v: int) -> bytes:
    return _nla(atype, struct.pack("I", v))


def _cstr(atype: int, text: str) -> bytes:
    return _nla(atype, text.encode() + b"\0")


def _attrs(data: bytes, offset: int, end: int | None = None) -> dict[int, bytes]:
    """Attributes (type without the nested/byte-order flags -> payload), the first of a type."""
    out: dict[int, bytes] = {}
    end = len(data) if end is None else end
    while offset + 4 <= end:
        alen, atype = _NLA.unpack_from(data, offset)
        if alen < 4:
            break
        out.setdefault(atype & 0x3FFF, data[offset + 4:offset + alen])
        offset += (alen + 3) & ~3
    return out


def _text(raw: bytes | None) -> str | None:
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw is not None else None


def _link_msg(index: int = 0, attrs: bytes = b"", flags: int = 0, change: int = 0) -> bytes:
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change) + attrs


def _addr_msg(index: int, a: IPInterface | None = None) -> bytes:
    if a is None:
        return _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, index)
    if a.version == 4:
        return (_IFADDR.pack(socket.AF_INET, a.network.prefixlen, 0, 0, index)
                + _nla(IFA_LOCAL, a.ip.packed) + _nla(IFA_ADDRESS, a.ip.packed))
    return _IFADDR.pack(socket.AF_INET6, a.network.prefixlen, IFA_F_NODAD, 0, index) + _nla(IFA_ADDRESS, a.ip.packed)


def _new_link_msg(iface: TunnelInterface, underlay: int | None) -> bytes:
    data = _u32(IFLA_XFRM_IF_ID, iface.if_id) + (_u32(IFLA_XFRM_LINK, underlay) if underlay is not None else b"")
    info = _cstr(IFLA_INFO_KIND, "xfrm") + _nla(IFLA_INFO_DATA, data)
    return _link_msg(attrs=_cstr(IFLA_IFNAME, iface.ifname) + _nla(IFLA_LINKINFO, info))


def _info(raw: bytes) -> LinkInfo:
    """A LinkInfo from an RTM_NEWLINK message (netlink header included)."""
    _fam, _type, index, flags, _change = _IFINFO.unpack_from(raw, _NLMSG_HDRLEN)
    a = _attrs(raw, _NLMSG_HDRLEN + _IFINFO.size)
    kind = if_id = link = None
    li = a.get(IFLA_LINKINFO)
    if li is not None:
        info = _attrs(li, 0)
        kind = _text(info.get(IFLA_INFO_KIND))
        if kind == "xfrm" and IFLA_INFO_DATA in info:
            data = _attrs(info[IFLA_INFO_DATA], 0)
            if IFLA_XFRM_IF_ID in data:
                (if_id,) = struct.unpack_from("I", data[IFLA_XFRM_IF_ID])
            (link,) = struct.unpack_from("I", data[IFLA_XFRM_LINK]) if IFLA_XFRM_LINK in data else (0,)
    mtu = struct.unpack_from("I", a[IFLA_MTU])[0] if IFLA_MTU in a else 0
    return LinkInfo(index=index, ifname=_text(a.get(IFLA_IFNAME)) or "", kind=kind, if_id=if_id, link=link,
                    mtu=mtu, up=bool(flags & IFF_UP), alias=_text(a.get(IFLA_IFALIAS)) or None)


class Links:
    """Interfaces, addresses and routes of one network namespace."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        # a missing namespace raises NamespaceError (never created)
        self.nl = RtnlSocket(netns)

    def close(self) -> None:
        self.nl.close()

    # --- reading -------------------------------------------------------------------------------

    def _get(self, msg: bytes, what: str) -> LinkInfo | None:
        try:
            msgs = self.nl.get(msg, RTM_GETLINK, what)
        except NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return _info(msgs[0]) if msgs else None

    def get(self, ifname: str) -> LinkInfo | None:
        return self._get(_link_msg(attrs=_cstr(IFLA_IFNAME, ifname) + _SKIP_STATS), f"reading interface {ifname}")

    def by_index(self, index: int) -> LinkInfo | None:
        return self._get(_link_msg(index, _SKIP_STATS), f"reading interface #{index}")

    def all_links(self) -> list[LinkInfo]:
        """Every interface of the namespace (one dump)."""
        return [_info(msg) for msg in self.nl.dump(_link_msg(attrs=_SKIP_STATS), RTM_GETLINK, "listing interfaces")]

    def packet_counters(self) -> dict[int, tuple[int, int]]:
        """ifindex -> (packets received, packets sent) of every interface, in one RTM_GETSTATS
        dump of the 64-bit link counters only (small messages, nothing else decoded). On an XFRM
        interface these count what its SAs decrypted and encrypted."""
        out = {}
        req = _IFSTATS.pack(socket.AF_UNSPEC, 0, 0, 0, IFLA_STATS_FILTER_LINK_64)
        for msg in self.nl.dump(req, RTM_GETSTATS, "reading interface counters"):
            index = _IFSTATS.unpack_from(msg, _NLMSG_HDRLEN)[3]
            st = _attrs(msg, _NLMSG_HDRLEN + _IFSTATS.size).get(IFLA_STATS_LINK_64)
            if st is not None and len(st) >= 16:
                out[index] = struct.unpack_from("QQ", st)
        return out

    def xfrm_links(self) -> list[LinkInfo]:
        """Every XFRM interface of the namespace (ours or not)."""
        return [i for i in self.all_links() if i.kind == "xfrm"]

    def addresses(self, index: int) -> set[IPInterface]:
        out = set()
        for a in self.nl.dump(_addr_msg(index), RTM_GETADDR, f"reading the addresses of interface #{index}"):
            family, prefixlen, _flags, _scope, aindex = _IFADDR.unpack_from(a, _NLMSG_HDRLEN)
            if aindex != index:      # a kernel without strict checking does not filter
                continue
            attrs = _attrs(a, _NLMSG_HDRLEN + _IFADDR.size)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is None or len(raw) not in (4, 16):
                continue
            addr = ipaddress.ip_address(raw)
            if not (family == socket.AF_INET6 and addr.is_link_local):
                out.add(ipaddress.ip_interface(f"{addr}/{prefixlen}"))
        return out

    def underlay_mtu(self, remote: IPAddress) -> int:
        """The MTU towards `remote` on the underlay: the route's MTU if it has one, else its
        device's. 1500 when there is no route (the SA will not carry traffic either)."""
        family = socket.AF_INET if remote.version == 4 else socket.AF_INET6
        m = _RTMSG.pack(family, remote.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + _nla(RTA_DST, remote.packed)
        try:
            routes = self.nl.get(m, RTM_GETROUTE, f"looking up the route to {remote}")
        except NetlinkError:
            return DEFAULT_UNDERLAY_MTU
        if not routes:
            return DEFAULT_UNDERLAY_MTU
        route = _attrs(routes[0], _NLMSG_HDRLEN + _RTMSG.size)
        if RTA_METRICS in route:
            mtu = _attrs(route[RTA_METRICS], 0).get(RTAX_MTU)
            if mtu is not None and struct.unpack_from("I", mtu)[0]:
                return struct.unpack_from("I", mtu)[0]
        oif = struct.unpack_from("I", route[RTA_OIF])[0] if RTA_OIF in route else None
        dev = self.by_index(oif) if oif else None
        return dev.mtu if dev and dev.mtu else DEFAULT_UNDERLAY_MTU

    # --- changing ------------------------------------------------------------------------------

    def _underlay_index(self, iface: TunnelInterface) -> int | None:
        if not iface.underlay:
            return None
        under = self.get(iface.underlay)
        if under is None:
            raise NetlinkError(errno.ENODEV, f"creating interface {iface.ifname}: underlay device "
                                             f"{iface.underlay!r} does not exist")
        return under.index

    def create(self, iface: TunnelInterface) -> LinkInfo:
        """Create the tunnel's XFRM interface, down, with its alias and addresses."""
        underlay = self._underlay_index(iface)
        self.nl.request(_new_link_msg(iface, underlay), RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                        f"creating XFRM interface {iface.ifname} (if_id {iface.if_id:#x})")
        info = self.get(iface.ifname)
        if info is None:  # pragma: no cover - the kernel just said it made it
            raise NetlinkError(errno.ENODEV, f"interface {iface.ifname} vanished after creation")
        try:
            self.set_alias(info.index, iface.tunnel)
            self.sync_addresses(info.index, iface.addresses, fresh=True)
        except Exception:
            self.delete(info.index)
            raise
        return dataclasses.replace(info, alias=ALIAS_PREFIX + iface.tunnel)

    def create_many(self, ifaces: list[TunnelInterface]) -> tuple[dict[str, LinkInfo], dict[str, NetlinkError]]:
        """Create many XFRM interfaces (down, alias, addresses) in a few batched round trips:
        every RTM_NEWLINK, every alias, one dump for the indexes, every address. Returns the
        interfaces made (by name) and the ones that failed with the kernel's reason; a failed
        one is not left half made."""
        made: dict[str, LinkInfo] = {}
        failed: dict[str, NetlinkError] = {}
        todo = []
        for iface in ifaces:
            try:
                todo.append((iface, self._underlay_index(iface)))
            except NetlinkError as e:
                failed[iface.ifname] = e
        reqs = [Request(_new_link_msg(i, u), RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                        f"creating XFRM interface {i.ifname} (if_id {i.if_id:#x})") for i, u in todo]
        created = []
        for (iface, _u), err in zip(todo, self.nl.batch(reqs)):
            if err is None:
                created.append(iface)
            else:
                failed[iface.ifname] = err
        if not created:
            return made, failed
        # the alias by name (ifindex 0 + IFLA_IFNAME): no index needed yet
        reqs = [Request(_link_msg(attrs=_cstr(IFLA_IFNAME, i.ifname) + _cstr(IFLA_IFALIAS, ALIAS_PREFIX + i.tunnel)),
                        RTM_NEWLINK, 0, f"setting the alias of interface {i.ifname}") for i in created]
        errs = self.nl.batch(reqs)
        by_name = {x.ifname: x for x in self.all_links()}
        ok = []
        for iface, err in zip(created, errs):
            info = by_name.get(iface.ifname)
            if err is not None or info is None:
                failed[iface.ifname] = err or NetlinkError(errno.ENODEV, f"interface {iface.ifname} vanished "
                                                                         f"after creation")
                if info is not None:
                    self.delete(info.index)
                continue
            ok.append((iface, info))
        reqs, owners = [], []
        for iface, info in ok:
            for a in iface.addresses:
                reqs.append(Request(_addr_msg(info.index, a), RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
                                    f"adding address {a} to interface {iface.ifname}"))
                owners.append(iface.ifname)
        bad: dict[str, NetlinkError] = {}
        for name, err in zip(owners, self.nl.batch(reqs)):
            if err is not None and err.code != errno.EEXIST:
                bad.setdefault(name, err)
        for iface, info in ok:
            if iface.ifname in bad:
                failed[iface.ifname] = bad[iface.ifname]
                self.delete(info.index)
            else:
                made[iface.ifname] = info
        return made, failed

    def delete(self, index: int) -> None:
        try:
            self.nl.request(_link_msg(index), RTM_DELLINK, 0, f"deleting interface #{index}")
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT):
                raise

    def _set(self, index: int, what: str, attrs: bytes = b"", flags: int = 0, change: int = 0) -> None:
        self.nl.request(_link_msg(index, attrs, flags, change), RTM_NEWLINK, 0, what)

    def set_alias(self, index: int, tunnel: str) -> None:
        self._set(index, f"setting the alias of interface #{index}", _cstr(IFLA_IFALIAS, ALIAS_PREFIX + tunnel))

    def set_up(self, index: int, up: bool) -> None:
        self._set(index, f"setting interface #{index} {'up' if up else 'down'}", flags=IFF_UP if up else 0,
                  change=IFF_UP)

    def set_link(self, index: int, mtu: int | None = None, up: bool | None = None) -> None:
        """MTU and/or up/down in one RTM_NEWLINK (a Child SA's install does both)."""
        attrs = _u32(IFLA_MTU, mtu) if mtu is not None else b""
        what = " and ".join(x for x in (f"the MTU to {mtu}" if mtu is not None else "",
                                        ("up" if up else "down") if up is not None else "") if x)
        self._set(index, f"setting interface #{index} {what}", attrs, flags=IFF_UP if up else 0,
                  change=IFF_UP if up is not None else 0)

    def set_mtu(self, index: int, mtu: int) -> None:
        self._set(index, f"setting the MTU of interface #{index} to {mtu}", _u32(IFLA_MTU, mtu))

    def sync_addresses(self, index: int, wanted: tuple[IPInterface, ...], fresh: bool = False) -> None:
        """Make the interface's addresses exactly `wanted` (IPv6 link-local ones aside); `fresh`:
        the interface was just created and has none yet."""
        have = set() if fresh else self.addresses(index)
        for a in have - set(wanted):
            try:
                self.nl.request(_addr_msg(index, a), RTM_DELADDR, 0, f"removing address {a} from interface #{index}")
            except NetlinkError as e:
                if e.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                    raise
        for a in wanted:
            if a in have:
                continue
            try:
                self.nl.request(_addr_msg(index, a), RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
                                f"adding address {a} to interface #{index}")
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
