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

Memory: every table is keyed by one int per prefix (:func:`pkey`); a received route is stored
once (with the route after policy, often the same object); the FIB view is derived from the
Loc-RIB, not stored twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from netaddr import IPAddress, IPNetwork

from appliance.config.model import BgpSettings, MaxPrefix, Tunnel
from bgp.dampening import Dampener
from bgp.policy import DEFAULT_LOCAL_PREF, PolicyEngine, Verdict
from bgp.route import Origin, Route

_NO_ROUTER_ID = 1 << 32     # a route without a peer router id loses the router id step
_EMPTY: frozenset[str] = frozenset()
ACCEPTED = "accepted"


@dataclass(frozen=True, slots=True)
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


def pkey(net: IPNetwork) -> int:
    """The RIB's key for a prefix: one int ordering like (version, first address, length).
    Hashing netaddr objects would otherwise be the RIB's main cost."""
    return (net.version << 160) | (net.first << 8) | net.prefixlen


def _nh_key(nh: tuple[str, IPAddress]) -> tuple[str, int, int]:
    return nh[0], nh[1].version, int(nh[1])


def _hops(selected: tuple[Route, ...]) -> tuple[tuple[str, IPAddress], ...]:
    if len(selected) == 1:
        r = selected[0]
        return ((r.neighbor, r.next_hop),)
    return tuple(sorted(((r.neighbor, r.next_hop) for r in selected), key=_nh_key))


# An Adj-RIB-In entry: (received route, route after import policy or None, reason). The policied
# route is not None exactly when the route counts against max-prefix and may be used (unless
# dampening suppresses it); the reason is ACCEPTED then, else why policy (or max-prefix) refused it.
_Entry = tuple[Route, "Route | None", str]


class _Neighbor:
    """One neighbour's Adj-RIB-In and bookkeeping (dicts and sets keyed by pkey(prefix))."""

    def __init__(self, tunnel: Tunnel, dampener: Dampener | None) -> None:
        self.tunnel = tunnel
        self.name = tunnel.name
        self.up = False
        self.adj_in: dict[int, _Entry] = {}   # in arrival order (max-prefix stop re-admits in it)
        self.accepted = 0                      # entries with a policied route
        self.held: dict[int, None] = {}        # accepted by policy, over the max-prefix limit (stop)
        self.warned = False                    # max-prefix warn/stop reported for this excursion
        self.dampener = dampener
        self.stale: set[int] = set()           # see Rib.mark_stale
        self.adj_out: dict[int, Route] = {}
        self.peer_address = int(IPAddress(str(tunnel.bgp.peer_address))) if tunnel.bgp else 0

    def reset(self) -> None:
        self.adj_in, self.accepted, self.held, self.warned, self.stale = {}, 0, {}, False, set()


