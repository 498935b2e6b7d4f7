"""The daemon's data plane thread: the IKE engine's Child SA events applied to the kernel.

Everything here runs in one thread (the daemon's single-thread executor), because a
:class:`~appliance.xfrm.Dataplane` and pyroute2's IPRoute belong to the thread that uses them. Jobs
run in the order the engine reported the events, so the kernel follows the engine step by step.

How the engine's events map onto the data plane (docs/ike-engine.md, docs/dataplane.md):

=============================  ====================================================================
ChildSaInstalled               first pair of the tunnel: ``install`` (SAs, policies, MTU, MSS
                               clamp, interface up) and the tunnel's static routes go in;
                               a further pair (a rekey, RFC 7296 §2.8, or a crossing CREATE_CHILD_SA):
                               ``rekey`` (new inbound SA, then - unless ``outbound`` is false - the
                               new outbound SA replaces the old one)
ChildSaOutboundInstalled       ``activate_outbound``: the rekey responder sends on the new pair now
ChildSaOutboundRemoved         nothing: the pair's outbound SA goes with its ChildSaDeleted, or was
                               already replaced by the successor's
ChildSaDeleted                 the tunnel's last pair: routes withdrawn, then ``down``;
                               otherwise ``retire`` (after moving traffic to the newest pair if the
                               deleted one was carrying it)
=============================  ====================================================================

Every job returns a :class:`DpResult`; failures are returned, never raised, with the data plane's
own message (it names the tunnel, the step and the kernel's reason).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.ike import events as ev
from appliance.static_routes import RouteProblem, StaticRoutes
from appliance.tunnels import TunnelPlan, endpoints_of, kernel_child
from appliance.xfrm import (ChildSaCounters, Dataplane, DataplaneError, DataplaneInputError, HookResult,
                            ReconcileReport, TunnelMtu)
from appliance.xfrm.netlink import NamespaceError, NetlinkError

log = logging.getLogger("isthmus.dataplane")

_FAILURES = (DataplaneError, DataplaneInputError, NetlinkError, NamespaceError, OSError)


@dataclass
class DpResult:
    """What a job did: ``up``, ``rekeyed``, ``outbound`` (rekey responder switched), ``retired``,
    ``moved`` (the SAs follow the peer's new address/port),
    ``down``, ``ignored`` (nothing of ours to act on) or ``failed`` (``error`` says why)."""

    kind: str
    tunnel: str
    spi_in: int = 0
    spi_out: int = 0
    mtu: TunnelMtu | None = None
    interface: str | None = None
    error: str | None = None
    routes: tuple = ()                     # prefixes installed (up) or withdrawn (down)
    route_problems: list[RouteProblem] = field(default_factory=list)
    seconds: float = 0.0                   # how long the kernel work took


class DataplaneWorker:
    """Owns the Dataplane and the static routes; every method runs in the data plane thread."""

    def __init__(self) -> None:
        self.dp: Dataplane | None = None
        self.routes = StaticRoutes()
        self.plans: dict[str, TunnelPlan] = {}

    # ------------------------------------------------------------------ life cycle
    def open(self, hooks_dir: str | None, on_hook_result=None) -> None:
        hooks = hooks_dir if hooks_dir and Path(hooks_dir).is_dir() else None
        self.dp = Dataplane(None, hooks_dir=hooks, on_hook_result=on_hook_result)

    def reconcile(self, plans: dict[str, TunnelPlan]) -> tuple[ReconcileReport, int]:
        """Start-up: the kernel holds exactly the configured interfaces and nothing else of ours
        (SAs, policies, MSS rules, routes an earlier run left)."""
        assert self.dp is not None
        self.plans = dict(plans)
        report = self.dp.reconcile([p.interface for p in plans.values()])
        flushed = self.routes.flush_ours()
        return report, flushed

    def close(self) -> None:
        if self.dp is not None:
            self.dp.close()
            self.dp = None
        self.routes.close()

    def teardown(self) -> list[str]:
        """Clean shutdown: routes, SAs, policies, MSS rules and interfaces of ours are removed."""
        problems = []
        try:
            self.routes.flush_ours()
        except Exception as e:  # noqa: BLE001 - keep going: the rest must go too
            problems.append(f"routes: {e}")
        if self.dp is not None:
            try:
                self.dp.remove_all()
            except Exception as e:  # noqa: BLE001
                problems.append(str(e))
        return problems

    def set_static_metric(self, metric: int | None) -> list[str]:
        """bgp.prefer_static (appliance/static_routes.py): the metric of the static routes; the
        ones in the kernel now move to it (start-up: none are). Returns the problems."""
        if metric == self.routes.metric:
            return []
        installed = set(self.routes.ours())
        moves = []
        if self.dp is not None:
            for name, plan in self.plans.items():
                if name not in self.dp.tunnels():
                    continue
                try:
                    ifindex = self.dp.status(name).ifindex
                except _FAILURES:
                    continue
                moves.append((ifindex, [p for p in plan.routes if (p, ifindex) in installed]))
        return [str(p) for p in self.routes.set_metric(metric, moves)]

    # ------------------------------------------------------------------ reload
    def remove_tunnel(self, name: str) -> list[str]:
        """A tunnel left the config (or changed): its routes, SAs, policies and interface go."""
        problems: list[str] = []
        plan = self.plans.pop(name, None)
        if self.dp is None or name not in self.dp.tunnels():
            return problems
        if plan is not None:
            try:
                ifindex = self.dp.status(name).ifindex
                problems += [str(p) for p in self.routes.withdraw(ifindex, plan.routes)]
            except _FAILURES as e:
                problems.append(str(e))
        try:
            self.dp.remove_tunnel(name)
        except _FAILURES as e:
            problems.append(str(e))
        return problems

    def add_tunnel(self, plan: TunnelPlan) -> str | None:
        """A tunnel joined the config: its interface is created (down). Returns an error text."""
        self.plans[plan.name] = plan
        if self.dp is None:
            return "the data plane is not open"
        try:
            self.dp.add_tunnel(plan.interface)
        except _FAILURES as e:
            return str(e)
        return None

    # ------------------------------------------------------------------ engine events
    def apply(self, e: ev.Event) -> DpResult:
        name = e.tunnel
        t0 = time.monotonic()
        try:
            r = self._apply(e)
        except _FAILURES as exc:
            spi_in = getattr(e, "spi_in", 0)
            spi_out = getattr(e, "spi_out", 0)
            r = DpResult("failed", name, spi_in, spi_out, error=str(exc))
        r.seconds = time.monotonic() - t0
        return r

    def _apply(self, e: ev.Event) -> DpResult:
        dp = self.dp
        name = e.tunnel
        plan = self.plans.get(name)
        if dp is None or plan is None:
            if isinstance(e, ev.ChildSaInstalled):
                return DpResult("failed", name, e.spi_in, e.spi_out,
                                error=f"tunnel {name!r} is not (or no longer) configured; Child SA not installed")
            return DpResult("ignored", name)
        if not dp.has_tunnel(name):
            if not isinstance(e, ev.ChildSaInstalled):
                return DpResult("ignored", name)
            # the interface could not be made at start (or was removed under us): try again, so
            # the error names what the kernel says about it now
            dp.add_tunnel(plan.interface)
        status = dp.known(name)
        ifname = plan.interface.ifname
        if isinstance(e, ev.ChildSaInstalled):
            child = kernel_child(e)
            if not status.child_sas:
                mtu = dp.install(name, child)
                problems = self.routes.install(dp.known(name).ifindex, plan.routes) if plan.routes else []
                installed = tuple(p for p in plan.routes if p not in {x.prefix for x in problems})
                return DpResult("up", name, e.spi_in, e.spi_out, mtu=mtu, interface=ifname, routes=installed,
                                route_problems=problems)
            if status.endpoints is not None and child.endpoints != status.endpoints:
                dp.update_endpoints(name, child.endpoints)
            mtu = dp.rekey(name, child, outbound=e.outbound)
            return DpResult("rekeyed", name, e.spi_in, e.spi_out, mtu=mtu, interface=ifname)
        if isinstance(e, ev.ChildSaOutboundInstalled):
            if e.spi_in in status.child_sas and status.outbound != e.spi_in:
                mtu = dp.activate_outbound(name, e.spi_in)
                return DpResult("outbound", name, e.spi_in, e.spi_out, mtu=mtu, interface=ifname)
            return DpResult("ignored", name, e.spi_in, e.spi_out)
        if isinstance(e, ev.IkeSaAddressesUpdated):
            # a NAT rebinding (RFC 7296 §2.23): every SA and policy moves in place, no rekey
            ep = endpoints_of(e)
            if not status.child_sas or status.endpoints == ep:
                return DpResult("ignored", name)
            mtu = dp.update_endpoints(name, ep)
            return DpResult("moved", name, mtu=mtu, interface=ifname)
        if isinstance(e, ev.ChildSaDeleted):
            if e.spi_in not in status.child_sas:
                return DpResult("ignored", name, e.spi_in, e.spi_out)
            if status.child_sas == (e.spi_in,):
                # the tunnel's last pair: withdraw its routes first, then take it down
                problems = self.routes.withdraw(status.ifindex, plan.routes)
                dp.down(name)
                return DpResult("down", name, e.spi_in, e.spi_out, interface=ifname, routes=plan.routes,
                                route_problems=problems)
            if status.outbound == e.spi_in:
                newest = [s for s in status.child_sas if s != e.spi_in][-1]
                dp.activate_outbound(name, newest)
            dp.retire(name, e.spi_in)
            return DpResult("retired", name, e.spi_in, e.spi_out, interface=ifname)
        return DpResult("ignored", name)

    def down(self, name: str) -> DpResult:
        """Take a tunnel down after a failure (whatever is left of it)."""
        if self.dp is None or name not in self.dp.tunnels():
            return DpResult("ignored", name)
        plan = self.plans.get(name)
        try:
            status = self.dp.status(name)
            if not status.child_sas:
                return DpResult("ignored", name)
            problems = self.routes.withdraw(status.ifindex, plan.routes) if plan else []
            self.dp.down(name)
        except _FAILURES as exc:
            return DpResult("failed", name, error=str(exc))
        return DpResult("down", name, interface=plan.interface.ifname if plan else None,
                        routes=plan.routes if plan else (), route_problems=problems)

    # ------------------------------------------------------------------ status
    def counters(self) -> dict[str, list[ChildSaCounters]]:
        out: dict[str, list[ChildSaCounters]] = {}
        if self.dp is None:
            return out
        for name in self.dp.tunnels():
            try:
                out[name] = self.dp.counters(name)
            except _FAILURES as e:
                log.debug("counters of %s: %s", name, e)
        return out

    def traffic(self) -> dict[str, tuple[int, int]]:
        """tunnel -> (packets in, packets out) of its interface (one dump); {} if unreadable."""
        if self.dp is None:
            return {}
        try:
            return self.dp.packet_counters()
        except _FAILURES as e:
            log.debug("interface counters: %s", e)
            return {}

    def installed_routes(self) -> set[tuple[str, int]]:
        """(prefix text, ifindex) of our routes in the kernel now."""
        try:
            return {(str(p), i) for p, i in self.routes.ours()}
        except Exception as e:  # noqa: BLE001 - status output must not fail on this
            log.debug("reading routes: %s", e)
            return set()

    def ifindexes(self) -> dict[str, int]:
        if self.dp is None:
            return {}
        out = {}
        for name in self.dp.tunnels():
            try:
                out[name] = self.dp.status(name).ifindex
            except _FAILURES:
                pass
        return out


def describe_hook(r: HookResult) -> str:
    state = "timed out" if r.timed_out else f"exit status {r.returncode}"
    return f"user hook {r.hook} ({r.event}) {state}"
