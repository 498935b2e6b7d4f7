"""The RIB: Adj-RIB-In per neighbour, Loc-RIB (best path, ECMP), Adj-RIB-Out per neighbour.

Pure and deterministic: ``now`` is passed in, nothing here reads a clock or does I/O. Every call
returns a :class:`RibChange` — what the FIB writer and the speaker must do — computed
incrementally: an update touches only the prefixes it names (plus, for max-prefix ``stop``, the
routes it lets back in), so the cost of an update does not grow with the table.

Neighbours are tunnels (their ``bgp:`` block). Routes from a neighbour are taken only while it is
up (:meth:`Rib.neighbor_up` .. :meth:`Rib.neighbor_down`); an update for a neighbour that is not
up is ignored and reported as an event.

Best path (docs/bgp.md, "Best path"), among the eligible routes (accepted by import policy, not
held back by max-prefix ``stop``, not suppressed by dampening):

1. highest LOCAL_PREF (100 when not set);
2. shortest AS_PATH;
3. lowest ORIGIN (IGP < EGP < INCOMPLETE);
4. lowest MED, compared only between routes whose neighbour AS (first AS of the path) is the
   same; a missing MED is 0 (RFC 4271 §9.1.2.2 c);
5. eBGP over iBGP;
   — the routes still in play are equal: with ``bgp.multipath`` the FIB gets up to
   ``bgp.max_paths`` of them (ECMP), chosen in the order of the next steps;
6. lowest peer router id (BGP identifier);
7. lowest neighbour address, then tunnel name (determinism).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from netaddr import IPAddress, IPNetwork

from appliance.config.model import BgpSettings, Tunnel
from bgp.dampening import Dampener
from bgp.policy import DEFAULT_LOCAL_PREF, PolicyEngine, Verdict
from bgp.route import Origin, Route

_NO_ROUTER_ID = 1 << 32     # a route without a peer router id loses the router id step


@dataclass(frozen=True)
class FibEntry:
    prefix: IPNetwork
    next_hops: tuple[tuple[str, IPAddress], ...]   # (tunnel name, next hop address), sorted; >1 = ECMP


@dataclass
class RibChange:
    fib_set: list[FibEntry] = field(default_factory=list)          # install/replace (whole next-hop set)
    fib_remove: list[IPNetwork] = field(default_factory=list)      # remove from the FIB
    announce: dict[str, list[Route]] = field(default_factory=dict)  # per tunnel: (re)announce, export-policied
    withdraw: dict[str, list[IPNetwork]] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    restart_neighbor: list[str] = field(default_factory=list)      # max_prefix restart: tear the session down

    def __bool__(self) -> bool:
        return bool(self.fib_set or self.fib_remove or self.announce or self.withdraw or self.events
                    or self.restart_neighbor)


def prefix_key(net: IPNetwork) -> tuple[int, int, int]:
    return net.version, net.first, net.prefixlen


def _nh_key(nh: tuple[str, IPAddress]) -> tuple[str, int, int]:
    return nh[0], nh[1].version, int(nh[1])


class _Neighbor:
    """One neighbour's Adj-RIB-In and bookkeeping."""

    def __init__(self, tunnel: Tunnel, dampener: Dampener | None) -> None:
        self.tunnel = tunnel
        self.name = tunnel.name
        self.up = False
        #: received route and the verdict on it, in arrival order (max-prefix stop re-admits in it)
        self.adj_in: dict[IPNetwork, tuple[Route, Verdict]] = {}
        self.counted: set[IPNetwork] = set()        # accepted by policy and within max-prefix
        self.held: dict[IPNetwork, None] = {}       # accepted by policy, over the max-prefix limit (stop)
        self.warned = False                          # max-prefix warn/stop reported for this excursion
        self.dampener = dampener
        self.stale: set[IPNetwork] = set()          # see Rib.mark_stale
        self.adj_out: dict[IPNetwork, Route] = {}
        self.peer_address = int(IPAddress(str(tunnel.bgp.peer_address))) if tunnel.bgp else 0