class Rib:
    """Adj-RIB-In / Loc-RIB / Adj-RIB-Out for every tunnel with a ``bgp:`` block."""

    def __init__(self, settings: BgpSettings, tunnels: Mapping[str, Tunnel], policy: PolicyEngine) -> None:
        self.settings = settings
        self.policy = policy
        self._neighbors: dict[str, _Neighbor] = {}
        # keyed by pkey(prefix):
        self._eligible: dict[int, Route | dict[str, Route]] = {}   # one route, or tunnel -> route
        self._loc: dict[int, tuple[Route, ...]] = {}               # the selected set, best first
        self._own: dict[int, Route] = {}
        self._transit_to: dict[str, frozenset[str]] = {}   # source tunnel -> tunnels whose export names it
        self._configure(settings, tunnels)

    # ------------------------------------------------------------------------------------------
    # configuration

    def _configure(self, settings: BgpSettings, tunnels: Mapping[str, Tunnel]) -> None:
        self.settings = settings
        self._own = {}
        for p in settings.announce:
            net = IPNetwork(str(p))
            nh = IPAddress("0.0.0.0") if net.version == 4 else IPAddress("::")
            self._own[pkey(net)] = Route(prefix=net, next_hop=nh, neighbor="", origin=Origin.IGP)
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
                    if prev is not None and prev.dampener is not None:   # new parameters, same history
                        damp._records, damp._suppressed = prev.dampener._records, prev.dampener._suppressed
            n = _Neighbor(t, damp)
            if prev is not None:
                n.up, n.adj_in, n.accepted, n.held, n.warned = prev.up, prev.adj_in, prev.accepted, prev.held, \
                    prev.warned
                n.stale, n.adj_out = prev.stale, prev.adj_out
            self._neighbors[name] = n
        transit: dict[str, set[str]] = {}
        for name, n in self._neighbors.items():
            pol = self.policy.policies.get(n.tunnel.bgp.export_policy) if n.tunnel.bgp.export_policy else None
            for src in (pol.transit if pol is not None else ()):
                transit.setdefault(src, set()).add(name)
        self._transit_to = {src: frozenset(d) for src, d in transit.items()}

    def reconfigure(self, settings: BgpSettings, tunnels: Mapping[str, Tunnel], now: float) -> RibChange:
        """Reload: new policies and tunnels. Neighbours that lost their ``bgp:`` block (or their
        tunnel) are taken down; what the others sent is judged again by the new policies, and
        the FIB and every Adj-RIB-Out are brought in line."""
        change = RibChange()
        for name in [name for name in self._neighbors if name not in tunnels or tunnels[name].bgp is None]:
            affected: set[int] = set()
            self._down(self._neighbors[name], affected)
            del self._neighbors[name]
            self._recompute(affected, change)
        self.policy = PolicyEngine(settings, tunnels)
        affected = set(self._eligible) | set(self._loc)
        self._configure(settings, tunnels)
        self._eligible = {}
        for n in self._neighbors.values():
            if not n.up:
                continue
            received = [(k, e[0]) for k, e in n.adj_in.items()]
            stale = n.stale
            n.reset()
            for k, route in received:
                affected.add(k)
                if not self._learn(n, route, now, affected, change, flap=False):
                    break
            else:
                n.stale = stale & set(n.adj_in)
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
        affected: set[int] = set()
        self._down(n, affected)
        self._recompute(affected, change)
        return change

    def _down(self, n: _Neighbor, affected: set[int]) -> None:
        for k, entry in n.adj_in.items():
            if entry[1] is not None:
                self._elig_del(k, n.name)
            affected.add(k)
        n.up = False
        n.reset()
        n.adj_out = {}
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
        stale = [e[0].prefix for k, e in n.adj_in.items() if k in n.stale]
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
        affected: set[int] = set()
        for prefix in withdrawn:
            self._unlearn(n, pkey(prefix), now, affected)
        for route in announced:
            if not self._learn(n, route, now, affected, change, flap=True):
                break       # max-prefix restart: the neighbour is down, the rest is moot
        self._recompute(affected, change)
        return change

    def _unlearn(self, n: _Neighbor, k: int, now: float, affected: set[int]) -> None:
        old = n.adj_in.pop(k, None)
        n.stale.discard(k)
        if old is None:
            return
        affected.add(k)
        if n.dampener is not None:
            n.dampener.withdrawn(k, now)
        n.held.pop(k, None)
        if old[1] is not None:
            n.accepted -= 1
            self._elig_del(k, n.name)
            self._readmit(n, affected)

    def _limit(self, n: _Neighbor) -> MaxPrefix | None:
        name = n.tunnel.bgp.import_policy
        pol = self.policy.policies.get(name) if name else None
        return pol.policy.max_prefix if pol is not None else None

    def _learn(self, n: _Neighbor, route: Route, now: float, affected: set[int], change: RibChange,
               flap: bool) -> bool:
        """Take one received route. False: max-prefix restart took the neighbour down."""
        k = pkey(route.prefix)
        n.stale.discard(k)
        old = n.adj_in.get(k)
        if flap and n.dampener is not None and old is not None and old[0] != route:
            n.dampener.attributes_changed(k, now)
        verdict = self.policy.import_route(n.tunnel, route)
        affected.add(k)
        was_counted = old is not None and old[1] is not None
        if not verdict.accepted:
            n.adj_in[k] = (route, None, verdict.reason)
            n.held.pop(k, None)
            if was_counted:
                n.accepted -= 1
                self._elig_del(k, n.name)
                self._readmit(n, affected)
            return True
        if not was_counted:
            limit = self._limit(n)
            if limit is not None and n.accepted >= limit.limit:
                count = n.accepted + 1
                if limit.action == "restart":
                    change.events.append({"type": "bgp_max_prefix", "tunnel": n.name, "action": "restart",
                                          "count": count, "limit": limit.limit,
                                          "restart_delay": limit.restart_delay})
                    change.restart_neighbor.append(n.name)
                    self._down(n, affected)
                    return False
                if limit.action == "stop":
                    n.adj_in[k] = (route, None, f"max-prefix {limit.limit} reached (stop)")
                    n.held[k] = None
                    if not n.warned:
                        n.warned = True
                        change.events.append({"type": "bgp_max_prefix", "tunnel": n.name, "action": "stop",
                                              "count": count, "limit": limit.limit})
                    return True
                if not n.warned:        # warn: keep it, say so once per excursion over the limit
                    n.warned = True
                    change.events.append({"type": "bgp_max_prefix", "tunnel": n.name, "action": "warn",
                                          "count": count, "limit": limit.limit})
            n.accepted += 1
            n.held.pop(k, None)
        n.adj_in[k] = (route, verdict.route, ACCEPTED)
        self._set_eligible(n, k, verdict.route)
        return True

    def _readmit(self, n: _Neighbor, affected: set[int]) -> None:
        """Room under the max-prefix limit: let held routes (stop) back in, oldest first."""
        limit = self._limit(n)
        while n.held and (limit is None or n.accepted < limit.limit):
            k = next(iter(n.held))
            del n.held[k]
            route = n.adj_in[k][0]
            verdict = self.policy.import_route(n.tunnel, route)
            affected.add(k)
            if verdict.accepted:
                n.adj_in[k] = (route, verdict.route, ACCEPTED)
                n.accepted += 1
                self._set_eligible(n, k, verdict.route)
            else:
                n.adj_in[k] = (route, None, verdict.reason)
        if limit is None or n.accepted + len(n.held) <= limit.limit:
            n.warned = False

    # --- the eligible routes per prefix: one Route, or a dict when several neighbours have one

    def _set_eligible(self, n: _Neighbor, k: int, route: Route) -> None:
        if n.dampener is not None and n.dampener.is_suppressed(k):
            self._elig_del(k, n.name)
            return
        cur = self._eligible.get(k)
        if cur is None:
            self._eligible[k] = route
        elif type(cur) is dict:
            cur[n.name] = route
        elif cur.neighbor == n.name:
            self._eligible[k] = route
        else:
            self._eligible[k] = {cur.neighbor: cur, n.name: route}

    def _elig_del(self, k: int, name: str) -> None:
        cur = self._eligible.get(k)
        if cur is None:
            return
        if type(cur) is dict:
            cur.pop(name, None)
            if len(cur) == 1:
                self._eligible[k] = next(iter(cur.values()))
        elif cur.neighbor == name:
            del self._eligible[k]

    def _elig_routes(self, k: int) -> list[Route]:
        cur = self._eligible.get(k)
        if cur is None:
            return []
        return list(cur.values()) if type(cur) is dict else [cur]

    def tick(self, now: float) -> RibChange:
        """Dampening: reuse the suppressed routes whose penalty has decayed below ``reuse``."""
        change = RibChange()
        affected: set[int] = set()
        for n in self._neighbors.values():
            if n.dampener is None:
                continue
            for k in n.dampener.tick(now):
                entry = n.adj_in.get(k)
                if entry is not None and entry[1] is not None:
                    self._set_eligible(n, k, entry[1])
                    affected.add(k)
        self._recompute(affected, change)
        return change

    def next_tick(self) -> float | None:
        """When :meth:`tick` next has something to do (None: nothing suppressed)."""
        times = [t for n in self._neighbors.values() if n.dampener is not None
                 for t in (n.dampener.next_reuse(),) if t is not None]
        return min(times) if times else None

    # ------------------------------------------------------------------------------------------
    # best path

    def _select(self, cur: Route | dict[str, Route]) -> tuple[Route, ...]:
        """The selected set, best first (a single route unless multipath finds equals)."""
        if type(cur) is not dict:
            return (cur,)
        cands = list(cur.values())
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

    def _recompute(self, affected: Iterable[int], change: RibChange) -> None:
        for k in sorted(affected):
            cur = self._eligible.get(k)
            new = self._select(cur) if cur is not None else ()
            old = self._loc.get(k, ())
            if new == old:
                continue
            if new:
                self._loc[k] = new
            else:
                del self._loc[k]
            # FIB
            if new:
                hops = _hops(new)
                if not old or _hops(old) != hops:
                    change.fib_set.append(FibEntry(new[0].prefix, hops))
            else:
                change.fib_remove.append(old[0].prefix)
            # Adj-RIB-Out: only learned prefixes (ours are announced whatever was learned)
            if k in self._own:
                continue
            best = new[0] if new else None
            targets = self._transit_to.get(best.neighbor, _EMPTY) if best is not None else _EMPTY
            if old:
                targets = targets | self._transit_to.get(old[0].neighbor, _EMPTY)
            for name in sorted(targets):
                n = self._neighbors.get(name)
                if n is not None and n.up:
                    self._export_one(n, k, best, change)

    def _export_one(self, n: _Neighbor, k: int, route: Route | None, change: RibChange) -> None:
        out = self.policy.export_route(n.tunnel, route) if route is not None else None
        old = n.adj_out.get(k)
        if out == old:
            return
        if out is None:
            del n.adj_out[k]
            change.withdraw.setdefault(n.name, []).append(old.prefix)
        else:
            n.adj_out[k] = out
            change.announce.setdefault(n.name, []).append(out)

    def _desired_out(self, n: _Neighbor) -> dict[int, Route]:
        out: dict[int, Route] = {}
        for k, route in self._own.items():
            r = self.policy.export_route(n.tunnel, route)
            if r is not None:
                out[k] = r
        sources = {src for src, dests in self._transit_to.items() if n.name in dests}
        if sources:
            for k, sel in self._loc.items():
                if k not in self._own and sel[0].neighbor in sources:
                    r = self.policy.export_route(n.tunnel, sel[0])
                    if r is not None:
                        out[k] = r
        return out

    def _sync_out(self, n: _Neighbor, change: RibChange) -> None:
        want = self._desired_out(n)
        for k in sorted(want):
            if n.adj_out.get(k) != want[k]:
                change.announce.setdefault(n.name, []).append(want[k])
        gone = [n.adj_out[k].prefix for k in sorted(n.adj_out) if k not in want]
        if gone:
            change.withdraw.setdefault(n.name, []).extend(gone)
        n.adj_out = want

    # ------------------------------------------------------------------------------------------
    # views

    def best(self) -> list[FibEntry]:
        """The whole desired FIB (for reconciliation), by prefix."""
        return [FibEntry(sel[0].prefix, _hops(sel)) for _, sel in sorted(self._loc.items())]

    def adj_rib_in(self, tunnel: str) -> list[tuple[Route, Verdict]]:
        """What ``tunnel`` sent, by prefix, each with the verdict on it (max-prefix ``stop``
        included: "max-prefix N reached (stop)")."""
        n = self._neighbors.get(tunnel)
        if n is None:
            return []
        return [(e[0], Verdict(e[1] is not None, e[1], e[2])) for _, e in sorted(n.adj_in.items())]

    def adj_rib_out(self, tunnel: str) -> list[Route]:
        """What we announce to ``tunnel`` now, by prefix."""
        n = self._neighbors.get(tunnel)
        if n is None:
            return []
        return [r for _, r in sorted(n.adj_out.items())]

    def neighbor_stats(self, tunnel: str) -> dict:
        n = self._neighbors.get(tunnel)
        if n is None:
            return {"tunnel": tunnel, "configured": False}
        suppressed = 0
        if n.dampener is not None:
            suppressed = sum(1 for k, e in n.adj_in.items() if e[1] is not None and n.dampener.is_suppressed(k))
        received = len(n.adj_in)
        return {"tunnel": tunnel, "configured": True, "up": n.up, "received": received, "accepted": n.accepted,
                "filtered": received - n.accepted, "held": len(n.held), "suppressed": suppressed,
                "advertised": len(n.adj_out)}

    def loc_rib(self, now: float | None = None) -> list[dict]:
        """For ``show routes``: per prefix, every accepted route, which won (``best``, ``ecmp``) and
        why the others lost; dampening state when the neighbour dampens (``now`` for its penalty)."""
        by_prefix: dict[int, list[tuple[_Neighbor, Route, _Entry]]] = {}
        for n in self._neighbors.values():
            for k, entry in n.adj_in.items():
                if entry[1] is not None or k in n.held:
                    by_prefix.setdefault(k, []).append((n, entry[1] or entry[0], entry))
        out = []
        for k in sorted(by_prefix):
            selected = self._loc.get(k, ())
            entries = []
            for n, route, entry in sorted(by_prefix[k], key=lambda x: x[0].name):
                status, why = self._explain(n, k, route, entry, selected)
                item = {"neighbor": n.name, "next_hop": str(route.next_hop),
                        "as_path": list(route.as_path), "local_pref": _lp(route), "med": route.med,
                        "origin": route.origin.name.lower(), "ebgp": route.ebgp, "status": status, "why": why}
                if n.dampener is not None:
                    item["dampening"] = n.dampener.state(k, now if now is not None else 0.0)
                entries.append(item)
            out.append({"prefix": str(by_prefix[k][0][1].prefix),
                        "next_hops": [{"tunnel": t, "via": str(a)} for t, a in (_hops(selected) if selected else ())],
                        "best": selected[0].neighbor if selected else None,
                        "routes": entries})
        return out

    def _explain(self, n: _Neighbor, k: int, route: Route, entry: _Entry,
                 selected: tuple[Route, ...]) -> tuple[str, str]:
        if k in n.held:
            return "held", entry[2]
        if n.dampener is not None and n.dampener.is_suppressed(k):
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
        same_as = [r for r in self._elig_routes(k) if _neighbor_as(r) == _neighbor_as(route)]
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
