"""The data plane the daemon drives: one XFRM interface per tunnel, its Child SAs, policies, MTU
and MSS clamp, in one network namespace.

Life of a tunnel (the daemon maps IKE events onto these calls)::

    dp = Dataplane(netns=None, hooks_dir="/etc/isthmus/hooks")
    dp.reconcile(tunnels)               # at start: adopt/create interfaces, remove stale objects
    dp.install("to-b", child)           # Child SA up: SA pair, 0/0 + ::/0 policies, MTU, clamp, up
    dp.rekey("to-b", new_child)         # CREATE_CHILD_SA rekey: new pair in, old outbound out
    dp.retire("to-b", old.spi_in)       # the old Child SA's DELETE: its inbound SA goes
    dp.update_endpoints("to-b", ep)     # MOBIKE (RFC 4555): SAs and policies move to new addresses
    dp.counters("to-b")                 # bytes/packets/replay state per SA
    dp.down("to-b")                     # Child SA down: SAs, policies, clamp gone, interface down

Every call that adds something is a transaction: if any step fails, what it added is removed
again, in reverse order, and :class:`DataplaneError` names the tunnel, the step and the kernel's
reason. Nothing a transaction undoes is logged with keys, and no message carries one.

Rekeying without loss (RFC 7296 §2.8): the new inbound SA goes in first, then the new outbound
SA; only then is the old outbound SA withdrawn, and the old inbound SA stays until
:meth:`Dataplane.retire`. All SAs of a tunnel share its if_id as reqid, so adding the new outbound
SA invalidates cached bundles of the old one and new packets take the new SA. A responder that must
not send on the new SA before the initiator has installed its inbound side passes
``outbound=False`` and calls :meth:`Dataplane.activate_outbound` later.

Threading: a Dataplane is synchronous and belongs to one thread (pyroute2's IPRoute keeps
per-thread state); the daemon runs it in a single-thread executor. Namespaces: every kernel socket
is opened in ``netns`` when the Dataplane is built (see :mod:`appliance.xfrm.netlink`); nft and
user hooks are run there with ``nsenter --net``.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from appliance.xfrm import messages as m
from appliance.xfrm import nft
from appliance.xfrm.hook import HookResult, TunnelMtu, UserHooks, hook_environment, tunnel_mtu
from appliance.xfrm.kernel import (
    LifetimeCurrent,
    PolicySpec,
    ReplayState,
    SaSpec,
    SaState,
    Xfrm,
    addr_from,
    decode_sa,
)
from appliance.xfrm.link import LinkInfo, Links
from appliance.xfrm.model import (
    ChildSa,
    DataplaneInputError,
    Endpoints,
    IF_ID_MAX,
    IF_ID_MIN,
    IPAddress,
    TunnelInterface,
    check_unique_if_ids,
)
from appliance.xfrm.netlink import NamespaceError, NetlinkError, XfrmEventSocket

log = logging.getLogger("isthmus.dataplane")

#: When an outbound SA is re-created (MOBIKE), its sequence number continues this far ahead of
#: the last one read, so that packets sent between the read and the deletion of the old SA can
#: never share a sequence number - and so a nonce - with the new one (RFC 4303 §3.3.3, RFC 4106 §3).
OSEQ_MARGIN = 1 << 16

SELECTORS = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))

_FAILURES = (NetlinkError, nft.NftError, NamespaceError, DataplaneInputError, OSError)


class DataplaneError(Exception):
    """A data plane operation failed. ``tunnel`` and ``action`` say what; ``reason`` is the
    kernel's (or nft's) answer; ``code`` its errno when there is one. Whatever the operation had
    added is gone again (``undone``), unless ``undo_failed`` lists leftovers."""

    def __init__(self, tunnel: str, action: str, reason: str, *, code: int | None = None,
                 undone: Iterable[str] = (), undo_failed: Iterable[str] = ()):
        self.tunnel = tunnel
        self.action = action
        self.reason = reason
        self.code = code
        self.undone = tuple(undone)
        self.undo_failed = tuple(undo_failed)
        text = f"tunnel {tunnel!r}: {action} failed: {reason}"
        if self.undone:
            text += f" (rolled back: {'; '.join(self.undone)})"
        if self.undo_failed:
            text += f" (ROLLBACK INCOMPLETE, not undone: {'; '.join(self.undo_failed)})"
        super().__init__(text)


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaCounters:
    """One SA's traffic and replay state as the kernel counts it."""

    spi: int
    bytes: int
    packets: int
    seq: int                    # outbound: last sequence number sent; inbound: highest received
    replay_window: int
    replay_errors: int          # inbound packets dropped as replayed or too old
    integrity_failures: int     # inbound packets that failed the ICV check
    add_time: int               # epoch seconds
    use_time: int               # epoch seconds of first use, 0 = unused

    @classmethod
    def from_state(cls, s: SaState, outbound: bool) -> "SaCounters":
        return cls(spi=s.spi, bytes=s.current.bytes, packets=s.current.packets,
                   seq=s.replay.outbound_seq if outbound else s.replay.inbound_seq,
                   replay_window=s.replay.replay_window, replay_errors=s.replay_errors,
                   integrity_failures=s.integrity_failures, add_time=s.current.add_time,
                   use_time=s.current.use_time)


