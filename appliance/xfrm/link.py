"""XFRM interfaces (one per tunnel) and the rtnetlink facts the data plane needs, via pyroute2.IPRoute.

An interface is ``kind xfrm`` with the tunnel's ``if_id`` (``IFLA_XFRM_IF_ID``); traffic routed
into it is matched to the SAs and policies carrying the same if_id. Its ``ifalias`` reads
``isthmus:<tunnel>`` so that a human (``ip link``) and reconciliation can tell whose it is; the
if_id range is what reconciliation trusts.

pyroute2's IPRoute keeps per-thread state: one :class:`Links` is used from one thread.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as Pyroute2NetlinkError

from appliance.xfrm.model import IF_ID_MAX, IF_ID_MIN, IPAddress, IPInterface, TunnelInterface
from appliance.xfrm.netlink import NamespaceError, NetlinkError

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


def _wrap(e: Pyroute2NetlinkError, what: str) -> NetlinkError:
    msg = e.args[1] if len(e.args) > 1 else None
    # pyroute2 fills the message with strerror when the kernel gave no extended ack
    extack = msg if msg and msg != os.strerror(e.code) else None
    return NetlinkError(e.code, what, extack)


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
        if netns is None:
            self.ipr = IPRoute(groups=0, ext_ack=True)
            return
        path = netns if "/" in netns else f"/var/run/netns/{netns}"
        if not os.path.exists(path):
            raise NamespaceError(errno.ENOENT, f"network namespace {netns!r} does not exist ({path})")
        try:
            # flags=0: never create the namespace (pyroute2's default would)
            self.ipr = IPRoute(netns=netns, flags=0, groups=0, ext_ack=True)
        except (OSError, TimeoutError, RuntimeError) as e:
            raise NamespaceError(getattr(e, "errno", None) or errno.EIO,
                                 f"cannot open an rtnetlink socket in network namespace {netns!r}: {e}") from e

    def close(self) -> None:
        self.ipr.close()

    # --- reading -------------------------------------------------------------------------------

    def get(self, ifname: str) -> LinkInfo | None:
        try:
            msgs = self.ipr.link("get", ifname=ifname)
        except Pyroute2NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise _wrap(e, f"reading interface {ifname}") from None
        return _info(msgs[0]) if msgs else None

    def by_index(self, index: int) -> LinkInfo | None:
        try:
            msgs = self.ipr.link("get", index=index)
        except Pyroute2NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise _wrap(e, f"reading interface #{index}") from None
        return _info(msgs[0]) if msgs else None

    def xfrm_links(self) -> list[LinkInfo]:
        """Every XFRM interface of the namespace (ours or not)."""
        return [i for i in (_info(msg) for msg in self.ipr.link("dump")) if i.kind == "xfrm"]

    def addresses(self, index: int) -> set[IPInterface]:
        out = set()
        for a in self.ipr.addr("dump", index=index):
            addr = a.get("address") or a.get("local")
            if addr and not (a["family"] == socket.AF_INET6 and ipaddress.ip_address(addr).is_link_local):
                out.add(ipaddress.ip_interface(f"{addr}/{a['prefixlen']}"))
        return out

    def underlay_mtu(self, remote: IPAddress) -> int:
        """The MTU towards `remote` on the underlay: the route's MTU if it has one, else its
        device's. 1500 when there is no route (the SA will not carry traffic either)."""
        try:
            routes = self.ipr.route("get", dst=str(remote))
        except Pyroute2NetlinkError:
            return DEFAULT_UNDERLAY_MTU
        if not routes:
            return DEFAULT_UNDERLAY_MTU
        route = routes[0]
        metrics = route.get("metrics")
        if metrics is not None:
            mtu = metrics.get("mtu")
            if mtu:
                return int(mtu)
        oif = route.get("oif")
        dev = self.by_index(oif) if oif else None
        return dev.mtu if dev and dev.mtu else DEFAULT_UNDERLAY_MTU

    # --- changing ------------------------------------------------------------------------------

    def create(self, iface: TunnelInterface) -> LinkInfo:
        """Create the tunnel's XFRM interface, down, with its alias and addresses."""
        kw = {"ifname": iface.ifname, "kind": "xfrm", "xfrm_if_id": iface.if_id}
        if iface.underlay:
            under = self.get(iface.underlay)
            if under is None:
                raise NetlinkError(errno.ENODEV, f"creating interface {iface.ifname}: underlay device "
                                                 f"{iface.underlay!r} does not exist")
            kw["xfrm_link"] = under.index
        try:
            self.ipr.link("add", **kw)
        except Pyroute2NetlinkError as e:
            raise _wrap(e, f"creating XFRM interface {iface.ifname} (if_id {iface.if_id:#x})") from None
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

    def delete(self, index: int) -> None:
        try:
            self.ipr.link("del", index=index)
        except Pyroute2NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT):
                raise _wrap(e, f"deleting interface #{index}") from None

    def set_alias(self, index: int, tunnel: str) -> None:
        try:
            self.ipr.link("set", index=index, ifalias=ALIAS_PREFIX + tunnel)
        except Pyroute2NetlinkError as e:
            raise _wrap(e, f"setting the alias of interface #{index}") from None

    def set_up(self, index: int, up: bool) -> None:
        try:
            self.ipr.link("set", index=index, state="up" if up else "down")
        except Pyroute2NetlinkError as e:
            raise _wrap(e, f"setting interface #{index} {'up' if up else 'down'}") from None

    def set_mtu(self, index: int, mtu: int) -> None:
        try:
            self.ipr.link("set", index=index, mtu=mtu)
        except Pyroute2NetlinkError as e:
            raise _wrap(e, f"setting the MTU of interface #{index} to {mtu}") from None

    def sync_addresses(self, index: int, wanted: tuple[IPInterface, ...], fresh: bool = False) -> None:
        """Make the interface's addresses exactly `wanted` (IPv6 link-local ones aside); `fresh`:
        the interface was just created and has none yet."""
        have = set() if fresh else self.addresses(index)
        for a in have - set(wanted):
            try:
                self.ipr.addr("del", index=index, address=str(a.ip), prefixlen=a.network.prefixlen)
            except Pyroute2NetlinkError as e:
                if e.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                    raise _wrap(e, f"removing address {a} from interface #{index}") from None
        for a in wanted:
            if a in have:
                continue
            kw = {"index": index, "address": str(a.ip), "prefixlen": a.network.prefixlen}
            if a.version == 6:
                kw["flags"] = IFA_F_NODAD
            try:
                self.ipr.addr("add", **kw)
            except Pyroute2NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise _wrap(e, f"adding address {a} to interface #{index}") from None
