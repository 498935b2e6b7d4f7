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
from dataclasses import dataclass

from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
from pyroute2.netlink.rtnl import (RTM_DELADDR, RTM_DELLINK, RTM_GETADDR, RTM_GETLINK, RTM_GETROUTE, RTM_NEWADDR,
                                   RTM_NEWLINK)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

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


def _link_msg(index: int = 0, attrs: list | None = None, flags: int = 0, change: int = 0) -> ifinfmsg:
    m = ifinfmsg()
    m["family"] = socket.AF_UNSPEC
    m["index"] = index
    m["flags"] = flags
    m["change"] = change
    m["attrs"] = attrs or []
    return m


def _addr_msg(index: int, a: IPInterface | None = None) -> ifaddrmsg:
    m = ifaddrmsg()
    m["family"] = socket.AF_UNSPEC if a is None else (socket.AF_INET if a.version == 4 else socket.AF_INET6)
    m["index"] = index
    m["attrs"] = []
    if a is not None:
        m["prefixlen"] = a.network.prefixlen
        m["attrs"] = [("IFA_LOCAL", str(a.ip)), ("IFA_ADDRESS", str(a.ip))] if a.version == 4 else \
            [("IFA_ADDRESS", str(a.ip))]
        if a.version == 6:
            m["flags"] = IFA_F_NODAD
    return m


def _new_link_msg(iface: TunnelInterface, underlay: int | None) -> ifinfmsg:
    data = [("IFLA_XFRM_IF_ID", iface.if_id)]
    if underlay is not None:
        data.append(("IFLA_XFRM_LINK", underlay))
    return _link_msg(attrs=[("IFLA_IFNAME", iface.ifname),
                            ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "xfrm"),
                                                         ("IFLA_INFO_DATA", {"attrs": data})]})])



def _info(msg) -> LinkInfo:
    kind = msg.get(("linkinfo", "kind"))
    if_id = link = None
    if kind == "xfrm":
        if_id = msg.get(("linkinfo", "data", "xfrm_if_id"))
        link = msg.get(("linkinfo", "data", "xfrm_link"))
    return LinkInfo(index=msg["index"], ifname=msg.get("ifname"), kind=kind, if_id=if_id, link=link,
                    mtu=msg.get("mtu") or 0, up=bool(msg["flags"] & IFF_UP), alias=msg.get("ifalias"))


class Links:
    """Interfaces, addresses and routes of one network namespace."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        # a missing namespace raises NamespaceError (never created)
        self.nl = RtnlSocket(netns)

    def close(self) -> None:
        self.nl.close()

    # --- reading -------------------------------------------------------------------------------

    def _get(self, msg: ifinfmsg, what: str) -> LinkInfo | None:
        try:
            msgs = self.nl.get(msg, RTM_GETLINK, what)
        except NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return _info(msgs[0]) if msgs else None

    def get(self, ifname: str) -> LinkInfo | None:
        return self._get(_link_msg(attrs=[("IFLA_IFNAME", ifname)]), f"reading interface {ifname}")

    def by_index(self, index: int) -> LinkInfo | None:
        return self._get(_link_msg(index), f"reading interface #{index}")

    def all_links(self) -> list[LinkInfo]:
        """Every interface of the namespace (one dump)."""
        return [_info(msg) for msg in self.nl.dump(_link_msg(), RTM_GETLINK, "listing interfaces")]

    def xfrm_links(self) -> list[LinkInfo]:
        """Every XFRM interface of the namespace (ours or not)."""
        return [i for i in self.all_links() if i.kind == "xfrm"]

    def addresses(self, index: int) -> set[IPInterface]:
        out = set()
        for a in self.nl.dump(_addr_msg(index), RTM_GETADDR, f"reading the addresses of interface #{index}"):
            if a["index"] != index:      # a kernel without strict checking does not filter
                continue
            addr = a.get("IFA_LOCAL") or a.get("IFA_ADDRESS")
            if addr and not (a["family"] == socket.AF_INET6 and ipaddress.ip_address(addr).is_link_local):
                out.add(ipaddress.ip_interface(f"{addr}/{a['prefixlen']}"))
        return out

    def underlay_mtu(self, remote: IPAddress) -> int:
        """The MTU towards `remote` on the underlay: the route's MTU if it has one, else its
        device's. 1500 when there is no route (the SA will not carry traffic either)."""
        m = rtmsg()
        m["family"] = socket.AF_INET if remote.version == 4 else socket.AF_INET6
        m["dst_len"] = remote.max_prefixlen
        m["attrs"] = [("RTA_DST", str(remote))]
        try:
            routes = self.nl.get(m, RTM_GETROUTE, f"looking up the route to {remote}")
        except NetlinkError:
            return DEFAULT_UNDERLAY_MTU
        if not routes:
            return DEFAULT_UNDERLAY_MTU
        route = routes[0]
        metrics = route.get("RTA_METRICS")
        if metrics is not None:
            mtu = metrics.get("RTAX_MTU")
            if mtu:
                return int(mtu)
        oif = route.get("RTA_OIF")
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
        reqs = [Request(_link_msg(attrs=[("IFLA_IFNAME", i.ifname), ("IFLA_IFALIAS", ALIAS_PREFIX + i.tunnel)]),
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

    def _set(self, index: int, what: str, attrs: list | None = None, flags: int = 0, change: int = 0) -> None:
        self.nl.request(_link_msg(index, attrs, flags, change), RTM_NEWLINK, 0, what)

    def set_alias(self, index: int, tunnel: str) -> None:
        self._set(index, f"setting the alias of interface #{index}", [("IFLA_IFALIAS", ALIAS_PREFIX + tunnel)])

    def set_up(self, index: int, up: bool) -> None:
        self._set(index, f"setting interface #{index} {'up' if up else 'down'}", flags=IFF_UP if up else 0,
                  change=IFF_UP)

    def set_mtu(self, index: int, mtu: int) -> None:
        self._set(index, f"setting the MTU of interface #{index} to {mtu}", [("IFLA_MTU", mtu)])

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
