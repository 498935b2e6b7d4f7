"""The route manager: tunnels' Child SAs -> ExaBGP neighbors, ExaBGP <-> RIB <-> kernel FIB.

:class:`RouteManager` lives in isthmusd's event loop (the daemon calls :meth:`tunnel_up` /
:meth:`tunnel_down` from its data plane results and IKE events, and :meth:`reload`); tests drive
the same methods directly, with a veth standing in for the XFRM interface.

* A neighbor is in ExaBGP's configuration only while its tunnel has a Child SA (and is not
  held down by a max-prefix ``restart``): :meth:`tunnel_up` adds it, :meth:`tunnel_down` removes
  it. Either way ExaBGP reloads (SIGUSR1) and keeps every other session as it is.
* Tunnel down (Child SA gone, peer dead, tunnel removed): ``rib.neighbor_down`` at once, the
  FIB follows in the same call (the next best path, e.g. the other tunnel, or nothing) - not
  after the hold timer.
* Updates from ExaBGP go through ``rib.update`` (policy, best path, ECMP); what changes in the
  Loc-RIB is written to the FIB (:mod:`bgp.fib`), what changes for a neighbor is announced or
  withdrawn through ExaBGP.
* ExaBGP restarts (it died, or its API connection dropped): the FIB and the RIB are kept as they
  are; what each neighbor had announced is marked stale; as the sessions come back, routes are
  re-learned (unchanged ones cause no kernel write), our announcements are sent again, and at
  each neighbor's End-of-RIB (or after :data:`STALE_TIMEOUT`) what it did not announce again is
  withdrawn. Nothing is flushed first; the FIB is then reconciled against the RIB.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netaddr import IPAddress, IPNetwork

from bgp import exabgp
from bgp.exabgp import ApiMessage, NeighborSpec
from bgp.fib import Fib
from bgp.policy import PolicyEngine, with_changes
from bgp.rib import Rib, RibChange
from bgp.speaker import Speaker

log = logging.getLogger("isthmus.bgp")

STALE_TIMEOUT = 120.0          # seconds to wait for a neighbor's End-of-RIB after an ExaBGP restart
STALE_QUIET = 3.0              # ... or, for peers that send no End-of-RIB (no graceful restart negotiated:
                               # GoBGP), this long without an update once the session is up again
DEFAULT_RESTART_DELAY = 60.0
TICK = 1.0                     # seconds between dampening reuse checks
QUIET_EVENTS = {"bgp_update_ignored", "bgp_unknown_neighbor"}   # rib bookkeeping, not for the event stream


def bgp_wanted(config: Any) -> bool:
    """Does this config need the route manager (a bgp: section and a tunnel with a bgp block)?"""
    return config.bgp is not None and any(t.bgp is not None for t in config.tunnels.values())


@dataclass
class NeighborState:
    tunnel: str
    specs: list[NeighborSpec]
    sessions: dict[str, str] = field(default_factory=dict)      # peer address -> up | down | connected
    since: float | None = None             # Established since (monotonic)
    last_error: str | None = None
    hold_time: int | None = None           # negotiated
    router_id: IPAddress | None = None
    transitions: int = 0
    last_update: float = 0.0
    held_until: float | None = None        # max-prefix restart: not configured until then

    @property
    def established(self) -> bool:
        return any(s == "up" for s in self.sessions.values())


class RouteManager:
    def __init__(self, config: Any, workdir: str | os.PathLike[str], *, netns: str | None = None,
                 publish: Callable[..., Any] | None = None, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic, stale_timeout: float = STALE_TIMEOUT,
                 exabgp_argv: list[str] | None = None) -> None:
        self.clock = clock
        self.publish = publish or (lambda *a, **k: None)
        self.metrics = metrics
        self.stale_timeout = stale_timeout
        self.config = config
        self.up: set[str] = set()                 # tunnels with a Child SA
        self.neighbors: dict[str, NeighborState] = {}
        self.by_peer: dict[IPAddress, str] = {}
        self.learned: dict[str, set[IPNetwork]] = {}
        self.stale: dict[str, set[IPNetwork]] = {}
        self.fib_errors = 0
        self.ecmp_routes = 0
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._stale_timer: asyncio.TimerHandle | None = None
        self._connections = 0
        self._ticker: asyncio.Future | None = None
        self._ifindex: dict[str, int] = {}
        self.fib = Fib(netns)
        # pyroute2's IPRoute cannot live in a thread running an asyncio loop: every FIB write
        # runs, in order, on this one thread (a job is queued at once, never awaited)
        self._fibq = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="isthmus-fib")
        self.speaker = Speaker(workdir, on_message=self._on_message, on_connected=self._on_connected,
                               on_disconnected=self._on_disconnected, neighbor_name=self._lookup, netns=netns,
                               exabgp_argv=exabgp_argv)
        self._build(config)

    # ------------------------------------------------------------------ config
    def _bgp_tunnels(self, config: Any) -> dict[str, Any]:
        return {n: t for n, t in config.tunnels.items() if t.bgp is not None}

    def _build(self, config: Any) -> None:
        self.config = config
        self._gw_cache: dict[tuple[str, IPAddress], IPAddress] = {}     # a new one per config (FIB thread reads)
        self.policy = PolicyEngine(config.bgp, self._bgp_tunnels(config))
        self.rib = Rib(config.bgp, self._bgp_tunnels(config), self.policy)
        self._specs(config)

    def _specs(self, config: Any) -> None:
        specs = exabgp.neighbors_for(config)
        old = self.neighbors
        self.neighbors = {}
        for name, ss in specs.items():
            st = old.get(name) or NeighborState(name, ss)
            st.specs = ss
            self.neighbors[name] = st
        self.by_peer = {s.peer_address: name for name, ss in specs.items() for s in ss}

    def _lookup(self, peer: IPAddress) -> str:
        return self.by_peer.get(peer, "")

    def _render(self) -> str:
        now = self.clock()
        active = [s for name, st in self.neighbors.items() if name in self.up
                  and (st.held_until is None or st.held_until <= now) for s in st.specs]
        return exabgp.render_config(active, self.speaker.relay_argv())

    def _reconfigure_speaker(self) -> None:
        self.speaker.configure(self._render())

    # ------------------------------------------------------------------ life cycle
    def _fib_submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        fut = self._fibq.submit(fn, *args)

        def done(f: concurrent.futures.Future) -> None:
            exc = f.exception()
            if exc is not None:
                log.error("FIB job failed: %s", exc, exc_info=exc)
        fut.add_done_callback(done)
        return fut

    def fib_barrier(self) -> concurrent.futures.Future:
        """Done when every FIB job queued so far is (tests, show)."""
        return self._fibq.submit(lambda: None)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(self._fibq, self.fib.reconcile, {})   # leftovers of an earlier run
        if report.removed:
            log.info("FIB: %d BGP route(s) left by an earlier run removed", report.removed)
        await self.speaker.start(self._render())
        self._ticker = asyncio.ensure_future(self._tick_loop())

    async def _tick_loop(self) -> None:
        """Dampening: suppressed routes are reused when their penalty has decayed (rib.tick)."""
        while True:
            await asyncio.sleep(TICK)
            try:
                due = self.rib.next_tick()
                if due is not None and due <= self.clock():
                    self._apply(self.rib.tick(self.clock()))
            except Exception:  # noqa: BLE001
                log.exception("dampening tick failed")

    async def stop(self, flush: bool = True) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        await self.speaker.stop()
        loop = asyncio.get_running_loop()
        if flush:
            n = await loop.run_in_executor(self._fibq, self.fib.flush)
            log.info("FIB: %d BGP route(s) removed", n)
        await loop.run_in_executor(self._fibq, self.fib.close)
        self._fibq.shutdown(wait=True)

    async def reload(self, config: Any, up: set[str] | None = None) -> None:
        """New validated config: policy re-evaluated on what was received, neighbors whose tunnel
        went away shut down, new ones configured if their tunnel is up (`up`: the tunnels with a
        Child SA now, as the daemon knows them); unchanged ones keep their sessions."""
        old = set(self.neighbors)
        self.config = config
        tunnels = self._bgp_tunnels(config)
        for gone in old - set(tunnels):
            self._neighbor_gone(gone, "removed from the configuration")
        self.up &= set(config.tunnels)
        if config.bgp is not None:
            self._apply(self.rib.reconfigure(config.bgp, tunnels, self.clock()))
        self._specs(config)
        if up is not None:
            self.up |= {n for n in up if n in self.neighbors}
        self.up &= set(self.neighbors)
        self._reconfigure_speaker()

    # ------------------------------------------------------------------ tunnel events
    def tunnel_up(self, name: str) -> None:
        """The tunnel's Child SA is installed: configure its neighbor."""
        if name not in self.neighbors:
            return
        self.up.add(name)
        self._fib_submit(self._ifindex.pop, name, None)
        log.info("tunnel up: BGP neighbor configured", extra={"tunnel": name})
        self._reconfigure_speaker()

    def tunnel_down(self, name: str, reason: str = "tunnel down") -> float:
        """Child SA gone / peer dead / tunnel removed: every route through it leaves the FIB now,
        the neighbor is shut down. Returns the seconds spent here (RIB, FIB job queued, ExaBGP told)."""
        if name not in self.neighbors:
            return 0.0
        t0 = time.perf_counter()
        self.up.discard(name)
        self._neighbor_gone(name, reason)
        self._reconfigure_speaker()
        return time.perf_counter() - t0

    def _neighbor_gone(self, name: str, reason: str) -> None:
        st = self.neighbors.get(name)
        if st is not None and st.established:
            self._session_event(st, "down", reason)
        if st is not None:
            st.sessions.clear()
            st.since = None
        self.learned.pop(name, None)
        self.stale.pop(name, None)
        ch = self.rib.neighbor_down(name, self.clock())
        self._apply(ch)
        self._fib_submit(self._ifindex.pop, name, None)
        if ch.fib_set or ch.fib_remove:
            t0 = time.monotonic()
            n_set, n_rm = len(ch.fib_set), len(ch.fib_remove)
            # written by the FIB thread once the kernel has the change (failover timing in the log)
            self._fib_submit(lambda: log.info("FIB: routes through %s gone (%s): %d replaced, %d removed in "
                                              "%.3f s", name, reason, n_set, n_rm, time.monotonic() - t0,
                                              extra={"tunnel": name}))

    # ------------------------------------------------------------------ ExaBGP
    def _on_connected(self) -> None:
        self._connections += 1
        if self._connections == 1:
            return
        # a new ExaBGP: what the old one had learned stays in the RIB and the FIB, marked stale
        for name, prefixes in self.learned.items():
            self.stale.setdefault(name, set()).update(prefixes)
        self.learned = {}
        n = sum(len(v) for v in self.stale.values())
        log.info("ExaBGP restarted: %d route(s) kept as stale until their neighbors resend them", n)
        self.publish("bgp_speaker_restarted", None, stale_routes=n, restarts=self.speaker.restarts)
        loop = asyncio.get_running_loop()
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        self._stale_timer = loop.call_later(self.stale_timeout, self._sweep_all_stale)

    def _on_disconnected(self) -> None:
        for st in self.neighbors.values():
            if st.established:
                self._session_event(st, "down", "ExaBGP stopped", publish_only=True)
            st.sessions.clear()
            st.since = None

    def _on_message(self, m: ApiMessage) -> None:
        name = self.by_peer.get(m.peer) if m.peer is not None else None
        if m.kind == "shutdown":
            return
        if name is None or name not in self.neighbors:
            log.info("ExaBGP: %s message from unknown peer %s ignored", m.kind, m.peer)
            return
        st = self.neighbors[name]
        if m.kind == "state":
            self._on_state(st, str(m.peer), m.state or "", m.reason)
        elif m.kind == "update":
            if name not in self.up:
                return      # a late update from a neighbor being shut down
            routes = m.announced
            if st.router_id is not None and routes:
                rid = st.router_id
                routes = tuple(with_changes(r, peer_router_id=rid) for r in routes)
            st.last_update = self.clock()
            learned = self.learned.setdefault(name, set())
            stale = self.stale.get(name)
            for r in routes:
                learned.add(r.prefix)
                if stale:
                    stale.discard(r.prefix)
            for p in m.withdrawn:
                learned.discard(p)
                if stale:
                    stale.discard(p)
            self._apply(self.rib.update(name, list(routes), list(m.withdrawn), self.clock()))
        elif m.kind == "eor":
            self._sweep_stale(name, 6 if m.family and m.family.startswith("ipv6") else 4)
        elif m.kind == "open":
            if m.direction == "receive" and m.router_id is not None:
                st.router_id = m.router_id
        elif m.kind == "negotiated":
            st.hold_time = m.hold_time
        elif m.kind == "notification":
            n = m.notification
            st.last_error = f"NOTIFICATION {m.direction or ''} {n.get('code')}/{n.get('subcode')} " \
                            f"{n.get('message') or ''}".replace("  ", " ").strip()
            log.warning("BGP %s", st.last_error, extra={"tunnel": name})

    def _on_state(self, st: NeighborState, peer: str, state: str, reason: str) -> None:
        was = st.established
        st.sessions[peer] = state
        if state == "up":
            if not was:
                st.since = st.last_update = self.clock()
                self._session_event(st, "up", "")
                if self.stale.get(st.tunnel):
                    self._schedule_quiet_check(st.tunnel)
            self._apply(self.rib.neighbor_up(st.tunnel, self.clock()))
        elif state == "down":
            if reason:
                st.last_error = reason
            if was and not st.established:
                self._session_event(st, "down", reason)
                st.since = None
                self.learned.pop(st.tunnel, None)
                self.stale.pop(st.tunnel, None)
                self._apply(self.rib.neighbor_down(st.tunnel, self.clock()))
            elif st.established:
                # one of the tunnel's two sessions (IPv4, IPv6) went: that family's routes go
                version = IPAddress(peer).version
                gone = [p for p in self.learned.get(st.tunnel, ()) if p.version == version]
                if gone:
                    for p in gone:
                        self.learned[st.tunnel].discard(p)
                    self._apply(self.rib.update(st.tunnel, [], gone, self.clock()))

    def _session_event(self, st: NeighborState, state: str, reason: str, publish_only: bool = False) -> None:
        st.transitions += 1
        peer = str(st.specs[0].peer_address) if st.specs else ""
        peer_as = st.specs[0].peer_as if st.specs else None
        if state == "up":
            log.info("BGP session up with %s", peer, extra={"tunnel": st.tunnel})
            self.publish("bgp_session_up", st.tunnel, peer_address=peer, peer_as=peer_as)
        else:
            log.info("BGP session down with %s: %s", peer, reason, extra={"tunnel": st.tunnel})
            self.publish("bgp_session_down", st.tunnel, peer_address=peer, peer_as=peer_as, reason=reason)
        if self.metrics is not None:
            self.metrics.bgp_session_transitions.inc(tunnel=st.tunnel, peer=peer)

    def _sweep_stale(self, name: str, version: int) -> None:
        stale = self.stale.get(name)
        if not stale:
            return
        gone = [p for p in stale if p.version == version]
        for p in gone:
            stale.discard(p)
        if gone:
            log.info("%d stale route(s) not announced again after the ExaBGP restart: withdrawn", len(gone),
                     extra={"tunnel": name})
            self._apply(self.rib.update(name, [], gone, self.clock()))
        if not stale:
            self.stale.pop(name, None)
        if not self.stale:
            self._resynced()

    def _schedule_quiet_check(self, name: str) -> None:
        asyncio.get_running_loop().call_later(STALE_QUIET / 2, self._quiet_check, name)

    def _quiet_check(self, name: str) -> None:
        st = self.neighbors.get(name)
        if st is None or not self.stale.get(name) or not st.established:
            return
        if self.clock() - st.last_update >= STALE_QUIET:
            log.info("no End-of-RIB, but no update for %.0f s: the neighbor's table is complete", STALE_QUIET,
                     extra={"tunnel": name})
            for v in (4, 6):
                self._sweep_stale(name, v)
        else:
            self._schedule_quiet_check(name)

    def _sweep_all_stale(self) -> None:
        self._stale_timer = None
        for name in list(self.stale):
            for v in (4, 6):
                self._sweep_stale(name, v)

    def _resynced(self) -> None:
        if self._stale_timer is not None:
            self._stale_timer.cancel()
            self._stale_timer = None
        self._fib_submit(self._reconcile_job, self.rib.best())

    def _reconcile_job(self, best: list) -> None:     # FIB thread
        report = self.fib.reconcile({e.prefix: self._hops(e) for e in best})
        log.info("FIB reconciled after the ExaBGP restart: %d kept, %d replaced, %d removed", report.kept,
                 report.replaced, report.removed)
        for e in report.errors or ():
            log.error("FIB: %s", e)

    # ------------------------------------------------------------------ RIB changes -> FIB, ExaBGP
    def _ifindex_of(self, tunnel: str) -> int | None:      # FIB thread
        idx = self._ifindex.get(tunnel)
        if idx is None:
            t = self.config.tunnels.get(tunnel)
            if t is None:
                return None
            idx = self.fib.ifindex(t.interface.name)
            if idx is not None:
                self._ifindex[tunnel] = idx
        return idx

    def _gateway(self, tunnel: str, nh: IPAddress) -> IPAddress:
        """The route's next hop, if it is on the tunnel's inside network; else the neighbor's
        address (a third-party next hop cannot be reached over a point-to-point tunnel).
        Remembered per (tunnel, next hop) for the configuration in force (a feed has few)."""
        cache = self._gw_cache
        key = (tunnel, nh)
        gw = cache.get(key)
        if gw is None:
            gw = self._gateway_of(tunnel, nh)
            if len(cache) >= 4096:
                cache.clear()
            cache[key] = gw
        return gw

    def _gateway_of(self, tunnel: str, nh: IPAddress) -> IPAddress:
        t = self.config.tunnels.get(tunnel)
        if t is None or t.bgp is None:
            return nh
        iface = t.interface
        net = iface.address if nh.version == 4 else iface.address6
        if net is not None and IPAddress(str(nh)) in IPNetwork(str(net.network)):
            return nh
        peer = IPAddress(str(t.bgp.peer_address))
        if peer.version == nh.version:
            return peer
        p6 = getattr(t.bgp, "peer_address6", None)
        return IPAddress(str(p6)) if p6 is not None else nh

    def _hops(self, entry: Any) -> list[tuple[int, IPAddress]]:
        hops = []
        for tunnel, nh in entry.next_hops:
            idx = self._ifindex_of(tunnel)
            if idx is None:
                log.error("FIB: no interface for tunnel %s (route %s)", tunnel, entry.prefix)
                continue
            hops.append((idx, self._gateway(tunnel, nh)))
        return hops

    def _fib_job(self, sets: list, removes: list) -> None:      # FIB thread
        errors = self.fib.apply([(e.prefix, self._hops(e)) for e in sets], list(removes))
        for err in errors:
            self.fib_errors += 1
            log.error("FIB: %s", err)

    def _apply(self, ch: RibChange) -> None:
        if ch.fib_set or ch.fib_remove:
            self._fib_submit(self._fib_job, list(ch.fib_set), list(ch.fib_remove))
        for tunnel, routes in ch.announce.items():
            st = self.neighbors.get(tunnel)
            if st is None:
                continue
            for r in routes:
                for spec in st.specs:
                    if spec.peer_address.version == r.prefix.version and st.sessions.get(str(spec.peer_address)) == "up":
                        self.speaker.send(exabgp.announce_command(spec.peer_address, r))
        for tunnel, prefixes in ch.withdraw.items():
            st = self.neighbors.get(tunnel)
            if st is None:
                continue
            for p in prefixes:
                for spec in st.specs:
                    if spec.peer_address.version == p.version and st.sessions.get(str(spec.peer_address)) == "up":
                        self.speaker.send(exabgp.withdraw_command(spec.peer_address, p))
        for event in ch.events:
            e = dict(event)
            etype = e.pop("type", "bgp_event")
            tunnel = e.pop("tunnel", None)
            e.pop("time", None)
            if etype in QUIET_EVENTS:
                log.debug("%s %s", etype, e, extra={"tunnel": tunnel} if tunnel else {})
                continue
            log.warning("%s %s", etype, e, extra={"tunnel": tunnel} if tunnel else {})
            self.publish(etype, tunnel, **e)
        for tunnel in ch.restart_neighbor:
            self._restart_neighbor(tunnel)

    def _restart_neighbor(self, name: str) -> None:
        """max_prefix action restart: session torn down now, configured again after the delay."""
        st = self.neighbors.get(name)
        if st is None:
            return
        t = self.config.tunnels.get(name)
        delay = DEFAULT_RESTART_DELAY
        pol = self.config.bgp.policies.get(t.bgp.import_policy) if t is not None and t.bgp.import_policy else None
        if pol is not None and pol.max_prefix is not None:
            delay = float(getattr(pol.max_prefix, "restart_delay", delay))
        st.held_until = self.clock() + delay
        log.warning("max-prefix: session torn down, configured again in %.0f s", delay, extra={"tunnel": name})
        self.publish("bgp_neighbor_restart", name, delay=delay)
        self._neighbor_gone(name, "max-prefix limit exceeded")
        self._reconfigure_speaker()
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._timers[name] = asyncio.get_running_loop().call_later(delay, self._release, name)

    def _release(self, name: str) -> None:
        self._timers.pop(name, None)
        st = self.neighbors.get(name)
        if st is not None:
            st.held_until = None
            log.info("max-prefix restart delay over: neighbor configured again", extra={"tunnel": name})
            self._reconfigure_speaker()

    # ------------------------------------------------------------------ views
    def show_bgp(self) -> dict[str, Any]:
        now = self.clock()
        rows = []
        for name, st in self.neighbors.items():
            stats = self.rib.neighbor_stats(name)
            t = self.config.tunnels.get(name)
            if name not in self.up:
                state = "idle (tunnel down)"
            elif st.held_until is not None and st.held_until > now:
                state = f"idle (max-prefix, retry in {st.held_until - now:.0f} s)"
            elif st.established:
                state = "established"
            elif any(s == "connected" for s in st.sessions.values()):
                state = "opensent"
            else:
                state = "active"
            rows.append({
                "tunnel": name, "peer_address": ", ".join(str(s.peer_address) for s in st.specs),
                "local_address": ", ".join(str(s.local_address) for s in st.specs),
                "peer_as": t.bgp.peer_as if t is not None and t.bgp is not None else None,
                "state": state, "uptime": round(now - st.since, 1) if st.since is not None else None,
                "hold_time": st.hold_time, "configured_hold_time": st.specs[0].hold_time if st.specs else None,
                "last_error": st.last_error,
                "prefixes_received": stats.get("received", 0), "prefixes_accepted": stats.get("accepted", 0),
                "prefixes_filtered": stats.get("filtered", 0), "prefixes_advertised": stats.get("advertised", 0),
                "import": t.bgp.import_policy if t is not None and t.bgp is not None else None,
                "export": t.bgp.export_policy if t is not None and t.bgp is not None else None,
            })
        return {"asn": self.config.bgp.asn, "router_id": str(exabgp.router_id_of(self.config)),
                "speaker": {"running": self.speaker.pid is not None, "connected": self.speaker.connected,
                            "restarts": self.speaker.restarts, "pending_acks": self.speaker.pending_acks},
                "fib_routes": len(self.fib.installed), "neighbors": rows}

    def summary(self) -> dict[str, Any]:
        return {"sessions": len(self.neighbors),
                "established": sum(1 for st in self.neighbors.values() if st.established),
                "routes": len(self.fib.installed)}

    def show_routes(self, static: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The `static` rows (appliance/control_handlers.static_route_rows) and one row per
        received path the policy accepted (rib.loc_rib), with whether it won (best / ecmp) and
        why the others lost, its dampening state, whether the kernel has it, and whether it is
        the route in use (`active`): for a prefix with both an installed static route and an
        installed BGP best path, the static one with bgp.prefer_static (the default), BGP's
        with prefer_static: false - as the kernel chooses by their metrics."""
        rows = [dict(r) for r in static or ()]
        bgp_rows = self._bgp_route_rows()
        prefer_static = getattr(self.config.bgp, "prefer_static", True)
        static_on = {r["prefix"]: r["tunnel"] for r in rows if r.get("installed")}
        bgp_on = {r["prefix"] for r in bgp_rows if r["installed"]}
        for r in rows:
            r["active"] = bool(r.get("installed"))
            if r["active"] and not prefer_static and r["prefix"] in bgp_on:
                r["active"] = False
                r["reason"] = "the BGP route wins (bgp.prefer_static: false)"
        for r in bgp_rows:
            r["active"] = r["installed"]
            if r["active"] and prefer_static and r["prefix"] in static_on:
                r["active"] = False
                r["reason"] = (f"{r['reason']}; the static route of tunnel {static_on[r['prefix']]} wins "
                               f"(bgp.prefer_static)") if r.get("reason") else \
                    f"the static route of tunnel {static_on[r['prefix']]} wins (bgp.prefer_static)"
        return rows + bgp_rows

    def _bgp_route_rows(self) -> list[dict[str, Any]]:
        rows = []
        now = self.clock()
        for r in self.rib.loc_rib(now):
            prefix = str(r.get("prefix"))
            try:
                in_fib = IPNetwork(prefix) in self.fib.installed
            except Exception:  # noqa: BLE001
                in_fib = False
            for e in r.get("routes") or ():
                tunnel = e.get("neighbor")
                t = self.config.tunnels.get(tunnel)
                status = e.get("status")
                damp = e.get("dampening")
                rows.append({
                    "prefix": prefix, "next_hop": e.get("next_hop"),
                    "interface": t.interface.name if t is not None else None, "tunnel": tunnel, "source": "bgp",
                    "as_path": e.get("as_path"), "installed": in_fib and status in ("best", "ecmp"),
                    "best": status in ("best", "ecmp"), "status": status, "reason": e.get("why"),
                    "local_pref": e.get("local_pref"), "med": e.get("med"), "origin": e.get("origin"),
                    "dampening": damp if isinstance(damp, str) or damp is None else str(damp),
                })
        return rows

    def collect_metrics(self) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        for name, st in self.neighbors.items():
            peer = str(st.specs[0].peer_address) if st.specs else ""
            stats = self.rib.neighbor_stats(name)
            m.bgp_session_up.set(1 if st.established else 0, tunnel=name, peer=peer)
            m.bgp_prefixes_received.set(stats.get("received", 0), tunnel=name, peer=peer)
            m.bgp_prefixes_accepted.set(stats.get("accepted", 0), tunnel=name, peer=peer)
            m.bgp_prefixes_advertised.set(stats.get("advertised", 0), tunnel=name, peer=peer)