@dataclass(frozen=True)
class ChildSaCounters:
    spi_in: int
    spi_out: int
    inbound: SaCounters | None      # None: the SA is not in the kernel (expired, deleted)
    outbound: SaCounters | None     # None also while the outbound SA is not installed yet


@dataclass(frozen=True)
class TunnelStatus:
    tunnel: str
    ifname: str
    if_id: int
    ifindex: int
    up: bool
    mtu: TunnelMtu | None
    child_sas: tuple[int, ...]          # inbound SPIs, oldest first
    outbound: int | None                # inbound SPI of the Child SA whose outbound SA carries traffic
    endpoints: Endpoints | None


@dataclass(frozen=True)
class ReconcileReport:
    created: tuple[str, ...] = ()             # interfaces created
    adopted: tuple[str, ...] = ()             # interfaces found and kept
    removed_interfaces: tuple[str, ...] = ()  # ours, no longer configured (or misconfigured)
    removed_sas: int = 0
    removed_policies: int = 0
    removed_clamps: tuple[str, ...] = ()      # tunnels whose MSS rules an earlier run left
    errors: tuple[str, ...] = ()              # tunnels that could not be set up, and why


@dataclass(frozen=True)
class ChildSaExpire:
    """The kernel's EXPIRE for one of our SAs: soft (rekey now) or hard (the SA is gone)."""

    tunnel: str | None
    if_id: int
    spi: int
    outbound: bool | None
    spi_in: int | None          # the Child SA it belongs to, by inbound SPI
    hard: bool
    bytes: int
    packets: int


@dataclass(frozen=True)
class TunnelAcquire:
    """The kernel's ACQUIRE: a packet was routed into a tunnel that has no outbound SA."""

    tunnel: str | None
    if_id: int
    local: IPAddress | None
    remote: IPAddress | None


# --- internals ------------------------------------------------------------------------------------


@dataclass
class _Tunnel:
    iface: TunnelInterface
    index: int
    children: dict[int, ChildSa] = field(default_factory=dict)   # by spi_in, oldest first
    out_installed: set[int] = field(default_factory=set)         # spi_in of children with an outbound SA
    active: int | None = None                                    # spi_in of the child carrying traffic out
    policies: Endpoints | None = None                            # endpoints the policies point to
    mtu: TunnelMtu | None = None


class _Transaction:
    def __init__(self, tunnel: str, action: str):
        self.tunnel = tunnel
        self.action = action
        self.undo: list[tuple[str, Callable[[], None]]] = []

    def added(self, what: str, undo: Callable[[], None]) -> None:
        """`what` names the change (e.g. "the inbound SA 0x..."), `undo` reverts it."""
        self.undo.append((what, undo))

    def failed(self, exc: BaseException) -> DataplaneError:
        undone: list[str] = []
        leftovers: list[str] = []
        for what, fn in reversed(self.undo):
            try:
                fn()
                undone.append(what)
            except Exception as e:  # keep undoing the rest
                leftovers.append(f"{what} ({e})")
        code = getattr(exc, "code", None) if isinstance(exc, NetlinkError) else getattr(exc, "errno", None)
        reason = _explain(exc)
        err = DataplaneError(self.tunnel, self.action, reason, code=code, undone=undone, undo_failed=leftovers)
        log.warning("%s", err)
        return err


def _explain(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, NetlinkError):
        if exc.code == errno.EEXIST and " SA " in exc.what:
            text += " - an SA with this SPI and destination already exists (duplicate SPI)"
        elif exc.code == errno.ENOSYS and " SA " in exc.what:
            text += " - the kernel has no implementation of this algorithm (crypto module missing?)"
    return text


def _spec(t: _Tunnel, child: ChildSa, outbound: bool, endpoints: Endpoints | None = None,
          replay: ReplayState | None = None, current: LifetimeCurrent | None = None) -> SaSpec:
    ep = endpoints or child.endpoints
    if outbound:
        src, dst, spi, keys = ep.local, ep.remote, child.spi_out, child.keys_out
        encap = (ep.encap.local_port, ep.encap.remote_port) if ep.encap else None
    else:
        src, dst, spi, keys = ep.remote, ep.local, child.spi_in, child.keys_in
        encap = (ep.encap.remote_port, ep.encap.local_port) if ep.encap else None
    return SaSpec(src=src, dst=dst, spi=spi, algorithms=child.algorithms, keys=keys, if_id=t.iface.if_id,
                  reqid=t.iface.if_id, outbound=outbound, encap=encap, esn=child.esn,
                  replay_window=child.replay_window, lifetime=child.lifetime, replay=replay, current=current)