class Rib:
    """Adj-RIB-In / Loc-RIB / Adj-RIB-Out for every tunnel with a ``bgp:`` block."""

    def __init__(self, settings: BgpSettings, tunnels: Mapping[str, Tunnel], policy: PolicyEngine) -> None:
        self.settings = settings
        self.policy = policy
        self._neighbors: dict[str, _Neighbor] = {}
        self._eligible: dict[IPNetwork, dict[str, Route]] = {}   # per prefix: tunnel -> policied route
        self._loc: dict[IPNetwork, tuple[Route, ...]] = {}       # per prefix: the selected set, best first
        self._fib: dict[IPNetwork, FibEntry] = {}
        self._own: dict[IPNetwork, Route] = {}
        self._transit_to: dict[str, set[str]] = {}   # source tunnel -> tunnels whose export names it
        self._configure(settings, tunnels)

    # ------------------------------------------------------------------------------------------
    # configuration

    def _configure(self, settings: BgpSettings, tunnels: Mapping[str, Tunnel]) -> None:
        self.settings = settings
        self._own = {}
        for p in settings.announce:
            net = IPNetwork(str(p))
            nh = IPAddress("0.0.0.0") if net.version == 4 else IPAddress("::")
            self._own[net] = Route(prefix=net, next_hop=nh, neighbor="", origin=Origin.IGP)
        old = self._neighbors
        self._neighbors = {}
        for name, t in tunnels.items():
            if t.bgp is None:
                continue
            prev = old.get(name)
            damp = None
            if t.bgp.dampening:
                if prev is not None and prev.dampener is not None and prev.dampener.params == settings.dampening:
                    damp = prev.dampener
                else:
                    damp = Dampener(settings.dampening)
                    if prev is not None and prev.dampener is not None:
                        damp._records, damp._suppressed = prev.dampener._records, prev.dampener._suppressed
            n = _Neighbor(t, damp)
            if prev is not None:
                n.up, n.adj_in, n.adj_out, n.stale = prev.up, prev.adj_in, prev.adj_out, prev.stale
            self._neighbors[name] = n
        self._transit_to = {}
        for name, n in self._neighbors.items():
            pol = self.policy.policies.get(n.tunnel.bgp.export_policy) if n.tunnel.bgp.export_policy else None
            for src in (pol.transit if pol is not None else ()):
                self._transit_to.setdefault(src, set()).add(name)

    def reconfigure(self, settings: BgpSettings, tunnels: Mapping[str, Tunnel], now: float) -> RibChange:
        """Reload: new policies and tunnels. Neighbours that lost their ``bgp:`` block (or their
        tunnel) are taken down; what the others sent is judged again by the new policies, and
        the FIB and every Adj-RIB-Out are brought in line."""
        change = RibChange()
        gone = [name for name in self._neighbors
                if name not in tunnels or tunnels[name].bgp is None]
        for name in gone:
            self._down(self._neighbors[name], change, now, affected := set())
            del self._neighbors[name]
            self._recompute(affected, change)
        self.policy = PolicyEngine(settings, tunnels)
        affected: set[IPNetwork] = set(self._eligible) | set(self._loc)
        self._configure(settings, tunnels)
        self._eligible = {}
        for n in self._neighbors.values():
            if not n.up:
                continue
            received = list(n.adj_in.items())
            n.adj_in, n.counted, n.held, n.warned = {}, set(), {}, False
            for prefix, (route, _) in received:
                affected.add(prefix)
                if not self._learn(n, route, now, affected, change, flap=False):
                    break
        self._recompute(affected, change)
        for n in self._neighbors.values():
            if n.up:
                self._sync_out(n, change)
        return change

    # ------------------------------------------------------------------------------------------
    # neighbours

    def neighbor_up(self, tunnel: str, now: float) -> RibChange:
        """The session is established: what to announce to it (bgp.announce through its export
        policy, and permitted transit). Called again for a neighbour already up (e.g. after an
        ExaBGP restart) it re-announces everything and keeps what was received."""
        change = RibChange()
        n = self._neighbors.get(tunnel)
        if n is None:
            change.events.append({"type": "bgp_unknown_neighbor", "tunnel": tunnel})
            return change
        n.up = True
        n.adj_out = {}
        self._sync_out(n, change)
        return change

    def neighbor_down(self, tunnel: str, now: float) -> RibChange:
        """Session or tunnel gone: its routes leave the Loc-RIB and the FIB at once (the next best
        path takes over), what we announced to it is forgotten."""
        change = RibChange()
        n = self._neighbors.get(tunnel)
        if n is None:
            change.events.append({"type": "bgp_unknown_neighbor", "tunnel": tunnel})
            return change
        affected: set[IPNetwork] = set()
        self._down(n, change, now, affected)
        self._recompute(affected, change)
        return change

    def _down(self, n: _Neighbor, change: RibChange, now: float, affected: set[IPNetwork]) -> None:
        for prefix in n.adj_in:
            routes = self._eligible.get(prefix)
            if routes is not None and routes.pop(n.name, None) is not None and not routes:
                del self._eligible[prefix]
            affected.add(prefix)
        n.up = False
        n.adj_in, n.counted, n.held, n.warned, n.stale, n.adj_out = {}, set(), {}, False, set(), {}
        if n.dampener is not None:      # a session reset is not a flap of each route (FRR clears too)
            n.dampener = Dampener(n.dampener.params)

    def mark_stale(self, tunnel: str) -> None:
        """Before re-learning a neighbour's routes without flushing them (ExaBGP restarted, route
        refresh): every route it sent is stale until it is announced again; :meth:`sweep_stale`
        then withdraws the ones that were not."""
        n = self._neighbors.get(tunnel)
        if n is not None:
            n.stale = set(n.adj_in)

    def sweep_stale(self, tunnel: str, now: float) -> RibChange:
        """Withdraw the routes still stale since :meth:`mark_stale` (End-of-RIB, or a timeout)."""
        n = self._neighbors.get(tunnel)
        if n is None or not n.stale:
            return RibChange()
        stale = [p for p in n.adj_in if p in n.stale]
        n.stale = set()
        return self.update(tunnel, [], stale, now)

    # ------------------------------------------------------------------------------------------
    # updates

    def update(self, tunnel: str, announced: Iterable[Route], withdrawn: Iterable[IPNetwork],
               now: float) -> RibChange:
        """One UPDATE (or a batch) from ``tunnel``: withdrawals first, then announcements."""
        change = RibChange()
        n = self._neighbors.get(tunnel)
        if n is None:
            change.events.append({"type": "bgp_unknown_neighbor", "tunnel": tunnel})
            return change
        if not n.up:
            change.events.append({"type": "bgp_update_ignored", "tunnel": tunnel, "reason": "neighbor not up"})
            return change
        affected: set[IPNetwork] = set()
        for prefix in withdrawn:
            self._unlearn(n, prefix, now, affected)
        for route in announced:
            if not self._learn(n, route, now, affected, change, flap=True):
                break       # max-prefix restart: the neighbour is down, the rest is moot
        self._recompute(affected, change)
        return change

    def _unlearn(self, n: _Neighbor, prefix: IPNetwork, now: float, affected: set[IPNetwork]) -> None:
        old = n.adj_in.pop(prefix, None)
        n.stale.discard(prefix)
        if old is None:
            return
        affected.add(prefix)
        if n.dampener is not None:
            n.dampener.withdrawn(prefix, now)
        n.held.pop(prefix, None)
        if prefix in n.counted:
            n.counted.discard(prefix)
            self._set_eligible(n, prefix, None)
            self._readmit(n, now, affected)

    def _limit(self, n: _Neighbor):
        name = n.tunnel.bgp.import_policy
        pol = self.policy.policies.get(name) if name else None
        return pol.policy.max_prefix if pol is not None else None

    def _learn(self, n: _Neighbor, route: Route, now: float, affected: set[IPNetwork], change: RibChange,
               flap: bool) -> bool:
        """Take one received route. False: max-prefix restart took the neighbour down."""
        prefix = route.prefix
        n.stale.discard(prefix)
        old = n.adj_in.get(prefix)
        if flap and n.dampener is not None and old is not None and old[0] != route:
            n.dampener.attributes_changed(prefix, now)
        verdict = self.policy.import_route(n.tunnel, route)
        affected.add(prefix)
        if not verdict.accepted:
            n.adj_in[prefix] = (route, verdict)
            n.held.pop(prefix, None)
            if prefix in n.counted:
                n.counted.discard(prefix)
                self._set_eligible(n, prefix, None)
                self._readmit(n, now, affected)
            return True
        if prefix not in n.counted:
            limit = self._limit(n)
            if limit is not None and len(n.counted) >= limit.limit:
                count = len(n.counted) + 1
                if limit.action == "restart":
                    change.events.append({"type": "bgp_max_prefix", "tunnel": n.name, "action": "restart",
                                          "count": count, "limit": limit.limit,
                                          "restart_delay": limit.restart_delay})
                    change.restart_neighbor.append(n.name)
                    self._down(n, change, now, affected)
                    return False
                if limit.action == "stop":
                    n.adj_in[prefix] = (route, Verdict(False, None, f"max-prefix {limit.limit} reached (stop)"))
                    n.held[prefix] = None
                    if not n.warned:
                        n.warned = True
                        change.events.append({"type": "bgp_max_prefix", "tunnel": n.name, "action": "stop",
                                              "count": count, "limit": limit.limit})
                    return True
                if not n.warned:        # warn: keep it, say so once per excursion over the limit
                    n.warned = True
                    change.events.append({"type": "bgp_max_prefix", "tunnel": n.name, "action": "warn",
                                          "count": count, "limit": limit.limit})
            n.counted.add(prefix)
        n.adj_in[prefix] = (route, verdict)
        self._set_eligible(n, prefix, verdict.route)
        return True

    def _readmit(self, n: _Neighbor, now: float, affected: set[IPNetwork]) -> None:
        """Room under the max-prefix limit: let held routes (stop) back in, oldest first."""
        limit = self._limit(n)
        if limit is None:
            for prefix in list(n.held):
                self._admit_held(n, prefix, affected)
            n.warned = False
            return
        while n.held and len(n.counted) < limit.limit:
            self._admit_held(n, next(iter(n.held)), affected)
        if len(n.counted) + len(n.held) <= limit.limit:
            n.warned = False

    def _admit_held(self, n: _Neighbor, prefix: IPNetwork, affected: set[IPNetwork]) -> None:
        del n.held[prefix]
        route = n.adj_in[prefix][0]
        verdict = self.policy.import_route(n.tunnel, route)
        n.adj_in[prefix] = (route, verdict)
        affected.add(prefix)
        if verdict.accepted:
            n.counted.add(prefix)
            self._set_eligible(n, prefix, verdict.route)

    def _set_eligible(self, n: _Neighbor, prefix: IPNetwork, route: Route | None) -> None:
        if route is not None and n.dampener is not None and n.dampener.is_suppressed(prefix):
            route = None
        routes = self._eligible.get(prefix)
        if route is None:
            if routes is not None and routes.pop(n.name, None) is not None and not routes:
                del self._eligible[prefix]
        else:
            if routes is None:
                routes = self._eligible[prefix] = {}
            routes[n.name] = route

    def tick(self, now: float) -> RibChange:
        """Dampening: reuse the suppressed routes whose penalty has decayed below ``reuse``."""
        change = RibChange()
        affected: set[IPNetwork] = set()
        for n in self._neighbors.values():
            if n.dampener is None:
                continue
            for prefix in n.dampener.tick(now):
                if prefix in n.counted:
                    self._set_eligible(n, prefix, n.adj_in[prefix][1].route)
                    affected.add(prefix)
        self._recompute(affected, change)
        return change

    def next_tick(self) -> float | None:
        """When :meth:`tick` next has something to do (None: nothing suppressed)."""
        times = [t for n in self._neighbors.values() if n.dampener is not None
                 for t in (n.dampener.next_reuse(),) if t is not None]
        return min(times) if times else None

    # ------------------------------------------------------------------------------------------
    # best path

    def _select(self, routes: Mapping[str, Route]) -> tuple[Route, ...]:
        """The selected set, best first (a single route unless multipath finds equals)."""
        if not routes:
            return ()
        cands = list(routes.values())
        if len(cands) > 1:
            lp = max(_lp(r) for r in cands)
            cands = [r for r in cands if _lp(r) == lp]
        if len(cands) > 1:
            short = min(len(r.as_path) for r in cands)
            cands = [r for r in cands if len(r.as_path) == short]
        if len(cands) > 1:
            origin = min(r.origin for r in cands)
            cands = [r for r in cands if r.origin == origin]
        if len(cands) > 1:
            best_med: dict[int, int] = {}
            for r in cands:
                a = _neighbor_as(r)
                m = r.med or 0
                if a not in best_med or m < best_med[a]:
                    best_med[a] = m
            cands = [r for r in cands if (r.med or 0) == best_med[_neighbor_as(r)]]
        if len(cands) > 1 and any(r.ebgp for r in cands):
            cands = [r for r in cands if r.ebgp]
        cands.sort(key=self._tiebreak)
        if not self.settings.multipath:
            return (cands[0],)
        return tuple(cands[: self.settings.max_paths])

    def _tiebreak(self, r: Route) -> tuple[int, int, str]:
        rid = int(r.peer_router_id) if r.peer_router_id is not None else _NO_ROUTER_ID
        n = self._neighbors.get(r.neighbor)
        return rid, n.peer_address if n is not None else 0, r.neighbor

    def _recompute(self, affected: Iterable[IPNetwork], change: RibChange) -> None:
        for prefix in sorted(affected, key=prefix_key):
            routes = self._eligible.get(prefix)
            new = self._select(routes) if routes else ()
            old = self._loc.get(prefix, ())
            if new == old:
                continue
            if new:
                self._loc[prefix] = new
            else:
                self._loc.pop(prefix, None)
            # FIB
            if new:
                entry = FibEntry(prefix, tuple(sorted(((r.neighbor, r.next_hop) for r in new), key=_nh_key)))
                if self._fib.get(prefix) != entry:
                    self._fib[prefix] = entry
                    change.fib_set.append(entry)
            elif prefix in self._fib:
                del self._fib[prefix]
                change.fib_remove.append(prefix)
            # Adj-RIB-Out: only learned prefixes (ours are announced whatever was learned)
            if prefix in self._own:
                continue
            best = new[0] if new else None
            targets = set(self._transit_to.get(best.neighbor, ())) if best is not None else set()
            if old:
                targets |= self._transit_to.get(old[0].neighbor, set())
            for name in sorted(targets):
                n = self._neighbors.get(name)
                if n is not None and n.up:
                    self._export_one(n, prefix, best, change)

    def _export_one(self, n: _Neighbor, prefix: IPNetwork, route: Route | None, change: RibChange) -> None:
        out = self.policy.export_route(n.tunnel, route) if route is not None else None
        old = n.adj_out.get(prefix)
        if out == old:
            return
        if out is None:
            del n.adj_out[prefix]
            change.withdraw.setdefault(n.name, []).append(prefix)
        else:
            n.adj_out[prefix] = out
            change.announce.setdefault(n.name, []).append(out)

    def _desired_out(self, n: _Neighbor) -> dict[IPNetwork, Route]:
        out: dict[IPNetwork, Route] = {}
        for prefix, route in self._own.items():
            r = self.policy.export_route(n.tunnel, route)
            if r is not None:
                out[prefix] = r
        sources = {src for src, dests in self._transit_to.items() if n.name in dests}
        if sources:
            for prefix, sel in self._loc.items():
                if prefix not in self._own and sel[0].neighbor in sources:
                    r = self.policy.export_route(n.tunnel, sel[0])
                    if r is not None:
                        out[prefix] = r
        return out

    def _sync_out(self, n: _Neighbor, change: RibChange) -> None:
        want = self._desired_out(n)
        for prefix in sorted(want, key=prefix_key):
            if n.adj_out.get(prefix) != want[prefix]:
                change.announce.setdefault(n.name, []).append(want[prefix])
        gone = sorted((p for p in n.adj_out if p not in want), key=prefix_key)
        if gone:
            change.withdraw.setdefault(n.name, []).extend(gone)
        n.adj_out = want

    # ------------------------------------------------------------------------------------------
    # views

    def best(self) -> list[FibEntry]:
        """The whole desired FIB (for reconciliation), by prefix."""
        return [self._fib[p] for p in sorted(self._fib, key=prefix_key)]

    def adj_rib_in(self, tunnel: str) -> list[tuple[Route, Verdict]]:
        n = self._neighbors.get(tunnel)
        if n is None:
            return []
        return [n.adj_in[p] for p in sorted(n.adj_in, key=prefix_key)]

    def adj_rib_out(self, tunnel: str) -> list[Route]:
        n = self._neighbors.get(tunnel)
        if n is None:
            return []
        return [n.adj_out[p] for p in sorted(n.adj_out, key=prefix_key)]

    def neighbor_stats(self, tunnel: str) -> dict:
        n = self._neighbors.get(tunnel)
        if n is None:
            return {"tunnel": tunnel, "configured": False}
        suppressed = 0
        if n.dampener is not None:
            suppressed = sum(1 for p in n.counted if n.dampener.is_suppressed(p))
        received = len(n.adj_in)
        accepted = len(n.counted)
        return {"tunnel": tunnel, "configured": True, "up": n.up, "received": received, "accepted": accepted,
                "filtered": received - accepted, "held": len(n.held), "suppressed": suppressed,
                "advertised": len(n.adj_out)}

    def loc_rib(self, now: float | None = None) -> list[dict]:
        """For ``show routes``: per prefix, every accepted route, which won (``best``, ``ecmp``) and
        why the others lost; dampening state when the neighbour dampens (``now`` for its penalty)."""
        by_prefix: dict[IPNetwork, list[tuple[_Neighbor, Route, Verdict]]] = {}
        for n in self._neighbors.values():
            for prefix, (route, verdict) in n.adj_in.items():
                if verdict.accepted or prefix in n.held:
                    by_prefix.setdefault(prefix, []).append((n, route, verdict))
        out = []
        for prefix in sorted(by_prefix, key=prefix_key):
            selected = self._loc.get(prefix, ())
            best = selected[0] if selected else None
            entries = []
            for n, received, verdict in sorted(by_prefix[prefix], key=lambda x: x[0].name):
                route = verdict.route if verdict.accepted else received
                status, why = self._explain(n, prefix, route, verdict, selected)
                item = {"neighbor": n.name, "next_hop": str(route.next_hop),
                        "as_path": list(route.as_path), "local_pref": _lp(route), "med": route.med,
                        "origin": route.origin.name.lower(), "ebgp": route.ebgp, "status": status, "why": why}
                if n.dampener is not None:
                    item["dampening"] = n.dampener.state(prefix, now if now is not None else 0.0)
                entries.append(item)
            fib = self._fib.get(prefix)
            out.append({"prefix": str(prefix),
                        "next_hops": [{"tunnel": t, "via": str(a)} for t, a in (fib.next_hops if fib else ())],
                        "best": best.neighbor if best is not None else None,
                        "routes": entries})
        return out

    def _explain(self, n: _Neighbor, prefix: IPNetwork, route: Route, verdict: Verdict,
                 selected: tuple[Route, ...]) -> tuple[str, str]:
        if prefix in n.held:
            return "held", verdict.reason
        if n.dampener is not None and n.dampener.is_suppressed(prefix):
            return "suppressed", "dampening: penalty above the suppress threshold"
        names = [r.neighbor for r in selected]
        if n.name in names:
            if names.index(n.name) == 0:
                return "best", "best path" + (f" (ECMP with {len(names) - 1} more)" if len(names) > 1 else "")
            return "ecmp", "equal to the best path up to the router id step: multipath"
        if not selected:
            return "lost", "not selected"
        best = selected[0]
        if _lp(route) != _lp(best):
            return "lost", f"lower local-pref ({_lp(route)} < {_lp(best)})"
        if len(route.as_path) != len(best.as_path):
            return "lost", f"longer AS path ({len(route.as_path)} > {len(best.as_path)})"
        if route.origin != best.origin:
            return "lost", f"worse origin ({route.origin.name.lower()} > {best.origin.name.lower()})"
        same_as = [r for r in self._eligible.get(prefix, {}).values() if _neighbor_as(r) == _neighbor_as(route)]
        if same_as and (route.med or 0) > min(r.med or 0 for r in same_as):
            return "lost", f"higher MED ({route.med or 0}) than a route from the same neighbour AS " \
                           f"{_neighbor_as(route)}"
        if route.ebgp != best.ebgp:
            return "lost", "iBGP route, an eBGP route exists"
        if self.settings.multipath:
            return "lost", f"equal, beyond max_paths {self.settings.max_paths}"
        return "lost", "equal up to the router id step: higher router id / neighbour address (multipath off)"


def _lp(r: Route) -> int:
    return r.local_pref if r.local_pref is not None else DEFAULT_LOCAL_PREF


def _neighbor_as(r: Route) -> int:
    """RFC 4271 §9.1.2.2 (c): the first AS of the path; a route without one is from our own AS."""
    return r.as_path[0] if r.as_path else 0
