"""Import and export policy for one neighbour at a time: guards, prefix lists, AS_PATH, communities.

Pure and deterministic (no clock, no I/O): :class:`PolicyEngine` is built from the validated
config (``appliance.config.model.BgpSettings`` + the tunnels) and judges one route at a time.
The order of the checks and what each one means is the operator's reference in docs/bgp.md;
keep the two in step.

Import (:meth:`PolicyEngine.import_route`), first refusal wins:

1. AS_PATH loop: our own AS in the path (RFC 4271 §9.1.2) — always, not overridable;
2. guards (the policy's ``guards:``, all on by default): default route, bogons/martians,
   too specific (> /24 IPv4, > /48 IPv6), our own announced prefixes, tunnel endpoints;
3. RFC 8212: an eBGP neighbour without an import policy sends nothing we accept;
4. the prefix list (first matching entry decides, no match = deny);
5. AS_PATH filters (deny AS, contains AS, max length);
6. community conditions (deny_communities, match_communities);
7. actions: remove_communities, communities (add), local_pref, med.

Export (:meth:`PolicyEngine.export_route`): split horizon, NO_ADVERTISE / NO_EXPORT, the
transit rule (a learned route leaves only through an export policy whose ``transit`` names the
tunnel it came from; never iBGP-learned to iBGP), RFC 8212 (no export policy, nothing sent to an
eBGP neighbour), prefix list, AS_PATH and community conditions, then the actions: communities,
med, prepend, our AS, next hop self.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from netaddr import IPAddress, IPNetwork

from appliance.config.model import BgpPolicy, BgpSettings, Guards, Tunnel
from bgp.route import NO_ADVERTISE, NO_EXPORT, NO_EXPORT_SUBCONFED, Community, LargeCommunity, Route

DEFAULT_LOCAL_PREF = 100          # RFC 4271 §9.1.1: the usual default when none is set

# RFC 1997 / 3765 / 7999 / 8326 well-known communities, by the names the config uses.
WELL_KNOWN: dict[str, Community] = {
    "no-export": NO_EXPORT,
    "no-advertise": NO_ADVERTISE,
    "no-export-subconfed": NO_EXPORT_SUBCONFED,
    "no-peer": (0xFFFF, 0xFF04),
    "blackhole": (0xFFFF, 0x029A),
    "graceful-shutdown": (0xFFFF, 0x0000),
}
GRACEFUL_SHUTDOWN: Community = WELL_KNOWN["graceful-shutdown"]

#: Martians: prefixes that are never a unicast destination behind a VPN tunnel (docs/bgp.md,
#: "Guards"). RFC 1918, 100.64.0.0/10 (RFC 6598), 198.18.0.0/15 and fc00::/7 are NOT here:
#: private space is what VPNs carry. 169.254.0.0/16 is here: the tunnels' inside networks live
#: there as connected routes, and a learned route into it could only shadow another tunnel's
#: BGP session.
BOGONS_V4 = tuple(IPNetwork(p) for p in (
    "0.0.0.0/8",          # "this network" (RFC 791, RFC 6890)
    "127.0.0.0/8",        # loopback (RFC 1122)
    "169.254.0.0/16",     # link-local (RFC 3927): tunnel inside addresses
    "192.0.0.0/24",       # IETF protocol assignments (RFC 6890)
    "192.0.2.0/24",       # TEST-NET-1 (RFC 5737)
    "198.51.100.0/24",    # TEST-NET-2 (RFC 5737)
    "203.0.113.0/24",     # TEST-NET-3 (RFC 5737)
    "224.0.0.0/4",        # multicast (RFC 5771)
    "240.0.0.0/4",        # reserved, and 255.255.255.255 (RFC 1112, RFC 919)
))
BOGONS_V6 = tuple(IPNetwork(p) for p in (
    "::/8",               # unspecified, loopback, IPv4-mapped/compatible (RFC 4291)
    "100::/64",           # discard-only (RFC 6666)
    "2001:db8::/32",      # documentation (RFC 3849)
    "3ffe::/16",          # the old 6bone (RFC 3701)
    "fe80::/10",          # link-local (RFC 4291)
    "fec0::/10",          # site-local, deprecated (RFC 3879)
    "ff00::/8",           # multicast (RFC 4291)
))

_BOGON_RANGES_V4 = tuple((b, b.first, b.last) for b in BOGONS_V4)
_BOGON_RANGES_V6 = tuple((b, b.first, b.last) for b in BOGONS_V6)


class PolicyError(ValueError):
    """A policy in the config cannot be applied (validated configs never raise this)."""


def parse_community(text: str) -> tuple[str, Community | LargeCommunity]:
    """'65001:100' -> ("standard", (65001, 100)); '65001:1:2' -> ("large", ...); 'no-export' ->
    ("standard", (0xFFFF, 0xFF01))."""
    t = text.strip().lower()
    if t in WELL_KNOWN:
        return "standard", WELL_KNOWN[t]
    parts = t.split(":")
    if all(p.isdigit() for p in parts):
        values = tuple(int(p) for p in parts)
        if len(values) == 2 and all(v <= 0xFFFF for v in values):
            return "standard", values            # type: ignore[return-value]
        if len(values) == 3 and all(v <= 0xFFFFFFFF for v in values):
            return "large", values               # type: ignore[return-value]
    raise PolicyError(f"'{text}' is not a community")


def format_community(value: Community | LargeCommunity) -> str:
    for name, c in WELL_KNOWN.items():
        if c == value:
            return name
    return ":".join(str(v) for v in value)


@dataclass(frozen=True)
class CommunitySet:
    standard: frozenset[Community] = frozenset()
    large: frozenset[LargeCommunity] = frozenset()

    @classmethod
    def of(cls, texts: Iterable[str]) -> "CommunitySet":
        std: set[Community] = set()
        large: set[LargeCommunity] = set()
        for text in texts:
            kind, value = parse_community(text)
            (std if kind == "standard" else large).add(value)  # type: ignore[arg-type]
        return cls(frozenset(std), frozenset(large))

    def __bool__(self) -> bool:
        return bool(self.standard or self.large)

    def first_in(self, route: Route) -> Community | LargeCommunity | None:
        """One community of ``route`` that is in this set (the smallest, for a stable reason)."""
        hits = sorted(c for c in route.communities if c in self.standard)
        if hits:
            return hits[0]
        large = sorted(c for c in route.large_communities if c in self.large)
        return large[0] if large else None


@dataclass(frozen=True)
class _PrefixEntry:
    net: IPNetwork
    first: int
    last: int
    version: int
    lo: int
    hi: int
    permit: bool
    text: str


class CompiledPolicy:
    """A :class:`BgpPolicy` with its prefix list and communities parsed once."""

    def __init__(self, policy: BgpPolicy) -> None:
        self.policy = policy
        self.name = policy.name
        entries = []
        for pm in policy.prefixes:
            net = IPNetwork(str(pm.prefix))
            maxlen = 32 if net.version == 4 else 128
            if pm.ge is None and pm.le is None:
                lo = hi = net.prefixlen                      # the prefix itself only
            else:
                lo = pm.ge if pm.ge is not None else net.prefixlen
                hi = pm.le if pm.le is not None else maxlen
            text = str(net) + (f" ge {pm.ge}" if pm.ge is not None else "") + \
                (f" le {pm.le}" if pm.le is not None else "")
            entries.append(_PrefixEntry(net, net.first, net.last, net.version, lo, hi, pm.action == "permit", text))
        self.prefixes: tuple[_PrefixEntry, ...] = tuple(entries)
        self.add = CommunitySet.of(policy.communities)
        self.match = CommunitySet.of(policy.match_communities)
        self.deny = CommunitySet.of(policy.deny_communities)
        self.remove = CommunitySet.of(policy.remove_communities)
        self.deny_as = frozenset(policy.as_path.deny)
        self.contains_as = frozenset(policy.as_path.contains)
        self.transit = frozenset(policy.transit)
        self._no_conditions = not (self.deny_as or self.contains_as or policy.as_path.max_length is not None
                                   or self.deny or self.match)

    def prefix_verdict(self, prefix: IPNetwork) -> str | None:
        """None = permitted; else why refused. An empty list permits every prefix."""
        if not self.prefixes:
            return None
        first, last, plen, version = prefix.first, prefix.last, prefix.prefixlen, prefix.version
        for e in self.prefixes:
            if e.version == version and e.first <= first and last <= e.last and e.lo <= plen <= e.hi:
                return None if e.permit else f"prefix-list {self.name} deny {e.text}"
        return f"prefix-list {self.name}: no entry matches"

    def conditions(self, route: Route) -> str | None:
        """AS_PATH and community conditions: None = passed, else why refused."""
        if self._no_conditions:
            return None
        path = route.as_path
        if self.deny_as:
            hit = sorted(a for a in set(path) if a in self.deny_as)
            if hit:
                return f"as-path contains denied AS {hit[0]}"
        if self.contains_as and not any(a in self.contains_as for a in path):
            return f"as-path contains none of AS {', '.join(str(a) for a in sorted(self.contains_as))}"
        limit = self.policy.as_path.max_length
        if limit is not None and len(path) > limit:
            return f"as-path too long ({len(path)} > {limit})"
        if self.deny:
            hit = self.deny.first_in(route)
            if hit is not None:
                return f"community {format_community(hit)} denied"
        if self.match and self.match.first_in(route) is None:
            return "no matching community"
        return None

    def set_communities(self, route: Route) -> Route:
        if not (self.add or self.remove):
            return route
        std = [c for c in route.communities if c not in self.remove.standard]
        large = [c for c in route.large_communities if c not in self.remove.large]
        std += sorted(c for c in self.add.standard if c not in std)
        large += sorted(c for c in self.add.large if c not in large)
        return with_changes(route, communities=tuple(std), large_communities=tuple(large))


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    route: Route | None            # the route after policy actions (None if refused)
    reason: str                    # "accepted", or why refused ("bogon 127.0.0.0/8", "default route", ...)


def _net(x: object) -> IPNetwork:
    return IPNetwork(str(x))


_new = object.__new__


def with_changes(route: Route, **changes: object) -> Route:
    """``dataclasses.replace`` for :class:`Route`, without re-running ``__init__`` (several times
    faster; the fields are the same frozen values, ``changes`` must name existing fields)."""
    new = _new(Route)
    d = new.__dict__
    d.update(route.__dict__)
    d.update(changes)
    return new


#: Attribute sets whose import verdict is kept (a table of 100k prefixes has a few hundred).
ATTR_CACHE_SIZE = 4096
#: Route fields that differ per prefix, never part of an attribute set's changes.
_PER_ROUTE = ("prefix", "next_hop", "peer_router_id")


class PolicyEngine:
    """Applies the config's policies to routes; one instance per configuration (reload = new one)."""

    def __init__(self, settings: BgpSettings, tunnels: Mapping[str, Tunnel] | None = None) -> None:
        self.settings = settings
        self.asn = settings.asn
        self.policies = {name: CompiledPolicy(p) for name, p in settings.policies.items()}
        self.own = tuple(_net(p) for p in settings.announce)
        self._own_ranges = tuple((n.version, n.first, n.last) for n in self.own)
        #: underlay addresses of every tunnel: a learned prefix holding one would route that
        #: tunnel's own IKE/ESP packets into a tunnel
        self.endpoints: tuple[tuple[str, IPAddress], ...] = tuple(
            sorted(((name, IPAddress(str(t.remote))) for name, t in (tunnels or {}).items()),
                   key=lambda x: x[0]))
        self._endpoint_ints = tuple((name, a, a.version, int(a)) for name, a in self.endpoints)
        self._attr_cache: dict[tuple, tuple] = {}
        self._default_guards = Guards()
        self._tunnels = dict(tunnels or {})
        self._next_hops = {(name, v): _inside(t, v) for name, t in self._tunnels.items() for v in (4, 6)}

    # --- helpers

    def policy(self, name: str | None) -> CompiledPolicy | None:
        if name is None:
            return None
        try:
            return self.policies[name]
        except KeyError:
            raise PolicyError(f"policy '{name}' is not defined under bgp.policies") from None

    def is_ebgp(self, tunnel: Tunnel) -> bool:
        return tunnel.bgp is None or tunnel.bgp.peer_as != self.asn

    def is_own(self, prefix: IPNetwork) -> bool:
        """``prefix`` is one of bgp.announce or inside one."""
        v, first, last = prefix.version, prefix.first, prefix.last
        return any(ov == v and of <= first and last <= ol for ov, of, ol in self._own_ranges)

    def guard(self, guards: Guards, prefix: IPNetwork, tunnel: Tunnel) -> str | None:
        plen, v = prefix.prefixlen, prefix.version
        if plen == 0:
            return "default route" if guards.default_route else None
        first, last = prefix.first, prefix.last
        if guards.bogons:
            for b, bfirst, blast in (_BOGON_RANGES_V4 if v == 4 else _BOGON_RANGES_V6):
                if bfirst <= first and last <= blast:
                    return f"bogon (inside {b})"
        maxlen = guards.max_length if v == 4 else guards.max_length6
        if plen > maxlen:
            return f"too specific (/{plen} > /{maxlen})"
        if guards.own_prefixes and any(ov == v and of <= first and last <= ol for ov, of, ol in self._own_ranges):
            return "own prefix"
        if guards.bogons:
            # A prefix holding a tunnel's underlay address (checked with the bogons: both are
            # "never a destination behind a tunnel"; the default route is governed above).
            for name, addr, av, ai in self._endpoint_ints or _endpoint_of(tunnel):
                if av == v and first <= ai <= last:
                    return f"holds tunnel {name}'s endpoint {addr}"
        return None

    # --- import

    def import_route(self, tunnel: Tunnel, route: Route) -> Verdict:
        prefix = route.prefix
        if prefix.value != prefix.first:
            return Verdict(False, None, f"malformed prefix {prefix} (host bits set)")
        if self.asn in route.as_path:
            return Verdict(False, None, f"as-path loop (own AS {self.asn})")
        bgp = tunnel.bgp
        pol = self.policy(bgp.import_policy if bgp is not None else None)
        reason = self.guard(pol.policy.guards if pol is not None else self._default_guards, prefix, tunnel)
        if reason is not None:
            return Verdict(False, None, reason)
        ebgp = self.is_ebgp(tunnel)
        if pol is None:
            if ebgp:
                return Verdict(False, None, "no import policy (RFC 8212)")
            return Verdict(True, self._received(route, tunnel, ebgp), "accepted")
        reason = pol.prefix_verdict(prefix)
        if reason is not None:
            return Verdict(False, None, reason)
        # The rest depends on the route's attributes only, which every prefix of one UPDATE
        # shares: evaluated once per attribute set (and tunnel), then applied to each route.
        key = (tunnel.name, route.neighbor, route.as_path, route.origin, route.med, route.local_pref,
               route.communities, route.large_communities, route.peer_as, route.ebgp)
        hit = self._attr_cache.get(key)
        if hit is None or hit[0] is not tunnel or hit[1] is not pol:
            hit = (tunnel, pol, *self._attribute_verdict(pol, route, tunnel, ebgp))
            if len(self._attr_cache) >= ATTR_CACHE_SIZE:
                self._attr_cache.clear()
            self._attr_cache[key] = hit
        reason, changes = hit[2], hit[3]
        if reason is not None:
            return Verdict(False, None, reason)
        return Verdict(True, with_changes(route, **changes) if changes else route, "accepted")

    def _attribute_verdict(self, pol: CompiledPolicy, route: Route, tunnel: Tunnel,
                           ebgp: bool) -> tuple[str | None, dict[str, object]]:
        """AS-path and community conditions and the policy's actions for ``route``'s attributes:
        (why refused or None, the fields the accepted route gets)."""
        reason = pol.conditions(route)
        if reason is not None:
            return reason, {}
        out = self._received(route, tunnel, ebgp)
        out = pol.set_communities(out)
        changes: dict[str, object] = {}
        if pol.policy.local_pref is not None:
            changes["local_pref"] = pol.policy.local_pref
        if GRACEFUL_SHUTDOWN in out.communities:
            changes["local_pref"] = 0           # RFC 8326 §4: lowest preference while draining
        if pol.policy.med is not None:
            changes["med"] = pol.policy.med
        if changes:
            out = with_changes(out, **changes)
        return None, {f: v for f, v in out.__dict__.items() if f not in _PER_ROUTE and route.__dict__[f] != v}

    def _received(self, route: Route, tunnel: Tunnel, ebgp: bool) -> Route:
        """The route as this neighbour's: its name, its AS, eBGP or not; LOCAL_PREF from an eBGP
        neighbour is ignored (RFC 4271 §5.1.5)."""
        bgp = tunnel.bgp
        peer_as = bgp.peer_as if bgp is not None else route.peer_as
        changes: dict[str, object] = {}
        if route.neighbor != tunnel.name:
            changes["neighbor"] = tunnel.name
        if route.peer_as != peer_as:
            changes["peer_as"] = peer_as
        if route.ebgp != ebgp:
            changes["ebgp"] = ebgp
        if ebgp and route.local_pref is not None:
            changes["local_pref"] = None
        if GRACEFUL_SHUTDOWN in route.communities:
            changes["local_pref"] = 0
        return with_changes(route, **changes) if changes else route

    # --- export

    def export_route(self, tunnel: Tunnel, route: Route) -> Route | None:
        """What to announce to ``tunnel`` for ``route`` (ours: neighbor ""), or None.

        The result's ``as_path`` is the AS_PATH to send as is (our AS first on eBGP sessions,
        ``prepend`` extra times), ``next_hop`` our inside address on the tunnel, ``local_pref``
        only for iBGP, ``med`` the policy's (a received MED is not passed to another AS,
        RFC 4271 §5.1.4)."""
        bgp = tunnel.bgp
        if bgp is None or route.neighbor == tunnel.name:
            return None
        if NO_ADVERTISE in route.communities:
            return None
        ebgp = self.is_ebgp(tunnel)
        if ebgp and (NO_EXPORT in route.communities or NO_EXPORT_SUBCONFED in route.communities):
            return None
        pol = self.policy(bgp.export_policy)
        learned = route.neighbor != ""
        if learned:
            if pol is None or route.neighbor not in pol.transit:
                return None                        # transit only where a policy names the source
            if not ebgp and not route.ebgp:
                return None                        # iBGP-learned never to iBGP (RFC 4271 §9.2)
        if pol is None and ebgp:
            return None                            # RFC 8212
        next_hop = self.next_hop_self(tunnel, route.prefix)
        if next_hop is None:
            return None
        if pol is not None:
            if pol.prefix_verdict(route.prefix) is not None or pol.conditions(route) is not None:
                return None
            route = pol.set_communities(route)
        prepend = pol.policy.prepend if pol is not None else 0
        path = (self.asn,) * (prepend + (1 if ebgp else 0)) + route.as_path
        med = pol.policy.med if pol is not None else None
        if not ebgp and med is None:
            med = route.med
        if ebgp:
            local_pref = None
        else:
            local_pref = pol.policy.local_pref if pol is not None and pol.policy.local_pref is not None \
                else (route.local_pref if route.local_pref is not None else DEFAULT_LOCAL_PREF)
        return with_changes(route, next_hop=next_hop, as_path=path, med=med, local_pref=local_pref)

    def next_hop_self(self, tunnel: Tunnel, prefix: IPNetwork) -> IPAddress | None:
        """Our inside address on ``tunnel`` of the prefix's family (None: the tunnel has none, or
        no session of that family)."""
        if self._tunnels.get(tunnel.name) is tunnel:
            return self._next_hops[(tunnel.name, prefix.version)]
        return _inside(tunnel, prefix.version)


def _endpoint_of(tunnel: Tunnel) -> tuple[tuple[str, IPAddress, int, int], ...]:
    a = IPAddress(str(tunnel.remote))
    return ((tunnel.name, a, a.version, int(a)),)


def _inside(tunnel: Tunnel, version: int) -> IPAddress | None:
    """Our inside address for next hop self, if the tunnel has a session carrying that family:
    IPv4 unicast over an IPv4 ``peer_address``, IPv6 unicast over an IPv6 ``peer_address`` or
    ``peer_address6`` (the sessions docs/bgp.md "Wiring" describes)."""
    bgp = tunnel.bgp
    if bgp is None:
        return None
    carried = bgp.peer_address.version == 4 if version == 4 else \
        (bgp.peer_address.version == 6 or bgp.peer_address6 is not None)
    addr = tunnel.interface.address if version == 4 else tunnel.interface.address6
    return IPAddress(str(addr.ip)) if carried and addr is not None else None