def _advance(r: ReplayState, by: int, esn: bool, spi: int) -> ReplayState:
    """The replay state with the outbound sequence number `by` further on."""
    seq = r.outbound_seq + by
    if seq >= (1 << 64 if esn else 1 << 32):
        raise NetlinkError(errno.EOVERFLOW, f"moving the outbound SA {spi:#010x}",
                           "its sequence number is too close to the end of its space: rekey it instead")
    return dataclasses.replace(r, oseq=seq & 0xFFFFFFFF, oseq_hi=seq >> 32)


def _policy_specs(t: _Tunnel, ep: Endpoints) -> list[PolicySpec]:
    out = []
    for sel in SELECTORS:
        out.append(PolicySpec("out", sel, t.iface.if_id, t.iface.if_id, ep.local, ep.remote))
        for d in ("in", "fwd"):
            out.append(PolicySpec(d, sel, t.iface.if_id, t.iface.if_id, ep.remote, ep.local))
    return out


class Dataplane:
    """Tunnels, Child SAs, MTU and MSS clamps in network namespace `netns` (None: our own).

    hooks_dir: directory of user hooks (see :mod:`appliance.xfrm.hook`); None = no user hooks.
    nft: manage the ``inet isthmus`` MSS-clamp table (off only for benchmarks of the rest).
    """

    def __init__(self, netns: str | None = None, *, hooks_dir: str | Path | None = None,
                 hook_timeout: float = 10.0, on_hook_result: Callable[[HookResult], None] | None = None,
                 nft_enabled: bool = True):
        self.netns = netns
        self.xfrm = Xfrm(netns)
        try:
            self.links = Links(netns)
        except Exception:
            self.xfrm.close()
            raise
        self.nft_enabled = nft_enabled
        self.hooks = UserHooks(hooks_dir, hook_timeout, netns, on_hook_result) if hooks_dir else None
        self._tunnels: dict[str, _Tunnel] = {}
        self._clamps: dict[str, nft.MssClamp] = {}
        self._clamp_table = nft.ClampTable(netns) if nft_enabled else None

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.close()
        if self._clamp_table is not None:
            self._clamp_table.close()
        self.xfrm.close()
        self.links.close()

    def __enter__(self) -> "Dataplane":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- lookups -------------------------------------------------------------------------------

    def _tunnel(self, name: str, action: str) -> _Tunnel:
        t = self._tunnels.get(name)
        if t is None:
            known = ", ".join(sorted(self._tunnels)) or "none"
            raise DataplaneError(name, action, f"no such tunnel in the data plane (known: {known}); "
                                               f"reconcile() or add_tunnel() registers it")
        return t

    def _present_link(self, t: _Tunnel) -> LinkInfo:
        """The tunnel's interface as the kernel has it now; a missing one is an error."""
        info = self.links.by_index(t.index)
        if info is None or info.ifname != t.iface.ifname or info.if_id != t.iface.if_id:
            info = self.links.get(t.iface.ifname)
            if info is None or info.kind != "xfrm" or info.if_id != t.iface.if_id:
                raise NetlinkError(errno.ENODEV, f"looking up interface {t.iface.ifname}",
                                   f"the tunnel's XFRM interface {t.iface.ifname} (if_id {t.iface.if_id:#x}) "
                                   f"does not exist; add_tunnel() or reconcile() creates it")
            t.index = info.index
        return info

    def tunnel_of(self, if_id: int) -> str | None:
        for name, t in self._tunnels.items():
            if t.iface.if_id == if_id:
                return name
        return None

    def status(self, tunnel: str) -> TunnelStatus:
        t = self._tunnel(tunnel, "reading the status")
        info = self.links.by_index(t.index)
        return TunnelStatus(tunnel=tunnel, ifname=t.iface.ifname, if_id=t.iface.if_id, ifindex=t.index,
                            up=bool(info and info.up), mtu=t.mtu, child_sas=tuple(t.children), outbound=t.active,
                            endpoints=t.policies)

    def known(self, tunnel: str) -> TunnelStatus:
        """`status` from the data plane's own records, without asking the kernel (the per-event
        path, issue 13): `up` says whether the tunnel has a Child SA (its interface is up then)."""
        t = self._tunnel(tunnel, "reading the status")
        return TunnelStatus(tunnel=tunnel, ifname=t.iface.ifname, if_id=t.iface.if_id, ifindex=t.index,
                            up=bool(t.children), mtu=t.mtu, child_sas=tuple(t.children), outbound=t.active,
                            endpoints=t.policies)

    def has_tunnel(self, tunnel: str) -> bool:
        return tunnel in self._tunnels

    def tunnels(self) -> list[str]:
        return sorted(self._tunnels)

    # --- kernel steps with their undo ---------------------------------------------------------

    def _add_sa(self, tx: _Transaction, spec: SaSpec) -> None:
        self.xfrm.add_sa(spec)
        tx.added(f"the {spec.describe()}", lambda: self.xfrm.delete_sa(spec.dst, spec.spi, missing_ok=True))

    def _add_batch(self, tx: _Transaction, sas: tuple[SaSpec, ...], policies: list[PolicySpec]) -> None:
        """`sas` or `policies` in one netlink batch (one round trip, issue 13); what went in is
        undone with the transaction if anything failed, the first failure is raised."""
        results = self.xfrm.batch([self.xfrm.add_sa_request(s) for s in sas]
                                  + [self.xfrm.add_policy_request(s) for s in policies])
        for sa, err in zip(sas, results):
            if err is None:
                tx.added(f"the {sa.describe()}", lambda s=sa: self.xfrm.delete_sa(s.dst, s.spi, missing_ok=True))
        for spec, err in zip(policies, results[len(sas):]):
            if err is None:
                tx.added(f"the {spec.direction} policy {spec.selector}",
                         lambda s=spec: self.xfrm.delete_policy(s.direction, s.selector, s.if_id, missing_ok=True))
        for err in results:
            if err is not None:
                raise err

    def _add_policies(self, tx: _Transaction, t: _Tunnel, ep: Endpoints) -> None:
        self._add_batch(tx, (), _policy_specs(t, ep))

    def _move_policies(self, tx: _Transaction, t: _Tunnel, old: Endpoints, new: Endpoints) -> None:
        for spec, back in zip(_policy_specs(t, new), _policy_specs(t, old)):
            self.xfrm.add_policy(spec, update=True)
            tx.added(f"the move of the {back.direction} policy {back.selector}",
                     lambda b=back: self.xfrm.add_policy(b, update=True))

    def _apply_clamps(self, clamps: dict[str, nft.MssClamp], changed: Iterable[str] | None = None) -> None:
        """The table goes from clamping self._clamps to `clamps`: only the tunnels that differ
        (`changed`, when the caller knows them) are touched (one nft transaction), never the
        whole table unless its state is unknown."""
        if self._clamp_table is not None:
            self._clamp_table.sync(self._clamps, clamps, changed)
        self._clamps = clamps

    def _hook_up(self, tx: _Transaction, t: _Tunnel, link: LinkInfo, child: ChildSa) -> TunnelMtu:
        """MTU from the transform, interface up, MSS clamp in the nft table."""
        mtu = tunnel_mtu(t.iface, child, self.links.underlay_mtu(child.endpoints.remote))
        new_mtu = mtu.mtu if link.mtu != mtu.mtu else None
        if new_mtu is not None or not link.up:
            # one RTM_NEWLINK for both (issue 13: every round trip counts per Child SA)
            self.links.set_link(link.index, mtu=new_mtu, up=True if not link.up else None)
            tx.added(f"{link.ifname} " + ", ".join(
                     ([f"MTU {mtu.mtu} (was {link.mtu})"] if new_mtu is not None else [])
                     + (["up"] if not link.up else [])),
                     lambda: self.links.set_link(link.index, mtu=link.mtu if new_mtu is not None else None,
                                                 up=False if not link.up else None))
        # the kernel drops IPv6 addresses when an interface goes down (keep_addr_on_down=0)
        self.links.sync_addresses(link.index, t.iface.addresses)
        clamp = nft.MssClamp(t.iface.tunnel, t.iface.ifname, mtu.mss4, mtu.mss6)
        if self._clamps.get(t.iface.tunnel) != clamp:
            before = dict(self._clamps)
            self._apply_clamps({**self._clamps, t.iface.tunnel: clamp}, (t.iface.tunnel,))
            tx.added("the MSS clamp", lambda: self._apply_clamps(before, (t.iface.tunnel,)))
        return mtu

    def _fire(self, event: str, t: _Tunnel, child: ChildSa | None, old: ChildSa | None = None) -> None:
        if self.hooks is not None:
            self.hooks.fire(hook_environment(event, t.iface, t.index, child, t.mtu, self.netns, old))

    # --- the operations ------------------------------------------------------------------------

    def install(self, tunnel: str, child: ChildSa) -> TunnelMtu:
        """Bring the tunnel up with its first Child SA: inbound and outbound SA, the six 0/0 and
        ::/0 policies (out, in, fwd), the MTU, the MSS clamp, interface up, user hooks ``up``."""
        action = f"installing Child SA {child.spi_in:#010x}/{child.spi_out:#010x}"
        t = self._tunnel(tunnel, action)
        if t.children:
            raise DataplaneError(tunnel, action, f"the tunnel already has Child SA(s) "
                                 f"{', '.join(f'{s:#010x}' for s in t.children)}: use rekey() or down() first")
        tx = _Transaction(tunnel, action)
        try:
            link = self._present_link(t)
            # both SAs in one batch, then (if they went in) the six policies in another
            self._add_batch(tx, (_spec(t, child, outbound=False), _spec(t, child, outbound=True)), [])
            self._add_policies(tx, t, child.endpoints)
            mtu = self._hook_up(tx, t, link, child)
        except _FAILURES as e:
            raise tx.failed(e) from None
        t.children[child.spi_in] = child
        t.out_installed.add(child.spi_in)
        t.active = child.spi_in
        t.policies = child.endpoints
        t.mtu = mtu
        # debug: the daemon logs the same facts at INFO once the job is done (one line per SA)
        log.debug("tunnel %s up on %s: Child SA %#010x/%#010x, MTU %d", tunnel, t.iface.ifname, child.spi_in,
                  child.spi_out, mtu.mtu)
        self._fire("up", t, child)
        return mtu

    def rekey(self, tunnel: str, new: ChildSa, *, outbound: bool = True) -> TunnelMtu | None:
        """Install the Child SA replacing the current one: its inbound SA, then (``outbound``) its
        outbound SA, and only then withdraw the old outbound SA. The old inbound SA stays until
        :meth:`retire`. With ``outbound=False`` only the inbound SA goes in; call
        :meth:`activate_outbound` when the peer is ready to receive on the new SA."""
        action = f"rekeying to Child SA {new.spi_in:#010x}/{new.spi_out:#010x}"
        t = self._tunnel(tunnel, action)
        if t.active is None:
            raise DataplaneError(tunnel, action, "the tunnel has no Child SA to rekey: use install()")
        if new.spi_in in t.children:
            raise DataplaneError(tunnel, action, f"Child SA {new.spi_in:#010x} is already installed")
        if new.endpoints != t.policies:
            raise DataplaneError(tunnel, action, f"the new Child SA's endpoints {new.endpoints} differ from the "
                                                 f"tunnel's {t.policies}: call update_endpoints() first")
        old = t.children[t.active]
        tx = _Transaction(tunnel, action)
        mtu = None
        try:
            link = self._present_link(t)
            self._add_sa(tx, _spec(t, new, outbound=False))
            if outbound:
                self._add_sa(tx, _spec(t, new, outbound=True))
                mtu = self._hook_up(tx, t, link, new)
                # the withdrawal comes last: nothing after it can fail
                self.xfrm.delete_sa(old.endpoints.remote, old.spi_out, missing_ok=True)
        except _FAILURES as e:
            raise tx.failed(e) from None
        t.children[new.spi_in] = new
        if outbound:
            t.out_installed.discard(old.spi_in)
            t.out_installed.add(new.spi_in)
            t.active = new.spi_in
            t.mtu = mtu
            self._fire("rekey", t, new, old)
        log.info("tunnel %s rekeyed: Child SA %#010x/%#010x%s", tunnel, new.spi_in, new.spi_out,
                 "" if outbound else " (inbound only)")
        return mtu

    def activate_outbound(self, tunnel: str, spi_in: int) -> TunnelMtu:
        """Second half of a rekey with ``outbound=False``: the new outbound SA goes in, then the
        old one is withdrawn."""
        action = f"activating the outbound SA of Child SA {spi_in:#010x}"
        t = self._tunnel(tunnel, action)
        new = t.children.get(spi_in)
        if new is None:
            raise DataplaneError(tunnel, action, f"no Child SA {spi_in:#010x} on the tunnel")
        if spi_in in t.out_installed:
            raise DataplaneError(tunnel, action, "its outbound SA is already installed")
        old = t.children[t.active] if t.active is not None else None
        tx = _Transaction(tunnel, action)
        try:
            link = self._present_link(t)
            self._add_sa(tx, _spec(t, new, outbound=True, endpoints=t.policies))
            mtu = self._hook_up(tx, t, link, new)
            if old is not None:
                self.xfrm.delete_sa(old.endpoints.remote, old.spi_out, missing_ok=True)
        except _FAILURES as e:
            raise tx.failed(e) from None
        if old is not None:
            t.out_installed.discard(old.spi_in)
        t.out_installed.add(spi_in)
        t.active = spi_in
        t.mtu = mtu
        self._fire("rekey", t, new, old)
        return mtu

    def retire(self, tunnel: str, spi_in: int) -> None:
        """Remove a replaced Child SA (its inbound SA, and its outbound SA if still there)."""
        action = f"retiring Child SA {spi_in:#010x}"
        t = self._tunnel(tunnel, action)
        child = t.children.get(spi_in)
        if child is None:
            raise DataplaneError(tunnel, action, f"no Child SA {spi_in:#010x} on the tunnel")
        if spi_in == t.active:
            raise DataplaneError(tunnel, action, "it is the Child SA carrying the tunnel's traffic: rekey() first, "
                                                 "or down() to close the tunnel")
        try:
            ep = child.endpoints
            self.xfrm.delete_sa(ep.local, child.spi_in, missing_ok=True)
            if spi_in in t.out_installed:
                self.xfrm.delete_sa(ep.remote, child.spi_out, missing_ok=True)
        except _FAILURES as e:
            raise DataplaneError(tunnel, action, _explain(e), code=getattr(e, "code", None)) from None
        del t.children[spi_in]
        t.out_installed.discard(spi_in)

    def down(self, tunnel: str) -> None:
        """Close the tunnel: every SA, the policies, the MSS clamp go; interface down; user hooks
        ``down``. Teardown goes on past failures and reports them all at the end."""
        action = "taking the tunnel down"
        t = self._tunnel(tunnel, action)
        problems: list[str] = []
        last = t.children.get(t.active) if t.active is not None else None

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except _FAILURES as e:
                problems.append(f"{what}: {_explain(e)}")

        for spi_in, child in list(t.children.items()):
            ep = child.endpoints
            attempt(f"deleting SA {child.spi_in:#010x}", lambda: self.xfrm.delete_sa(ep.local, child.spi_in, missing_ok=True))
            if spi_in in t.out_installed:
                attempt(f"deleting SA {child.spi_out:#010x}",
                        lambda: self.xfrm.delete_sa(ep.remote, child.spi_out, missing_ok=True))
        if t.policies is not None:
            reqs = [self.xfrm.delete_policy_request(s.direction, s.selector, s.if_id)
                    for s in _policy_specs(t, t.policies)]
            for err in self.xfrm.batch(reqs):
                if err is not None and err.code not in (errno.ENOENT, errno.ESRCH):
                    problems.append(str(err))
        if tunnel in self._clamps:
            attempt("removing the MSS clamp",
                    lambda: self._apply_clamps({k: v for k, v in self._clamps.items() if k != tunnel}, (tunnel,)))
        attempt(f"setting {t.iface.ifname} down", lambda: self.links.set_up(t.index, False))
        t.children.clear()
        t.out_installed.clear()
        t.active = None
        t.policies = None
        t.mtu = None
        self._fire("down", t, last)
        log.info("tunnel %s down", tunnel)
        if problems:
            raise DataplaneError(tunnel, action, "; ".join(problems))

    def update_endpoints(self, tunnel: str, endpoints: Endpoints) -> TunnelMtu:
        """Move every SA and policy of the tunnel to new outer addresses / encapsulation (MOBIKE,
        RFC 4555 §3.5). Each SA is re-created with its keys, counters and replay state; an
        outbound SA's sequence number jumps ahead by :data:`OSEQ_MARGIN`."""
        action = f"moving the tunnel to {endpoints.local} <-> {endpoints.remote}"
        t = self._tunnel(tunnel, action)
        if t.active is None or t.policies is None:
            raise DataplaneError(tunnel, action, "the tunnel has no Child SA to move")
        old_ep = t.policies
        tx = _Transaction(tunnel, action)
        try:
            link = self._present_link(t)
            for spi_in, child in t.children.items():
                directions = (False, True) if spi_in in t.out_installed else (False,)
                for outbound in directions:
                    self._move_sa(tx, t, child, outbound, child.endpoints, endpoints)
            self._move_policies(tx, t, old_ep, endpoints)
            moved = {k: dataclasses.replace(c, endpoints=endpoints) for k, c in t.children.items()}
            mtu = self._hook_up(tx, t, link, moved[t.active])
        except _FAILURES as e:
            raise tx.failed(e) from None
        t.children = moved
        t.policies = endpoints
        t.mtu = mtu
        self._fire("update", t, moved[t.active])
        return mtu

    def _move_sa(self, tx: _Transaction, t: _Tunnel, child: ChildSa, outbound: bool, old_ep: Endpoints,
                 new_ep: Endpoints) -> None:
        old_spec = _spec(t, child, outbound, old_ep)
        state = self.xfrm.get_sa(old_spec.dst, old_spec.spi)
        if state is None:
            return  # expired meanwhile: nothing to move
        r = state.replay
        if outbound:
            replay = _advance(r, OSEQ_MARGIN, child.esn, child.spi_out)
            # if the move is undone, the old SA must not reuse what the new one may have sent
            back = _advance(replay, OSEQ_MARGIN, child.esn, child.spi_out)
        else:
            replay = back = r
        new_spec = _spec(t, child, outbound, new_ep, replay, state.current)
        restore = dataclasses.replace(old_spec, replay=back, current=state.current)
        self.xfrm.delete_sa(old_spec.dst, old_spec.spi)
        tx.added(f"the removal of the {old_spec.describe()}", lambda: self.xfrm.add_sa(restore))
        self.xfrm.add_sa(new_spec)
        tx.added(f"the {new_spec.describe()}",
                 lambda: self.xfrm.delete_sa(new_spec.dst, new_spec.spi, missing_ok=True))

    def counters(self, tunnel: str) -> list[ChildSaCounters]:
        """Counters and replay state of every Child SA of the tunnel, oldest first."""
        t = self._tunnel(tunnel, "reading counters")
        out = []
        for spi_in, child in t.children.items():
            ep = child.endpoints
            try:
                sin = self.xfrm.get_sa(ep.local, child.spi_in)
                sout = self.xfrm.get_sa(ep.remote, child.spi_out) if spi_in in t.out_installed else None
            except _FAILURES as e:
                raise DataplaneError(tunnel, "reading counters", _explain(e), code=getattr(e, "code", None)) from None
            out.append(ChildSaCounters(child.spi_in, child.spi_out,
                                       SaCounters.from_state(sin, False) if sin else None,
                                       SaCounters.from_state(sout, True) if sout else None))
        return out

    def packet_counters(self) -> dict[str, tuple[int, int]]:
        """tunnel -> (packets decrypted, packets encrypted) on its interface, for every tunnel,
        from one dump of the namespace's link counters whatever the number of tunnels (the
        daemon's liveness poll; SA-by-SA reads cost two requests per tunnel, issue 13)."""
        by_index = self.links.packet_counters()
        return {name: by_index[t.index] for name, t in self._tunnels.items() if t.index in by_index}

    # --- tunnels (interfaces) ------------------------------------------------------------------

    def add_tunnel(self, iface: TunnelInterface) -> LinkInfo:
        """Register a tunnel and make its interface exist (created down, or adopted)."""
        action = f"adding interface {iface.ifname}"
        if iface.tunnel in self._tunnels:
            raise DataplaneError(iface.tunnel, action, "the tunnel is already in the data plane")
        check_unique_if_ids([t.iface for t in self._tunnels.values()] + [iface])
        try:
            info = self._adopt_or_create(iface)
        except _FAILURES as e:
            raise DataplaneError(iface.tunnel, action, _explain(e), code=getattr(e, "code", None)) from None
        self._tunnels[iface.tunnel] = _Tunnel(iface, info.index)
        return info

    def remove_tunnel(self, tunnel: str) -> None:
        """Take the tunnel down if needed and delete its interface."""
        t = self._tunnel(tunnel, "removing the tunnel")
        if t.children:
            self.down(tunnel)
        try:
            self.links.delete(t.index)
        except _FAILURES as e:
            raise DataplaneError(tunnel, "removing the tunnel", _explain(e)) from None
        del self._tunnels[tunnel]

    def _adopt_or_create(self, iface: TunnelInterface) -> LinkInfo:
        info = self.links.get(iface.ifname)
        if info is not None:
            if not self._matches(info, iface):
                if info.ours:
                    self.links.delete(info.index)
                else:
                    raise NetlinkError(errno.EEXIST, f"creating interface {iface.ifname}",
                                       f"a {info.kind or 'non-XFRM'} interface named {iface.ifname} exists and is "
                                       f"not Isthmus's (if_id {info.if_id}); rename one of them")
            else:
                if info.up:
                    self.links.set_up(info.index, False)
                self.links.set_alias(info.index, iface.tunnel)
                self.links.sync_addresses(info.index, iface.addresses)
                return self.links.by_index(info.index) or info
        return self.links.create(iface)

    def _matches(self, info: LinkInfo, iface: TunnelInterface) -> bool:
        if not info.ours or info.if_id != iface.if_id:
            return False
        if iface.underlay is None:
            return not info.link
        under = self.links.get(iface.underlay)
        return under is not None and info.link == under.index

    def reconcile(self, tunnels: Iterable[TunnelInterface]) -> ReconcileReport:
        """At start: make the kernel hold exactly the configured tunnels' interfaces (down, with
        their if_id and addresses) and nothing else of ours: XFRM interfaces with an if_id in our
        range that are not configured go, every SA and policy in our range goes (no IKE SA survived
        to own them), and the MSS table is emptied. Objects outside our range are never touched."""
        tunnels = list(tunnels)
        check_unique_if_ids(tunnels)
        busy = [n for n, t in self._tunnels.items() if t.children]
        if busy:
            raise DataplaneError(busy[0], "reconciling", "tunnels are up: reconcile() is for start-up only")
        self._tunnels.clear()
        created, adopted, removed, errors = [], [], [], []
        wanted = {t.ifname: t for t in tunnels}
        present = {}
        for info in self.links.all_links():
            present[info.ifname] = info
            if not info.ours:
                continue
            want = wanted.get(info.ifname)
            if want is None or not self._matches(info, want):
                try:
                    self.links.delete(info.index)
                    removed.append(info.ifname)
                    del present[info.ifname]
                except _FAILURES as e:
                    errors.append(f"interface {info.ifname}: {_explain(e)}")
        # interfaces that exist are adopted one by one; the missing ones (all of them on a fresh
        # boot) are created in a few batched round trips (issue 13: 1,000 tunnels in seconds)
        fresh = [iface for iface in tunnels if iface.ifname not in present]
        made, failed = self.links.create_many(fresh) if fresh else ({}, {})
        for iface in tunnels:
            if iface.ifname in failed:
                errors.append(f"tunnel {iface.tunnel!r}: {_explain(failed[iface.ifname])}")
                continue
            info = made.get(iface.ifname)
            if info is None:
                existed = present.get(iface.ifname)
                try:
                    info = self._adopt_or_create(iface)
                except _FAILURES as e:
                    errors.append(f"tunnel {iface.tunnel!r}: {_explain(e)}")
                    continue
                (adopted if existed is not None and existed.index == info.index else created).append(iface.ifname)
            else:
                created.append(iface.ifname)
            self._tunnels[iface.tunnel] = _Tunnel(iface, info.index)
        stale: list[str] = []
        try:
            n_sas, n_pols = self.xfrm.flush_ours()
            if self.nft_enabled:
                previous = nft.read_clamps(self.netns) or []
                stale = sorted({c.tunnel for c in previous})
                if self._clamp_table is not None:
                    self._clamp_table.reset([])
        except _FAILURES as e:
            raise DataplaneError("(all)", "reconciling", _explain(e), code=getattr(e, "code", None)) from None
        self._clamps = {}
        report = ReconcileReport(created=tuple(created), adopted=tuple(adopted), removed_interfaces=tuple(removed),
                                 removed_sas=n_sas, removed_policies=n_pols, removed_clamps=tuple(stale),
                                 errors=tuple(errors))
        log.info("reconciled: %s", report)
        return report

    def remove_all(self) -> None:
        """Remove everything of ours from the namespace (interfaces, SAs, policies, nft table)."""
        for info in self.links.xfrm_links():
            if info.ours:
                self.links.delete(info.index)
        self.xfrm.flush_ours()
        if self.nft_enabled:
            nft.remove(self.netns)
            if self._clamp_table is not None:
                self._clamp_table.forget()
        self._tunnels.clear()
        self._clamps = {}

    # --- events --------------------------------------------------------------------------------

    def events(self) -> "DataplaneEvents":
        """A subscription to the kernel's EXPIRE and ACQUIRE notifications for our tunnels."""
        return DataplaneEvents(self)

    def _expire(self, msg) -> ChildSaExpire | None:
        s = decode_sa(msg)
        if not s.ours:
            return None
        tunnel = self.tunnel_of(s.if_id)
        outbound = spi_in = None
        if tunnel is not None:
            for k, c in self._tunnels[tunnel].children.items():
                if c.spi_in == s.spi:
                    outbound, spi_in = False, k
                elif c.spi_out == s.spi:
                    outbound, spi_in = True, k
        return ChildSaExpire(tunnel=tunnel, if_id=s.if_id, spi=s.spi, outbound=outbound, spi_in=spi_in,
                             hard=bool(msg["hard"]), bytes=s.current.bytes, packets=s.current.packets)

    def _acquire(self, msg) -> TunnelAcquire | None:
        if_id = 0
        local = remote = None
        for name, value in msg["attrs"]:
            if name == "XFRMA_IF_ID":
                if_id = value
            elif name == "XFRMA_TMPL" and value["templates"]:
                tm = value["templates"][0]
                try:
                    local, remote = addr_from(tm["saddr"], tm["family"]), addr_from(tm["id_daddr"], tm["family"])
                except ValueError:
                    pass
        if not IF_ID_MIN <= if_id <= IF_ID_MAX:
            return None
        return TunnelAcquire(tunnel=self.tunnel_of(if_id), if_id=if_id, local=local, remote=remote)


class DataplaneEvents:
    """Non-blocking reader of EXPIRE (soft/hard) and ACQUIRE events for the Dataplane's tunnels.

    ``fileno()`` goes to ``loop.add_reader``; ``read()`` returns the events waiting now. Events
    about SAs outside Isthmus's if_id range are dropped.
    """

    def __init__(self, dp: Dataplane):
        self.dp = dp
        self.sock = XfrmEventSocket((m.XFRMNLGRP_ACQUIRE, m.XFRMNLGRP_EXPIRE), dp.netns)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[ChildSaExpire | TunnelAcquire]:
        out: list[ChildSaExpire | TunnelAcquire] = []
        for msg in self.sock.read():
            kind = msg["header"]["type"]
            ev = None
            if kind == m.XFRM_MSG_EXPIRE:
                ev = self.dp._expire(msg)
            elif kind == m.XFRM_MSG_ACQUIRE:
                ev = self.dp._acquire(msg)
            if ev is not None:
                out.append(ev)
        return out

    def close(self) -> None:
        self.sock.close()
