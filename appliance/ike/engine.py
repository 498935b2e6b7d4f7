"""The engine entry point: routes datagrams to IKE SAs and keeps every tunnel up (sans-IO).

Drive it like aioquic's QuicConnection::

    engine = IkeEngine([tunnel_config, ...], random=os.urandom)
    engine.start(now)                                  # initiate the tunnels with start=True
    engine.receive_datagram(data, src, dst, now)       # every UDP datagram (non-ESP marker removed)
    engine.handle_timer(now)                           # when now >= engine.get_timer()
    for d in engine.datagrams_to_send(): sock.sendto(d.data, d.dst)   # from d.src
    while (e := engine.next_event()) is not None: ...  # events.py
    engine.get_timer()                                 # absolute time of the next timer, or None

`src`/`dst` are (address, port) pairs; `now` is any monotonic clock in seconds. Nothing here
reads a clock, opens a socket or touches the kernel.

Per tunnel the engine keeps exactly one IKE SA with one Child SA pair: it (re)initiates tunnels
configured with start=True (with back-off after failures), re-creates a missing Child SA, and
resolves duplicates that crossing initiations create (both peers initiating at once, libreswan
#2184): of two IKE SAs (or two Child SAs) for one tunnel created concurrently, the one whose
exchange holds the lowest nonce is deleted, the rule RFC 7296 §2.8.1 uses for rekey collisions,
so both peers keep the same one. INITIAL_CONTACT (§2.4) replaces IKE SAs that were up before the
new one started.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import hmac
import ipaddress
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from appliance.ike import child_create, ike_init, ike_rekey, informational, liveness, outside_ike_sa
from appliance.ike import events as ev
from appliance.ike.child import ChildSa
from appliance.ike.constants import NotifyType
from appliance.ike.message import ParseError, parse_header
from appliance.ike.proposals import Proposal, contains
from appliance.ike.policy import DosProtection, Identity, TunnelConfig
from appliance.ike.sa import Endpoint, IkeSa, IkeState

log = logging.getLogger("isthmus.ike")

ZERO_SPI = bytes(8)
NAT_KEEPALIVE = b"\xff"   # RFC 3948 §2.3


@dataclass(frozen=True)
class Datagram:
    """A datagram to send from `src` to `dst` (the runner adds the non-ESP marker on 4500,
    except to a NAT keepalive: RFC 3948 §2.3, the one octet 0xFF as it is)."""

    data: bytes
    src: Endpoint
    dst: Endpoint
    keepalive: bool = False


class ResponderOffer:
    """Candidate tunnels for an address pair, their proposals without repeats, and (memo) the
    candidates that accept a given chosen proposal."""

    def __init__(self, candidates: list[TunnelConfig], proposals: list[Proposal], generation: int):
        self.candidates = candidates
        self.proposals = proposals
        self.generation = generation
        self._accepting: dict[Proposal, Candidates] = {}

    def accepting(self, chosen: Proposal) -> "Candidates":
        key = Proposal(chosen.protocol, chosen.transforms, chosen.number)   # the SPI plays no part
        hit = self._accepting.get(key)
        if hit is None:
            if len(self._accepting) >= 64:
                self._accepting.clear()
            hit = self._accepting[key] = Candidates((c for c in self.candidates if contains(c.ike_proposals, key)),
                                                    self.generation)
        return hit


class Candidates(list):
    """A responder SA's candidate tunnels (in tunnel order), shared by the SAs answered from the
    same offer, with an index by remote_id built on first use: select_config looks at the
    tunnels that name the peer's identity (or none) instead of comparing it with every
    candidate's. Valid while the engine's tunnels are those of `generation`."""

    def __init__(self, items, generation: int):
        super().__init__(items)
        self.generation = generation
        self._by_id: dict | None = None
        self.nat_mode: str | None = None      # natd.mode of these candidates, once computed

    def for_peer(self, peer: Identity) -> list[TunnelConfig]:
        if self._by_id is None:
            by_id: dict = {}
            for i, c in enumerate(self):
                by_id.setdefault(c.remote_id, []).append((i, c))
            self._by_id = by_id
        hits = self._by_id.get(peer, []) + self._by_id.get(None, [])
        return [c for _, c in sorted(hits, key=lambda x: x[0])] if None in self._by_id else [c for _, c in hits]


@dataclass
class _Tunnel:
    config: TunnelConfig
    reconnect_at: float | None = None
    failures: int = 0
    hold: bool = False                 # no automatic (re)initiation until connect()
    restart: bool = False              # DPD action restart on a tunnel with start=False
    child_retry_at: float | None = None
    child_failures: int = 0
    order: int = 0                     # position among the tunnels (they are maintained in order)
    local_addr: str | None = None      # our address now, when it moved from the config's (MOBIKE)
    on_due_change: Callable[["_Tunnel"], None] | None = field(default=None, repr=False)

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name in ("reconnect_at", "child_retry_at") and self.on_due_change is not None:
            self.on_due_change(self)   # the engine keeps every tunnel's next due time in a heap

    @property
    def due(self) -> float | None:
        r, c = self.reconnect_at, self.child_retry_at
        if r is None:
            return c
        return r if c is None or r <= c else c


class IkeEngine:
    """All IKE SAs of one appliance. See the module docstring for how to drive it."""

    #: Seconds we let the peer delete a pair/SA it should delete before we do it ourselves.
    redundant_grace = 180.0

    def __init__(self, tunnels: Iterable[TunnelConfig] = (), *, random: Callable[[int], bytes],
                 dos: DosProtection | None = None, wall_offset: float = 0.0) -> None:
        self.random = random
        self.dos = dos if dos is not None else DosProtection()
        #: UNIX time minus `now` (certificate validity needs the wall clock; the runner sets it,
        #: `set_wall_offset` moves it after a clock step)
        self.wall_offset = wall_offset
        self._crl_urls: dict[str, None] = {}          # CRL distribution points to fetch
        self._fetched_crls: dict[bytes, object] = {}  # fetched CRLs by issuer (DER name)
        self._tunnels: dict[str, _Tunnel] = {}
        self._sas: dict[bytes, IkeSa] = {}                       # by our SPI
        # responder SAs whose IKE_AUTH has not completed, and how many from each address
        self._half_open: dict[tuple[bytes, Endpoint], IkeSa] = {}
        self._half_open_from: dict[str, int] = {}
        self._cookie_cur: tuple[int, bytes] | None = None       # (version, secret)
        self._cookie_prev: tuple[int, bytes] | None = None
        self._cookie_rotate_at = 0.0
        #: IKE_SA_INIT requests answered with a COOKIE / dropped by a half-open cap; requests
        #: for unknown SPIs answered with INVALID_IKE_SPI / not answered (rate limit)
        self.dos_counters = {"cookies_sent": 0, "refused_per_source": 0, "refused_global": 0,
                             "invalid_ike_spi_sent": 0, "invalid_ike_spi_limited": 0}
        self.invalid_ike_spi_limit = outside_ike_sa.RateLimit()
        #: lines about refused unauthenticated IKE_SA_INIT requests, rate-limited
        self.unauthenticated_log = outside_ike_sa.LogLimit()
        #: COOKIEs are being required (§2.6): set from `cookie_threshold` half-open SAs on,
        #: cleared at half of it; both changes are logged
        self.cookies_required = False
        self._child_spis: set[bytes] = set()
        # alive SAs by tunnel name, and the timer bookkeeping: each SA's next timer is cached
        # and recomputed only for SAs touched since (every entry point touches what it acts on)
        self._by_tunnel: dict[str, set[IkeSa]] = {}
        self._registered = 0                    # registration order (IkeSa.registered)
        self._timer_of: dict[IkeSa, float] = {}
        self._timer_heap: list[tuple[float, int, IkeSa]] = []
        self._dirty: set[IkeSa] = set()
        # Tunnel upkeep (_maintain) looks only at tunnels whose SAs were touched since the last
        # time, and at tunnels whose reconnect/child retry time has come (a heap of due times,
        # entries checked against the tunnel's current one): no pass over every tunnel per
        # datagram.
        self._dirty_tunnels: set[str] = set()
        self._tunnel_heap: list[tuple[float, int, str]] = []
        self._tunnel_order = 0
        self._by_remote: dict | None = None     # configs_for index, rebuilt after tunnel changes
        self._offers: dict = {}                 # responder_offer cache, emptied with it
        self._generation = 0                    # tunnels added or removed so far
        self._out: list[Datagram] = []
        self._events: deque[ev.Event] = deque()
        self._started = False
        self._seq = 0
        for t in tunnels:
            self.add_tunnel(t)

    def set_wall_offset(self, offset: float) -> None:
        self.wall_offset = offset

    # ------------------------------------------------------------------ CRLs from distribution points
    #: bounds of what the engine keeps for the daemon's CRL fetcher (certificates.crl_urls)
    max_crl_urls = 64
    max_fetched_crls = 256

    def want_crls(self, chain) -> None:
        """Note the CRL distribution points of a validated peer chain (the daemon fetches)."""
        from appliance.ike.certificates import crl_urls

        for u in crl_urls(chain):
            if len(self._crl_urls) < self.max_crl_urls:
                self._crl_urls[u] = None

    def take_crl_urls(self) -> list[str]:
        """CRL distribution point URLs seen since the last call (for the daemon to fetch)."""
        urls = list(self._crl_urls)
        self._crl_urls = {}
        return urls

    def fetched_crls(self) -> tuple:
        return tuple(self._fetched_crls.values())

    def add_crl(self, crl, now: float) -> list[str]:
        """A CRL fetched from a distribution point (an x509.CertificateRevocationList): kept
        (newest per issuer, bounded) for later authentications, and every established IKE SA
        whose peer chain it revokes is deleted with AuthFailed. Returns those tunnels' names."""
        from appliance.ike import informational
        from appliance.ike.certificates import CertError, check_revocation

        key = crl.issuer.public_bytes()
        old = self._fetched_crls.get(key)
        if old is not None and old.last_update_utc > crl.last_update_utc:
            return []
        if key not in self._fetched_crls and len(self._fetched_crls) >= self.max_fetched_crls:
            self._fetched_crls.pop(next(iter(self._fetched_crls)))
        self._fetched_crls[key] = crl
        hit = []
        for sa in list(self._sas.values()):
            if not sa.peer_cert_chain or sa.state != IkeState.ESTABLISHED:
                continue
            try:
                check_revocation(sa.peer_cert_chain, (crl,))
            except CertError as e:
                reason = f"certificate of peer {sa.remote_id_text} refused ({e.code}): {e.reason}"
                log.info("%s: %s", sa, reason)
                self.emit(ev.AuthFailed(sa.tunnel, reason))
                informational.delete_ike_sa(sa, now, reason)
                self._touch(sa)
                hit.append(sa.tunnel)
        return hit

    def now_wall(self, now: float) -> float:
        """UNIX time at engine time `now`."""
        return now + self.wall_offset

    # ------------------------------------------------------------------ configuration
    def add_tunnel(self, config: TunnelConfig) -> None:
        if config.name in self._tunnels:
            raise ValueError(f"tunnel {config.name!r} already exists")
        self._tunnel_order += 1
        t = _Tunnel(config, order=self._tunnel_order)
        t.on_due_change = self._tunnel_due_changed
        self._tunnels[config.name] = t
        self._dirty_tunnels.add(config.name)
        self._by_remote = None
        self._offers = {}
        self._generation += 1

    def remove_tunnel(self, name: str, now: float) -> None:
        """Delete the tunnel's SAs (DELETE sent for established ones) and forget the tunnel.

        A responder's half-open SA is not bound to a tunnel until IKE_AUTH names the peer
        (select_config): it stays, and its IKE_AUTH is matched against the tunnels configured
        then — a reload that changes the tunnel while the peer is between IKE_SA_INIT and
        IKE_AUTH completes on the new configuration, one that removes it answers
        AUTHENTICATION_FAILED, instead of leaving the initiator retransmitting into nothing."""
        self.terminate(name, now, keep_unbound=True)
        t = self._tunnels.pop(name)
        t.hold = True
        t.on_due_change = None
        self._dirty_tunnels.discard(name)
        self._by_remote = None
        self._offers = {}
        self._generation += 1

    def tunnels(self) -> list[TunnelConfig]:
        return [t.config for t in self._tunnels.values()]

    # ------------------------------------------------------------------ commands
    def start(self, now: float) -> None:
        """Initiate every tunnel configured with start=True."""
        self._started = True
        for t in self._tunnels.values():
            if t.config.start and not self._alive_sas(t.config.name):
                t.reconnect_at = now
        self._dirty_tunnels.update(self._tunnels)
        self._maintain(now)

    def connect(self, name: str, now: float) -> None:
        """Bring a tunnel up now (also lifts a DPD clear/hold)."""
        t = self._tunnels[name]
        t.hold = False
        t.failures = 0
        self._dirty_tunnels.add(name)
        if not self._alive_sas(name):
            if _can_initiate(t.config):
                self._initiate(t, now)
            else:
                log.info("tunnel %s has no local and remote address: it waits for the peer", name)

    def terminate(self, name: str, now: float, *, keep_unbound: bool = False) -> None:
        """Delete the tunnel's IKE SAs (with a DELETE to the peer once established; a half-open
        one silently) and do not re-initiate. `keep_unbound`: leave a responder's half-open SA
        that IKE_AUTH has not yet bound to a tunnel."""
        t = self._tunnels[name]
        t.hold = True
        t.reconnect_at = None
        self._touch_tunnel(name)
        for sa in self._alive_sas(name):
            if keep_unbound and not sa.initiator and sa.config is None:
                continue
            informational.delete_ike_sa(sa, now, "terminated locally")

    def rekey_child(self, name: str, now: float) -> None:
        from appliance.ike import child_rekey

        self._touch_tunnel(name)
        sa = self.current_sa(name)
        if sa is None:
            raise LookupError(f"tunnel {name} has no established IKE SA")
        for c in sa.children_in_use():
            child_rekey.start(sa, c, now)

    def rekey_ike(self, name: str, now: float) -> None:
        self._touch_tunnel(name)
        sa = self.current_sa(name)
        if sa is None:
            raise LookupError(f"tunnel {name} has no established IKE SA")
        ike_rekey.start(sa, now)

    def local_address_changed(self, name: str, address: str, now: float) -> str:
        """Our address towards the tunnel's peer is now `address` (the driver saw it in the
        routing table). The tunnel's IKE SAs move (MOBIKE, RFC 4555: mobike.py) and later
        initiations start from it. Returns what happened to the current IKE SA: "update"
        (UPDATE_SA_ADDRESSES sent), "no-mobike" (deleted, to be initiated again from the new
        address), "responder" (the peer decides, nothing sent), "unchanged" or "no-sa"."""
        from appliance.ike import mobike

        t = self._tunnels[name]
        if _ip(address) is None:
            raise ValueError(f"tunnel {name}: {address!r} is not an IP address")
        t.local_addr = None if _same_ip(address, t.config.local_addr or "") else address
        self._by_remote = None
        self._offers = {}         # configs_for depends on the tunnel's local address
        self._generation += 1
        self._touch_tunnel(name)
        sa = self.current_sa(name)
        result = "no-sa" if sa is None else mobike.local_address_changed(sa, address, now)
        for o in self._alive_sas(name):
            if o is not sa and o.initiator and o.state == IkeState.CONNECTING and o.local[0] != address:
                # an initiation from the old address cannot complete: start again from the new one
                o.die(now, f"local address moved to {address} during the initial exchanges")
        self._maintain(now)
        return result

    def local_address(self, name: str) -> str | None:
        """Our address for the tunnel: the configured one, or where it moved to."""
        t = self._tunnels[name]
        return t.local_addr or t.config.local_addr

    def traffic_sent(self, name: str, now: float) -> None:
        """The data plane sent ESP for the tunnel: the NAT mapping is fresh (defers the NAT
        keepalive, RFC 3948 §2.3: keepalives only while nothing else goes out)."""
        sa = self.current_sa(name)
        if sa is not None:
            sa.last_sent = max(sa.last_sent, now)
            self._touch(sa)

    def traffic_seen(self, name: str, now: float, heard_at: float | None = None) -> None:
        """The data plane saw inbound ESP for the tunnel: the peer is alive (defers DPD).
        `heard_at` (<= now, default now) is when it was seen: a daemon polling counters passes
        the start of the poll period in which they moved, so DPD's timeout, which counts from
        the last time the peer was heard (appliance/ike/liveness.py), is never late."""
        sa = self.current_sa(name)
        if sa is not None:
            at = now if heard_at is None else min(heard_at, now)
            sa.last_heard = max(sa.last_heard, at)
            liveness.heard(sa)
            self._touch(sa)

    # ------------------------------------------------------------------ I/O
    def receive_datagram(self, data: bytes, src: Endpoint, dst: Endpoint, now: float) -> None:
        """Process one received IKE datagram. Never raises for bad input."""
        try:
            hdr = parse_header(data)
        except ParseError as e:
            if e.notify == NotifyType.INVALID_MAJOR_VERSION and len(data) >= 28:
                self._invalid_major_version(data, src, dst)
            log.debug("dropping datagram from %s:%d: %s", src[0], src[1], e.reason)
            return
        if hdr.spi_i == ZERO_SPI:
            # §3.1: the initiator's SPI MUST NOT be zero; nothing valid carries one
            log.debug("dropping datagram from %s:%d with a zero initiator SPI", src[0], src[1])
            return
        try:
            if hdr.is_initiator:
                # sent by the original initiator: we are the responder, our SPI is SPIr
                if hdr.spi_r == ZERO_SPI:
                    if hdr.exchange_type == ike_init.IkeSaInit.exchange_type and not hdr.is_response:
                        sa = self._half_open.get((hdr.spi_i, src))
                        if sa is not None and sa.alive:
                            sa.receive(data, hdr, src, dst, now)
                        else:
                            ike_init.respond_new(self, data, hdr, src, dst, now)
                    return
                sa = self._sas.get(hdr.spi_r)
                if sa is None or sa.initiator or sa.spi_i != hdr.spi_i:
                    log.debug("no IKE SA for %s_i %s_r", hdr.spi_i.hex(), hdr.spi_r.hex())
                    outside_ike_sa.unknown_spi(self, hdr, src, dst, now)
                    return
            else:
                sa = self._sas.get(hdr.spi_i)
                if sa is None or not sa.initiator:
                    log.debug("no IKE SA for %s_i %s_r", hdr.spi_i.hex(), hdr.spi_r.hex())
                    outside_ike_sa.unknown_spi(self, hdr, src, dst, now)
                    return
                if sa.spi_r != ZERO_SPI and sa.spi_r != hdr.spi_r:
                    return
            sa.receive(data, hdr, src, dst, now)
            self._touch(sa)
        finally:
            self._maintain(now)

    def handle_timer(self, now: float) -> None:
        self._refresh_timers()
        due: list[IkeSa] = []
        heap = self._timer_heap
        while heap and heap[0][0] <= now:
            t, _n, sa = heapq.heappop(heap)
            if self._timer_of.get(sa) == t and sa not in due:
                due.append(sa)
                del self._timer_of[sa]
        for sa in due:
            if sa.alive:
                sa.handle_timer(now)
            self._touch(sa)
        self._maintain(now)

    def get_timer(self) -> float | None:
        self._refresh_timers()
        heap = self._timer_heap
        while heap and self._timer_of.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)    # stale entry
        sa_time = heap[0][0] if heap else None
        th = self._tunnel_heap
        while th and self._tunnel_due(th[0][2]) != th[0][0]:
            heapq.heappop(th)      # stale entry
        if not th:
            return sa_time
        return th[0][0] if sa_time is None or th[0][0] < sa_time else sa_time

    def _tunnel_due(self, name: str) -> float | None:
        t = self._tunnels.get(name)
        return t.due if t is not None else None

    def _tunnel_due_changed(self, t: _Tunnel) -> None:
        due = t.due
        if due is not None:
            self._seq += 1
            heapq.heappush(self._tunnel_heap, (due, self._seq, t.config.name))
            if len(self._tunnel_heap) > 4 * len(self._tunnels) + 64:   # drop stale entries
                self._tunnel_heap = [e for e in self._tunnel_heap if self._tunnel_due(e[2]) == e[0]]
                heapq.heapify(self._tunnel_heap)

    def _touch(self, sa: IkeSa) -> None:
        """`sa` may have changed its timers; cross-SA effects (duplicates, INITIAL_CONTACT,
        rekeys) stay within a tunnel, so a unique tunnel's other SAs are touched as well."""
        self._dirty.add(sa)
        self._dirty_tunnels.add(sa.tunnel)
        for o in (sa.peer_rekey, sa.rekeyed_to, sa.rekey_replaces):
            if o is not None and o.alive:
                self._dirty.add(o)
        t = self._tunnels.get(sa.tunnel)
        if t is not None and t.config.unique:
            self._dirty.update(self._by_tunnel.get(sa.tunnel, ()))

    def _touch_tunnel(self, name: str) -> None:
        self._dirty.update(self._by_tunnel.get(name, ()))
        self._dirty_tunnels.add(name)

    def _refresh_timers(self) -> None:
        while self._dirty:
            sa = self._dirty.pop()
            t = sa.next_timer() if sa.alive else None
            if t is None:
                self._timer_of.pop(sa, None)
            elif self._timer_of.get(sa) != t:
                self._timer_of[sa] = t
                self._seq += 1
                heapq.heappush(self._timer_heap, (t, self._seq, sa))
        if len(self._timer_heap) > 4 * len(self._timer_of) + 64:   # drop stale entries now and then
            self._timer_heap = [(t, n, sa) for t, n, sa in self._timer_heap if self._timer_of.get(sa) == t]
            heapq.heapify(self._timer_heap)

    def datagrams_to_send(self) -> list[Datagram]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> ev.Event | None:
        return self._events.popleft() if self._events else None

    def tunnel_of_datagram(self, data: bytes) -> str | None:
        """The tunnel of the IKE SA one of our own datagrams belongs to (from its IKE header:
        our SPI is SPIi when we are the original initiator, SPIr otherwise); None for a
        keepalive, an SA not (or no longer) known, or a half-open responder SA whose tunnel is
        not decided yet."""
        if len(data) < 28:
            return None
        sa = self._sas.get(data[0:8] if data[19] & 0x08 else data[8:16])
        if sa is None or sa.config is None:
            return None
        return sa.config.name

    # ------------------------------------------------------------------ status
    def sas(self, name: str | None = None) -> list[IkeSa]:
        """Alive IKE SAs (of one tunnel), for status output, oldest first. One tunnel's come from
        its own index: the daemon asks per event, which must not walk every tunnel's SAs."""
        if name is None:
            return [sa for sa in self._sas.values() if sa.alive]
        members = self._by_tunnel.get(name, ())
        return sorted((sa for sa in members if sa.alive and sa.tunnel == name), key=lambda sa: sa.registered)

    @property
    def half_open_count(self) -> int:
        """Responder IKE SAs past IKE_SA_INIT whose IKE_AUTH has not completed (§2.6)."""
        return len(self._half_open)

    def current_sa(self, name: str) -> IkeSa | None:
        """The tunnel's established IKE SA (not replaced, not a duplicate being deleted)."""
        for sa in self._alive_sas(name):
            if self._is_current(sa):
                return sa
        return None

    # ------------------------------------------------------------------ services for IkeSa
    def send(self, data: bytes, src: Endpoint, dst: Endpoint) -> None:
        self._out.append(Datagram(data, src, dst))

    def send_keepalive(self, src: Endpoint, dst: Endpoint) -> None:
        self._out.append(Datagram(NAT_KEEPALIVE, src, dst, keepalive=True))

    def emit(self, event: ev.Event) -> None:
        self._events.append(event)

    def new_ike_spi(self) -> bytes:
        while True:
            spi = self.random(8)
            if spi != ZERO_SPI and spi not in self._sas:
                return spi

    def release_ike_spi(self, spi: bytes) -> None:
        pass  # unregistered SPIs need no release

    def new_child_spi(self) -> bytes:
        while True:
            spi = self.random(4)
            if int.from_bytes(spi, "big") >= 256 and spi not in self._child_spis:  # 1-255 reserved
                self._child_spis.add(spi)
                return spi

    def release_child_spi(self, spi: bytes) -> None:
        self._child_spis.discard(spi)

    def register(self, sa: IkeSa) -> None:
        self._registered += 1
        sa.registered = self._registered
        self._sas[sa.my_spi] = sa
        self._by_tunnel.setdefault(sa.tunnel, set()).add(sa)
        self._touch(sa)

    def retag(self, sa: IkeSa, old_name: str) -> None:
        """A responder SA learnt its tunnel in IKE_AUTH (it may differ from its first guess)."""
        if old_name != sa.tunnel:
            self._by_tunnel.get(old_name, set()).discard(sa)
            self._by_tunnel.setdefault(sa.tunnel, set()).add(sa)
            self._dirty_tunnels.add(old_name)
        self._touch(sa)

    def register_peer_spi(self, sa: IkeSa) -> None:
        """The responder's SPI is known now (IKE_SA_INIT response)."""

    def register_half_open(self, sa: IkeSa) -> None:
        key = (sa.spi_i, sa.remote)
        sa.half_open_key = key
        old = self._half_open.get(key)
        if old is not None:
            self._forget_half_open(old)
        self._half_open[key] = sa
        addr = key[1][0]
        self._half_open_from[addr] = self._half_open_from.get(addr, 0) + 1

    def _forget_half_open(self, sa: IkeSa) -> None:
        key = sa.half_open_key
        if key is not None and self._half_open.get(key) is sa:
            del self._half_open[key]
            addr = key[1][0]
            left = self._half_open_from.get(addr, 0) - 1
            if left > 0:
                self._half_open_from[addr] = left
            else:
                self._half_open_from.pop(addr, None)

    def admit_half_open(self, hdr, cookie: bytes | None, nonce: bytes, src: Endpoint, dst: Endpoint,
                        now: float) -> bool:
        """May this IKE_SA_INIT request create a half-open SA? Checked before any key exchange
        is computed, in strongSwan's order: from `cookie_threshold` half-open SAs on, a valid
        COOKIE (§2.6; else one is sent, statelessly); then the cap per source address; then the
        global cap (refused requests are dropped without an answer)."""
        dos = self.dos
        n = len(self._half_open)
        required = dos.cookie_threshold is not None and n >= dos.cookie_threshold
        # logged when it changes, not per request; "off" only below half the threshold, so a
        # count hovering at the threshold under a flood does not log every expiry
        if required and not self.cookies_required:
            self.cookies_required = True
            log.warning("%d half-open IKE SAs: COOKIEs required (RFC 7296 §2.6, cookie_threshold %d)",
                        n, dos.cookie_threshold)
        elif self.cookies_required and (dos.cookie_threshold is None or n <= dos.cookie_threshold // 2):
            self.cookies_required = False
            log.warning("%d half-open IKE SAs: COOKIEs no longer required", n)
        if required:
            if cookie is None or not self._cookie_valid(cookie, nonce, hdr.spi_i, src[0], now):
                self.dos_counters["cookies_sent"] += 1
                ike_init.send_cookie(self, hdr, self._cookie(nonce, hdr.spi_i, src[0], now), src, dst)
                return False
        per = dos.half_open_per_source
        if per is not None and self._half_open_from.get(src[0], 0) >= per:
            self.dos_counters["refused_per_source"] += 1
            log.debug("IKE_SA_INIT from %s dropped: %d half-open IKE SAs from there", src[0], per)
            return False
        if dos.half_open_max is not None and n >= dos.half_open_max:
            self.dos_counters["refused_global"] += 1
            log.debug("IKE_SA_INIT from %s dropped: %d half-open IKE SAs", src[0], n)
            return False
        return True

    # §2.6 stateless cookies: Cookie = <VersionIDofSecret> | HMAC-SHA256(secret, SPIi | IPi | Ni)
    # (IPi length-prefixed, so that no two inputs share an encoding)
    def _cookie_secret(self, now: float) -> tuple[int, bytes]:
        cur = self._cookie_cur
        if cur is None or now >= self._cookie_rotate_at:
            life = self.dos.cookie_secret_lifetime
            # the previous secret stays good until the next rotation, no longer
            self._cookie_prev = cur if cur is not None and now < self._cookie_rotate_at + life else None
            version = (cur[0] + 1) & 0xFF if cur is not None else 0
            cur = self._cookie_cur = (version, self.random(32))
            self._cookie_rotate_at = now + life
        return cur

    @staticmethod
    def _cookie_mac(secret: bytes, nonce: bytes, spi_i: bytes, addr: str) -> bytes:
        ip = _ip(addr)
        packed = ip.packed if ip is not None else addr.encode()
        return hmac.new(secret, spi_i + bytes([len(packed) & 0xFF]) + packed + nonce, hashlib.sha256).digest()

    def _cookie(self, nonce: bytes, spi_i: bytes, addr: str, now: float) -> bytes:
        version, secret = self._cookie_secret(now)
        return bytes([version]) + self._cookie_mac(secret, nonce, spi_i, addr)

    def _cookie_valid(self, cookie: bytes, nonce: bytes, spi_i: bytes, addr: str, now: float) -> bool:
        if len(cookie) != 33:
            return False
        cur = self._cookie_secret(now)
        for known in (cur, self._cookie_prev):
            if known is not None and known[0] == cookie[0]:
                return hmac.compare_digest(cookie[1:], self._cookie_mac(known[1], nonce, spi_i, addr))
        return False

    def configs_for(self, local: Endpoint, remote: Endpoint) -> list[TunnelConfig]:
        """Tunnels an IKE_SA_INIT from `remote` to `local` may belong to (in tunnel order)."""
        index = self._by_remote
        if index is None:
            index = self._by_remote = {}
            for t in self._tunnels.values():   # by remote address; None: any address
                key = None if t.config.remote_addr is None else _ip(t.config.remote_addr)
                index.setdefault(key, []).append(t)
        exact = index.get(_ip(remote[0]), []) if _ip(remote[0]) is not None else []
        anywhere = index.get(None, [])
        tunnels = sorted(exact + anywhere, key=lambda t: t.order) if exact and anywhere else exact or anywhere
        out = []
        for t in tunnels:
            c = t.config
            mine = t.local_addr or c.local_addr
            if mine is not None and not _same_ip(mine, local[0]):
                continue
            out.append(c)
        return out

    def responder_offer(self, local: Endpoint, remote: Endpoint) -> "ResponderOffer":
        """What an IKE_SA_INIT from `remote` to `local` is answered from: the candidate tunnels
        (configs_for) and the union of their IKE proposals without repeats, kept per address
        pair until the tunnels change. Many tunnels to one peer address share their proposals
        (issue 13: 1,000 tunnels behind one address); without this every IKE_SA_INIT would
        walk every candidate's proposals."""
        key = (_ip(local[0]), _ip(remote[0]))
        offer = self._offers.get(key)
        if offer is None:
            candidates = self.configs_for(local, remote)
            ours = list(dict.fromkeys(p for c in candidates for p in c.ike_proposals))
            offer = ResponderOffer(candidates, ours, self._generation)
            if len(self._offers) >= 1024:     # addresses come from the wire: stay bounded
                self._offers.clear()
            self._offers[key] = offer
        return offer

    def select_config(self, sa: IkeSa, peer: Identity, wanted: Identity | None) -> TunnelConfig | None:
        """The tunnel an authenticating responder SA belongs to (by the peer's IDi/IDr), in the
        configuration of now: a tunnel reloaded since IKE_SA_INIT is matched as it is now
        configured, provided it would still take an IKE_SA_INIT from these addresses."""
        now_configs: list[TunnelConfig] | None = None
        cands = sa.candidates
        if isinstance(cands, Candidates) and cands.generation == self._generation:
            cands = cands.for_peer(peer)     # the others have a remote_id that is not the peer's
        for old in cands:
            t = self._tunnels.get(old.name)
            if t is None:
                continue
            c = t.config
            if c is not old:
                if now_configs is None:
                    now_configs = self.configs_for(sa.local, sa.remote)
                if not any(x is c for x in now_configs):
                    continue
            if c.remote_id is not None and c.remote_id != peer:
                continue
            if wanted is not None and wanted != c.local_id:
                continue
            if sa.proposal is None or not contains(c.ike_proposals, sa.proposal):
                continue   # the IKE SA runs on a proposal this tunnel does not accept
            return c
        return None

    def should_send_initial_contact(self, sa: IkeSa) -> bool:
        """§2.4: only when we have no other IKE SA up with this peer for the tunnel."""
        return not any(o is not sa and o.established_at is not None for o in self._alive_sas(sa.tunnel))

    def initial_contact(self, sa: IkeSa, now: float) -> None:
        """The peer sent INITIAL_CONTACT: it has no other IKE SA with us, so older ones that
        were up before this SA started are stale; drop them without a DELETE (§2.4)."""
        if sa.config is not None and not sa.config.unique:
            return
        for o in self._alive_sas(sa.tunnel):
            if o is sa or o.established_at is None or o.established_at >= sa.created_at:
                continue
            if o.rekeyed_to is not None or o.redundant:
                continue
            o.die(now, "replaced: the peer restarted (INITIAL_CONTACT)")

    def after_activity(self, sa: IkeSa, now: float) -> None:
        pass

    def after_child_removed(self, sa: IkeSa, child: ChildSa) -> None:
        self._child_spis.discard(child.spi_in)

    def on_established(self, sa: IkeSa, now: float) -> None:
        t = self._tunnels.get(sa.tunnel)
        if t is not None:
            t.failures = 0
            t.reconnect_at = None
        self._forget_half_open(sa)
        self._resolve_duplicate_ike_sas(sa.tunnel, now)

    def on_ike_rekeyed(self, old: IkeSa, new: IkeSa, now: float) -> None:
        self.register(new)
        self._touch(old)
        self._resolve_duplicate_ike_sas(new.tunnel, now)

    def child_created(self, sa: IkeSa, child: ChildSa, now: float) -> None:
        t = self._tunnels.get(sa.tunnel)
        if t is not None:
            t.child_failures = 0
            t.child_retry_at = None
        self._resolve_duplicate_children(sa, now)

    def child_failed(self, sa: IkeSa, now: float, *, temporary: bool) -> None:
        t = self._tunnels.get(sa.tunnel)
        if t is None:
            return
        t.child_failures += 1
        t.child_retry_at = now + self._backoff(t.config, t.child_failures)

    def on_removed(self, sa: IkeSa, now: float, reason: str, *, peer_dead: bool, failed: bool) -> None:
        if self._sas.get(sa.my_spi) is sa:
            del self._sas[sa.my_spi]
        members = self._by_tunnel.get(sa.tunnel)    # an SA is in its tunnel's set only (retag)
        if members is not None:
            members.discard(sa)
        self._dirty_tunnels.add(sa.tunnel)
        self._timer_of.pop(sa, None)
        self._dirty.discard(sa)
        self._forget_half_open(sa)
        for o in self._by_tunnel.get(sa.tunnel, ()):
            if o.peer_rekey is sa:
                o.peer_rekey = None
        t = self._tunnels.get(sa.tunnel)
        if t is None or (sa.config is None and not sa.initiator):
            return   # a half-open SA the peer started: nothing to follow up
        if any(o.initiator or o.established_at is not None for o in self._alive_sas(sa.tunnel)):
            return
        cfg = t.config
        if peer_dead:
            if cfg.dpd.action == "restart":
                t.failures = 0
                t.reconnect_at = now
                t.restart = cfg.remote_addr is not None and cfg.local_addr is not None
            else:
                t.hold = True
            return
        if failed:
            t.failures += 1
            t.reconnect_at = now + self._backoff(cfg, t.failures)
            return
        t.reconnect_at = now + cfg.reconnect_delay

    # ------------------------------------------------------------------ internals
    def _backoff(self, cfg: TunnelConfig, n: int) -> float:
        base = cfg.reconnect_delay * 2 ** max(0, n - 1)
        r = int.from_bytes(self.random(2), "big") / 65536
        return min(cfg.reconnect_max_delay, base) * (1.0 + 0.2 * r)

    def _alive_sas(self, name: str) -> list[IkeSa]:
        # half-open SAs of several candidate tunnels belong to none of them yet
        return [sa for sa in self._by_tunnel.get(name, ())
                if sa.alive and (sa.config is not None or sa.initiator or len(sa.candidates) == 1)]

    def _is_current(self, sa: IkeSa) -> bool:
        return (sa.state == IkeState.ESTABLISHED and sa.rekeyed_to is None and not sa.redundant
                and not sa.duplicate)

    def _initiate(self, t: _Tunnel, now: float) -> None:
        cfg = t.config
        t.reconnect_at = None
        if cfg.remote_addr is None or cfg.local_addr is None:   # callers check _can_initiate
            return
        sa = IkeSa(self, initiator=True, config=cfg, candidates=[cfg],
                   local=(t.local_addr or cfg.local_addr, cfg.local_port),
                   remote=(cfg.remote_addr, cfg.remote_port),
                   spi_i=self.new_ike_spi(), spi_r=ZERO_SPI, now=now)
        sa.half_open_deadline = now + cfg.retransmit.timeout * sum(
            cfg.retransmit.base ** n for n in range(cfg.retransmit.tries + 1)) + cfg.half_open_timeout
        self.register(sa)
        log.info("%s: initiating", sa)
        ike_init.start(sa, now)

    def _maintain(self, now: float) -> None:
        names = self._dirty_tunnels
        th = self._tunnel_heap
        while th and th[0][0] <= now:
            _due, _n, name = heapq.heappop(th)
            names.add(name)       # due (or stale: looking again is harmless)
        if not names:
            return
        self._dirty_tunnels = set()
        todo = [self._tunnels[n] for n in names if n in self._tunnels]
        if len(todo) > 1:
            todo.sort(key=lambda t: t.order)
        for t in todo:
            self._maintain_tunnel(t, now)
            due = t.due
            if due is not None and due <= now:
                self._tunnel_due_changed(t)   # still due (not acted on): look again next time

    def _maintain_tunnel(self, t: _Tunnel, now: float) -> None:
        """Keep one tunnel up: (re)initiate it, re-create a missing Child SA (with back-off)."""
        name = t.config.name
        if not t.config.start and not t.restart:
            if t.reconnect_at is not None or t.child_retry_at is not None:
                t.reconnect_at = t.child_retry_at = None
            return
        # a half-open SA the peer started does not count: it may never complete
        live = [sa for sa in self._alive_sas(name) if sa.initiator or sa.established_at is not None]
        if not live:
            t.child_retry_at = None
            if (self._started or t.restart) and not t.hold and _can_initiate(t.config):
                if t.reconnect_at is None:
                    t.reconnect_at = now + self._backoff(t.config, max(1, t.failures))
                if now >= t.reconnect_at:
                    self._initiate(t, now)
            else:
                t.reconnect_at = None
            return
        t.reconnect_at = None
        t.restart = False
        if not t.config.start:
            return
        cur = self.current_sa(name)
        if cur is None:
            t.child_retry_at = None
            return
        if (cur.children_in_use() or any(c.alive and not c.redundant for c in cur.children)
                or cur.has_queued(lambda e: isinstance(e, child_create.CreateChild))):
            t.child_retry_at = None
            return
        if t.child_retry_at is None:
            t.child_retry_at = now + t.config.reconnect_delay
        if now >= t.child_retry_at:
            t.child_retry_at = None
            child_create.start_new_child(cur, now)
            self._touch(cur)

    def _resolve_duplicate_ike_sas(self, name: str, now: float) -> None:
        """Crossing initiations left two IKE SAs up for one tunnel: keep the one whose
        IKE_SA_INIT holds the higher lowest nonce (§2.8.1's rule), on both peers alike."""
        t = self._tunnels.get(name)
        if t is not None and not t.config.unique:
            return
        current = [sa for sa in self._alive_sas(name) if self._is_current(sa)]
        if len(current) < 2:
            return
        current.sort(key=lambda s: min(s.nonce_i, s.nonce_r))
        for loser in current[:-1]:
            loser.duplicate = True
            log.info("%s: duplicate IKE SA for tunnel %s; deleting it", loser, name)
            informational.delete_ike_sa(loser, now, "duplicate IKE SA (crossing initiations)")

    def _resolve_duplicate_children(self, sa: IkeSa, now: float) -> None:
        """Two Child SA pairs for one tunnel that are not a rekey of one another (both peers
        created one at once): the pair whose exchange holds the lowest nonce is redundant and
        is deleted by its initiator (§2.8.1's rule), or by us after a grace period."""
        heads = [c for c in sa.children_in_use()
                 if not (c.rekeyed_by is not None and c.rekeyed_by.alive and not c.rekeyed_by.redundant)]
        if len(heads) < 2:
            return
        heads.sort(key=lambda c: c.lowest_nonce())
        for loser in heads[:-1]:
            loser.redundant = True
            log.info("%s: duplicate Child SA %s; keeping %s", sa, loser.describe(), heads[-1].describe())
            if loser.we_initiated:
                informational.delete_child(sa, loser, now, "duplicate Child SA (crossing requests)")
            else:
                loser.delete_at = now + self.redundant_grace

    def _invalid_major_version(self, data: bytes, src: Endpoint, dst: Endpoint) -> None:
        """§2.5: answer a request with a newer major version with INVALID_MAJOR_VERSION."""
        from appliance.ike.message import Message, Notify, encode_message

        hdr_flags = data[19]
        if hdr_flags & 0x20:
            return
        msg = Message(data[0:8], data[8:16], data[18], int.from_bytes(data[20:24], "big"), True,
                      not bool(hdr_flags & 0x08), [Notify(NotifyType.INVALID_MAJOR_VERSION)])
        self.send(encode_message(msg), dst, src)


def _can_initiate(cfg: TunnelConfig) -> bool:
    return cfg.remote_addr is not None and cfg.local_addr is not None


def _same_ip(a: str, b: str) -> bool:
    x, y = _ip(a), _ip(b)
    return x is not None and x == y


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
